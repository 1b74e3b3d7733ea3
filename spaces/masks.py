"""Channel groups switched off in place: 0/1 masks over every parameter slice a group couples.

Iterative policies (SAP structured, allatonce) train a full-size network whose pruned channels
are held at zero, so every index stays in the parent's coordinates; `engine.prune(...,
keep=...)` removes them physically at the end. Zeroing a channel's producer rows and its
norm-layer scale and shift makes its activation exactly 0 in conv/BN/ReLU networks, so the
masked and the physically pruned network compute the same function there (the policy tests
check this). Norms that mix channels (LayerNorm over the pruned dim) are not exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from prunetune.spaces.backend import TorchPruningBackend
from prunetune.spaces.common import PruningError

Masks = dict[str, torch.Tensor]   # parameter name -> 0/1 tensor of the parameter's shape


def _slices(handler_name: str, module: nn.Module) -> list[tuple[str, int]]:
    """(parameter attribute, dim) that a handler's indices address; [] for parameter-free nodes."""
    if handler_name in ("prune_conv_out_channels", "prune_linear_out_channels",
                        "prune_depthwise_conv_out_channels", "prune_depthwise_conv_in_channels"):
        return [("weight", 0), ("bias", 0)]
    if handler_name in ("prune_conv_in_channels", "prune_linear_in_channels"):
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            raise PruningError(f"{type(module).__name__} with groups={module.groups}: grouped inputs cannot be masked")
        return [("weight", 1)]
    if any(handler_name.startswith(f"prune_{k}_") for k in ("batchnorm", "layernorm", "groupnorm", "instancenorm")):
        return [("weight", 0), ("bias", 0)]
    if handler_name.startswith("prune_prelu_"):
        return [("weight", 0)] if module.weight.numel() > 1 else []
    if not list(module.parameters(recurse=False)):
        return []
    raise PruningError(f"{type(module).__name__}: cannot mask its channels ({handler_name})")


def _handler_name(handler) -> str:
    """torch-pruning's public name of a pruning function (they are bound methods of pruner objects)."""
    import torch_pruning as tp

    for name in dir(tp):
        if name.startswith("prune_") and getattr(tp, name) == handler:
            return name
    return getattr(handler, "__qualname__", repr(handler))


def group_masks(model: nn.Module, example_input: torch.Tensor, off: Mapping[str, Iterable[int]], *,
                ignored: tuple[str, ...] = ()) -> Masks:
    """Masks that switch off channels `off[root]` of each group (and every coupled slice)."""
    backend = TorchPruningBackend(model, example_input, ignored=ignored)
    names = {m: n for n, m in model.named_modules()}
    masks: Masks = {}
    for root, idxs in off.items():
        idxs = sorted(int(i) for i in idxs)
        if not idxs:
            continue
        try:
            group = backend._group(root, idxs)
        except AttributeError:
            raise PruningError(f"{root}: no such layer in the model") from None
        for dep, dep_idxs in group:
            module = dep.target.module
            if not isinstance(module, nn.Module):
                continue
            for attr, dim in _slices(_handler_name(dep.handler), module):
                p = getattr(module, attr, None)
                if not isinstance(p, nn.Parameter):
                    continue
                key = f"{names[module]}.{attr}" if names[module] else attr
                m = masks.setdefault(key, torch.ones_like(p, dtype=torch.bool))
                m.index_fill_(dim, torch.as_tensor(list(dep_idxs), dtype=torch.long, device=m.device), False)
    return masks


def merge(*all_masks: Masks) -> Masks:
    """Logical AND of several mask sets (a channel off in any is off)."""
    out: Masks = {}
    for masks in all_masks:
        for k, m in masks.items():
            out[k] = out[k] & m if k in out else m.clone()
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero every masked entry in place; names not in the model (bypassed blocks) are skipped."""
    params = dict(model.named_parameters())
    for k, m in masks.items():
        if k in params:
            params[k].mul_(m.to(params[k].device, params[k].dtype))


def remaining(model: nn.Module, masks: Masks) -> tuple[int, int]:
    """(unmasked entries, total entries) over the masked parameters present in `model`."""
    params = dict(model.named_parameters())
    kept = sum(int(m.count_nonzero()) for k, m in masks.items() if k in params)
    total = sum(m.numel() for k, m in masks.items() if k in params)
    return kept, total
