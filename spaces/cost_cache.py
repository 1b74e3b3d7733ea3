"""A disk cache of costs keyed by architecture, so equal structures are measured once.

`structural_signature` hashes what decides cost (module types, their shape-defining
attributes, parameter/buffer shapes, input shape and dtype) and nothing learned, so two
differently trained copies share a signature. Python-level code in a custom `forward`
(say a hard-coded `F.interpolate` size) is not seen beyond the module's class name.

`CostCache` keeps one JSON file per signature, holding named entries ("static|<device>",
"latency|<device>|threads=<t>|batch=<b>"). Writers take `root/.lock` (flock), re-read the
file, merge, and publish it with temp file + `os.replace`; a file that cannot be parsed is
treated as empty and overwritten by the next `put`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

try:
    import fcntl
except ImportError:  # not POSIX: writers still re-read before replace, only unlocked
    fcntl = None

log = logging.getLogger(__name__)

# Attributes that fix a module's shapes or arithmetic but may not show in its parameter shapes.
# Looked up along the class's MRO; a class with no entry contributes its `extra_repr()`.
SHAPE_ATTRS: dict[type, tuple[str, ...]] = {}


def register_shape_attrs(cls: type, *attrs: str) -> None:
    """Make `structural_signature` read `attrs` from every module that is a `cls`."""
    SHAPE_ATTRS[cls] = attrs


register_shape_attrs(nn.modules.conv._ConvNd, "in_channels", "out_channels", "kernel_size",
                     "stride", "padding", "dilation", "groups", "transposed",
                     "output_padding", "padding_mode")
register_shape_attrs(nn.Linear, "in_features", "out_features")
register_shape_attrs(nn.modules.batchnorm._NormBase, "num_features", "affine",
                     "track_running_stats")
register_shape_attrs(nn.LayerNorm, "normalized_shape", "elementwise_affine")
register_shape_attrs(nn.GroupNorm, "num_groups", "num_channels", "affine")
register_shape_attrs(nn.MultiheadAttention, "embed_dim", "kdim", "vdim", "num_heads",
                     "batch_first", "add_zero_attn")
register_shape_attrs(nn.RNNBase, "mode", "input_size", "hidden_size", "num_layers",
                     "bias", "batch_first", "bidirectional", "proj_size")
register_shape_attrs(nn.Embedding, "num_embeddings", "embedding_dim", "padding_idx")
register_shape_attrs(nn.TransformerEncoderLayer, "norm_first")
register_shape_attrs(nn.TransformerDecoderLayer, "norm_first")


def _shape_attrs(module: nn.Module) -> tuple[str, ...] | None:
    for cls in type(module).__mro__:
        if cls in SHAPE_ATTRS:
            return SHAPE_ATTRS[cls]
    return None


def _describe(value: object) -> object:
    if isinstance(value, (tuple, list)):
        return [_describe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _module_record(name: str, module: nn.Module) -> list:
    cls = type(module)
    attrs = _shape_attrs(module)
    if attrs is None:
        config: object = module.extra_repr()
    else:
        config = {a: _describe(getattr(module, a, None)) for a in attrs}
    tensors = [[n, list(t.shape), str(t.dtype)]
               for n, t in [*module.named_parameters(recurse=False),
                            *module.named_buffers(recurse=False)]
               if t is not None]
    return [name, f"{cls.__module__}.{cls.__qualname__}", config, tensors]


def structural_signature(model: nn.Module, example_input: torch.Tensor) -> str:
    """Hex digest of `model`'s architecture at `example_input`'s shape and dtype (no forward).

    Equal for equal structures whatever the weights; different when a width, a block, or the
    input resolution differs.
    """
    record = {
        "input": [list(example_input.shape), str(example_input.dtype)],
        "modules": [_module_record(n, m) for n, m in model.named_modules()],
    }
    blob = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def static_key(device: str) -> str:
    """Entry name for MACs, params and peak activation bytes (the last is device-dependent
    on CUDA, where the allocator's peak is also taken into account)."""
    return f"static|{device}"


def latency_key(device: str, threads: int, batch: int) -> str:
    """Entry name for a latency measured on `device` with `threads` threads at `batch`."""
    return f"latency|{device}|threads={threads}|batch={batch}"


class CostCache:
    """One JSON file per structural signature under `root`; safe for concurrent writers.

    >>> cache = CostCache(Path("/tmp/costs"))
    >>> cache.put("0a1b", latency_key("cpu", 1, 1), {"median_ms": 1.5})
    >>> cache.get("0a1b", latency_key("cpu", 1, 1))
    {'median_ms': 1.5}
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread_lock = threading.Lock()  # flock is per open file; this covers non-POSIX

    def path(self, signature: str) -> Path:
        if not signature or not all(c.isalnum() or c in "-_" for c in signature):
            raise ValueError(f"signature {signature!r}: only letters, digits, '-' and '_'")
        return self.root / f"{signature}.json"

    def entries(self, signature: str) -> dict[str, dict]:
        """Every entry stored for `signature`; {} when the file is missing or unreadable."""
        path = self.path(signature)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            log.warning("cost cache %s: unreadable (%s); ignoring it", path, e)
            return {}
        entries = data.get("entries") if isinstance(data, dict) else None
        if not isinstance(entries, dict) or data.get("signature") != signature:
            log.warning("cost cache %s: not a cost cache file; ignoring it", path)
            return {}
        return {k: v for k, v in entries.items() if isinstance(v, dict)}

    def get(self, signature: str, key: str) -> dict | None:
        return self.entries(signature).get(key)

    def put(self, signature: str, key: str, value: dict) -> None:
        """Store `value` under `key`, keeping every other entry (also other writers')."""
        json.dumps(value)  # fail here, not half-way through a write, on unserialisable values
        path = self.path(signature)
        with self._locked():
            entries = self.entries(signature)
            entries[key] = value
            self._write(path, {"signature": signature, "entries": entries})

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            if fcntl is None:
                yield
                return
            with open(self.root / ".lock", "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, path: Path, data: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
