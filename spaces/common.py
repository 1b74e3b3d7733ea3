"""Small pieces every part of the engine shares: the error type, channel rounding, hashing."""

from __future__ import annotations

import hashlib
import math

from torch import nn


class PruningError(ValueError):
    """A vector or spec that cannot be applied to this model; the message names the key or layer."""


def kept_channels(n: int, ratio: float, round_to: int = 1) -> int:
    """Channels kept of `n` at keep `ratio`: ceil(ratio * n), then to the nearest multiple of
    `round_to` (halves round up), never below `round_to` nor above `n`."""
    k = max(1, math.ceil(ratio * n - 1e-9))
    if round_to > 1:
        k = min(n, max(round_to, math.floor(k / round_to + 0.5) * round_to))
    return k


def state_hash(model: nn.Module) -> str:
    """Content hash of a model's state_dict (names, shapes and values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
