"""Turn a pruning vector into a physically smaller network, and replay that from a spec.

`materialize` works on a deep copy, so the parent is never left half-pruned: depth first
(drop the last blocks of each stage; the first block, which may change shape, always
stays), then channels (each internal conv keeps its highest-scoring `ratio` of channels,
pruned through a DepGraph group so BN and the next conv follow). `rebuild` replays the same
structure on a freshly built parent by keeping the first k channels, then weights are loaded.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from prunetune.spaces.discovery import ModelSpace, discover
from prunetune.spaces.importance import get_importance
from prunetune.spaces.spec import SubnetSpec
from prunetune.spaces.vector import PruningVector


class PruningError(ValueError):
    """A vector that cannot be applied to this model; the message names the key or layer."""


@dataclass
class Subnet:
    module: nn.Module
    spec: SubnetSpec


def state_hash(model: nn.Module) -> str:
    """Content hash of a model's state_dict (names, shapes and values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def validate_vector(vector: PruningVector, space: ModelSpace) -> None:
    for key in vector.channels:
        if key not in space.stage_names:
            raise PruningError(f"channels.{key}: no such stage (stages: {list(space.stage_names)})")
    for key, ratio in vector.channels.items():
        if not 0.0 < ratio <= 1.0:
            raise PruningError(f"channels.{key}: keep ratio must be in (0, 1], got {ratio}")
    for key, d in vector.depth.items():
        if key not in space.stage_names:
            raise PruningError(f"depth.{key}: no such stage (stages: {list(space.stage_names)})")
        n = space.stage(key).max_depth
        if not 1 <= d <= n:
            raise PruningError(
                f"depth.{key}: blocks kept must be in [1, {n}], got {d} "
                "(a stage cannot be removed whole)"
            )
    if vector.resolution is not None and vector.resolution < 1:
        raise PruningError(f"resolution: must be >= 1, got {vector.resolution}")


def kept_channels(n: int, ratio: float, round_to: int = 1) -> int:
    """Channels kept of `n` at keep `ratio`: ceil(ratio * n), then to the nearest multiple of
    `round_to` (halves round up), never below `round_to` nor above `n`."""
    k = max(1, math.ceil(ratio * n - 1e-9))
    if round_to > 1:
        k = min(n, max(round_to, math.floor(k / round_to + 0.5) * round_to))
    return k


def _drop_blocks(model: nn.Module, vector: PruningVector, space: ModelSpace) -> list[str]:
    removed: list[str] = []
    for stage in space.stages:
        d = vector.depth.get(stage.name, stage.max_depth)
        if d == stage.max_depth:
            continue
        seq = model.get_submodule(stage.name)
        parent_name, _, attr = stage.name.rpartition(".")
        owner = model.get_submodule(parent_name) if parent_name else model
        setattr(owner, attr, nn.Sequential(*list(seq.children())[:d]))
        removed.extend(stage.blocks[d:])
    return removed


def _conv_targets(space: ModelSpace, vector: PruningVector, removed: list[str]):
    """(conv name, keep ratio) for every internal conv of a kept block."""
    for stage in space.stages:
        ratio = vector.channels.get(stage.name, 1.0)
        for block, convs in zip(stage.blocks, stage.internal_convs):
            if block in removed:
                continue
            for conv in convs:
                yield conv, ratio


def _widths(model: nn.Module) -> dict[str, int]:
    return {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _example(in_channels: int, resolution: int) -> torch.Tensor:
    return torch.zeros(1, in_channels, resolution, resolution)


def _prune_out(dg, conv: nn.Module, idxs: list[int], name: str) -> None:
    if not idxs:
        return
    group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs)
    if not dg.check_pruning_group(group):
        raise PruningError(f"{name}: pruning {len(idxs)} channels would empty a coupled layer")
    group.prune()


def materialize(
    parent: nn.Module,
    vector: PruningVector,
    *,
    in_channels: int,
    native_resolution: int,
    importance: str = "l2",
    round_to: int = 1,
    parent_id: str = "parent",
    seed: int = 0,
) -> Subnet:
    """Build the subnet of `parent` described by `vector` (the parent is not modified).

    >>> from torchvision.models import resnet18
    >>> sub = materialize(resnet18(num_classes=10), PruningVector(channels={"layer1": 0.5}),
    ...                   in_channels=3, native_resolution=32)
    >>> sub.module.layer1[0].conv1.out_channels
    32
    """
    space = discover(parent)
    validate_vector(vector, space)
    scorer = get_importance(importance)
    model = copy.deepcopy(parent).cpu().eval()
    removed = _drop_blocks(model, vector, space)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=_example(in_channels, native_resolution))
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for name, ratio in _conv_targets(space, vector, removed):
            conv = model.get_submodule(name)
            n = conv.out_channels
            k = kept_channels(n, ratio, round_to)
            if k == n:
                continue
            full = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(n)))
            scores = scorer(full)
            drop = torch.argsort(scores, stable=True)[: n - k].tolist()
            _prune_out(dg, conv, sorted(drop), name)
    finally:
        torch.random.set_rng_state(generator_state)
    resolution = vector.resolution or native_resolution
    spec = SubnetSpec(
        parent_id=parent_id, parent_hash=state_hash(parent), vector=vector,
        widths=_widths(model), removed_blocks=removed, resolution=resolution,
        in_channels=in_channels, native_resolution=native_resolution,
        round_to=round_to, importance=importance, seed=seed,
    )
    return Subnet(module=model, spec=spec)


def rebuild(skeleton: nn.Module, spec: SubnetSpec) -> nn.Module:
    """Give a freshly built parent the structure recorded in `spec` (weights not loaded).

    The result has exactly the spec's per-layer widths; load the subnet's state_dict next.
    """
    space = discover(skeleton)
    validate_vector(spec.vector, space)
    model = copy.deepcopy(skeleton).cpu().eval()
    removed = _drop_blocks(model, spec.vector, space)
    if removed != list(spec.removed_blocks):
        raise PruningError(f"removed_blocks: spec says {spec.removed_blocks}, replay gives {removed}")
    dg = tp.DependencyGraph().build_dependency(
        model, example_inputs=_example(spec.in_channels, spec.native_resolution))
    for name, ratio in _conv_targets(space, spec.vector, removed):
        conv = model.get_submodule(name)
        if name not in spec.widths:
            raise PruningError(f"widths.{name}: missing from the spec")
        expected = kept_channels(conv.out_channels, ratio, spec.round_to)
        if spec.widths[name] != expected:
            raise PruningError(f"widths.{name}: spec says {spec.widths[name]} channels, its vector "
                               f"gives {expected} (ratio {ratio}, round_to {spec.round_to})")
        _prune_out(dg, conv, list(range(expected, conv.out_channels)), name)
    got = _widths(model)
    if got != dict(spec.widths):
        diff = sorted(k for k in set(got) | set(spec.widths) if got.get(k) != spec.widths.get(k))
        raise PruningError(f"widths: rebuilt model differs from the spec at {diff[:5]}")
    return model
