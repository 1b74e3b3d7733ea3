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


def _params_addressed(op: str, module: nn.Module) -> list[tuple[str, int]]:
    """(parameter attribute, dim) that a backend operation's indices address; [] when none."""
    if op in ("conv_out", "linear_out", "depthwise_conv_out", "depthwise_conv_in"):
        return [("weight", 0), ("bias", 0)]
    if op in ("conv_in", "linear_in"):
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            raise PruningError(f"{type(module).__name__} with groups={module.groups}: grouped inputs cannot be masked")
        return [("weight", 1)]
    if op.split("_")[0] in ("batchnorm", "layernorm", "groupnorm", "instancenorm"):
        return [("weight", 0), ("bias", 0)]
    if op.startswith("prelu_"):
        return [("weight", 0)] if module.weight.numel() > 1 else []
    if not list(module.parameters(recurse=False)):
        return []
    raise PruningError(f"{type(module).__name__}: cannot mask its channels ({op})")


def group_masks(model: nn.Module, example_input: torch.Tensor, off: Mapping[str, Iterable[int]], *,
                ignored: tuple[str, ...] = ()) -> Masks:
    """Masks that switch off channels `off[root]` of each group (and every coupled slice)."""
    backend = TorchPruningBackend(model, example_input, ignored=ignored)
    masks: Masks = {}
    for root, idxs in off.items():
        idxs = sorted(int(i) for i in idxs)
        if not idxs:
            continue
        try:
            slices = backend.slices(root, idxs)
        except ValueError as err:
            raise PruningError(str(err)) from None
        for name, op, dep_idxs in slices:
            module = model.get_submodule(name)
            for attr, dim in _params_addressed(op, module):
                p = getattr(module, attr, None)
                if not isinstance(p, nn.Parameter):
                    continue
                key = f"{name}.{attr}" if name else attr
                m = masks.setdefault(key, torch.ones_like(p, dtype=torch.bool))
                m.index_fill_(dim, torch.as_tensor(dep_idxs, dtype=torch.long, device=m.device), False)
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

