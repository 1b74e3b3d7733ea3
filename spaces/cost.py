"""What a subnet costs: MACs and parameters at the resolution it will be fed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn


@dataclass(frozen=True)
class Cost:
    macs: int
    params: int


def measure_cost(model: nn.Module, *, in_channels: int, resolution: int) -> Cost:
    """MACs for one image at `resolution` (conv/linear, as torch-pruning counts them)."""
    x = torch.zeros(1, in_channels, resolution, resolution,
                    device=next(model.parameters()).device)
    macs, params = tp.utils.count_ops_and_params(model, x)
    return Cost(macs=int(macs), params=int(params))
