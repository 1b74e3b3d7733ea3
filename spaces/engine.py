"""The pruning engine for any architecture: one joint vector -> a real, smaller network.

`describe` reads the searchable structure off the model itself (no per-model lists):
channel groups from the dependency-graph backend, organised into resolution stages
(`segments`); removable residual blocks found from the autograd graph (`blocks`); attention
modules and their heads (`heads`); whether the input resolution can change (`resolution`).

`prune` applies a `PruningVector` to a deep copy, in a fixed order: depth (bypass the
blocks a criterion picks) -> heads -> channels (each group keeps its highest-scoring share,
rounded to `round_to`) -> resolution. It returns the module and a `SubnetSpec` recording
every decision, which `rebuild` replays on a freshly built parent (keeping the first k
channels/heads: the weights are loaded afterwards). The parent is never modified; a bad
vector raises `PruningError` naming the key or layer before anything is built.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prunetune.spaces.backend import BACKENDS, ChannelGroup
from prunetune.spaces.block_criteria import choose_blocks_to_drop
from prunetune.spaces.blocks import StageInfo, bypass, find_residual_blocks, group_stages
from prunetune.spaces.heads import find_attention, prune_heads
from prunetune.spaces.importance import NEEDS_GRAD, get_importance
from prunetune.spaces.common import PruningError, kept_channels, state_hash
from prunetune.spaces.resolution import adapt_resolution
from prunetune.spaces.segments import classifier_name, segments, trace_layers
from prunetune.spaces.spec import SubnetSpec
from prunetune.spaces.vector import PruningVector


@dataclass(frozen=True)
class ChannelStage:
    name: str
    positions: int
    groups: tuple[ChannelGroup, ...]
    attention: tuple[str, ...] = ()      # attention modules whose heads this stage's key prunes


@dataclass(frozen=True)
class ModelStructure:
    """Everything a vector can address in one model."""

    channel_stages: tuple[ChannelStage, ...]
    depth_stages: tuple[StageInfo, ...]
    attention: dict[str, int] = field(default_factory=dict)
    classifier: str = ""
    resolution_adaptable: bool = True
    skipped_groups: tuple[str, ...] = ()   # groups found but not prunable here (see describe)
    channel_error: str = ""                # why the backend could not trace the model, if it could not

    def channel_stage(self, name: str) -> ChannelStage:
        for s in self.channel_stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def depth_stage(self, name: str) -> StageInfo:
        for s in self.depth_stages:
            if s.name == name:
                return s
        raise KeyError(name)


def _inside(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def describe(model: nn.Module, example_input: torch.Tensor, *, backend: str = "torch-pruning",
             prune_coupled: bool = True) -> ModelStructure:
    """Discover channel stages, removable blocks, attention heads and resolution handling."""
    model = copy.deepcopy(model).eval()
    classifier = classifier_name(model, example_input)
    attention = find_attention(model)
    adaptable = _resolution_adaptable(model, example_input)
    work = prune_heads(model, 1.0) if attention else model  # our attention modules: plain Linear inside
    attn_internal = tuple(n for n, _ in work.named_modules()
                          if any(_inside(n, a) and n != a for a in attention))
    try:
        groups = BACKENDS[backend](work, example_input, ignored=(classifier, *attn_internal)).groups()
        channel_error = ""
    except Exception as err:  # noqa: BLE001 - the backend cannot trace this model: no channel pruning
        groups, channel_error = [], f"{type(err).__name__}: {err}"
    # Not pruned: grouped-conv groups (need per-conv-group selection, not implemented yet) and,
    # in models with attention, groups coupled to the hidden width (heads cover attention).
    by_root = {g.root: g for g in groups if not g.grouped
               and ((prune_coupled and not attention) or not g.coupled)}
    stages = []
    for seg in segments(trace_layers(work, example_input)):
        members = tuple(by_root[n] for n in seg.layers if n in by_root)
        heads = tuple(a for a in attention if any(_inside(layer, a) for layer in seg.layers))
        if members or heads:
            stages.append(ChannelStage(seg.name, seg.positions, members, heads))
    depth = tuple(s for s in group_stages(model, find_residual_blocks(model, example_input)) if s.max_drop > 0)
    skipped = tuple(g.root for g in groups if g.root not in by_root)
    return ModelStructure(tuple(stages), depth, attention, classifier, adaptable, skipped, channel_error)


def at_resolution(model: nn.Module, resolution: int) -> nn.Module:
    """`model` adapted to square inputs of `resolution`: ViT position embeddings are
    interpolated; models that already accept any size (adaptive or functional pooling) are
    returned as they are."""
    try:
        return adapt_resolution(model, resolution)
    except ValueError as err:
        if "cannot adapt" not in str(err):  # a real error (e.g. not a multiple of the patch size)
            raise
        return model


@torch.no_grad()
def _resolution_adaptable(model: nn.Module, example_input: torch.Tensor) -> bool:
    """True when a smaller square input still gives outputs of the same shape."""
    if example_input.dim() != 4 or not example_input.is_floating_point():
        return False
    size = example_input.shape[-1]
    smaller = max(1, size * 3 // 4)
    try:
        adapted = at_resolution(model, smaller)
        x = torch.zeros(*example_input.shape[:2], smaller, smaller)
        return adapted(x).shape == model(example_input).shape
    except Exception:  # noqa: BLE001 - any failure means the resolution cannot change
        return False


def validate(vector: PruningVector, structure: ModelStructure) -> None:
    names = [s.name for s in structure.channel_stages]
    roots = {g.root for s in structure.channel_stages for g in s.groups}
    for key, ratio in vector.channels.items():
        if key not in names and key not in roots:
            raise PruningError(f"channels.{key}: no such stage or channel group (stages: {names})")
        if not 0.0 < ratio <= 1.0:
            raise PruningError(f"channels.{key}: keep ratio must be in (0, 1], got {ratio}")
    for key, ratio in vector.heads.items():
        if key not in names or not structure.channel_stage(key).attention:
            raise PruningError(f"heads.{key}: no attention in such a stage "
                               f"(stages with heads: {[s.name for s in structure.channel_stages if s.attention]})")
        if not 0.0 < ratio <= 1.0:
            raise PruningError(f"heads.{key}: keep ratio must be in (0, 1], got {ratio}")
    depth_names = [s.name for s in structure.depth_stages]
    for key, d in vector.depth.items():
        if key not in depth_names:
            raise PruningError(f"depth.{key}: no stage with removable blocks (stages: {depth_names})")
        st = structure.depth_stage(key)
        if not st.min_depth <= d <= st.max_depth:
            raise PruningError(f"depth.{key}: blocks kept must be in [{st.min_depth}, {st.max_depth}], got {d} "
                               "(a stage cannot be removed whole)")
    if vector.resolution is not None and vector.resolution < 1:
        raise PruningError(f"resolution: must be >= 1, got {vector.resolution}")
    if vector.resolution is not None and not structure.resolution_adaptable:
        raise PruningError("resolution: this model's input resolution cannot be changed")


@dataclass
class Pruned:
    module: nn.Module
    spec: SubnetSpec


def prune(parent: nn.Module, vector: PruningVector, example_input: torch.Tensor, *,
          model_name: str = "", importance: str = "l2", round_to: int = 1,
          block_criterion: str = "position", probes: torch.Tensor | None = None,
          structure: ModelStructure | None = None, seed: int = 0,
          drop_blocks: Sequence[str] | None = None, keep: Mapping[str, Sequence[int]] | None = None) -> Pruned:
    """Apply `vector` to a copy of `parent` (see the module docstring for the order).

    `drop_blocks` and `keep` ({group root: channel indices}) replace the criteria with
    decisions taken elsewhere (iterative policies); build the matching vector with
    `exact_vector`.
    """
    structure = structure or describe(parent, example_input)
    validate(vector, structure)
    scorer = get_importance(importance)
    model = copy.deepcopy(parent).cpu().eval()
    removed: list[str] = []
    for st in structure.depth_stages:
        d = vector.depth.get(st.name, st.max_depth)
        if drop_blocks is not None:
            removed += [b for b in st.removable if b in drop_blocks]
        elif d < st.max_depth:
            removed += choose_blocks_to_drop(model, list(st.removable), st.max_depth - d,
                                             block_criterion, probes=probes)
    if drop_blocks is not None:
        _check_removed_blocks(removed, list(drop_blocks), vector, structure)
    keep = {k: sorted(int(i) for i in v) for k, v in (keep or {}).items()}

    def choose(backend, group, k):
        if group.root not in keep:
            return _top_k_drop(backend.scores(group.root, scorer), k)
        if len(keep[group.root]) != k:
            raise PruningError(f"keep.{group.root}: {len(keep[group.root])} channels given, the vector keeps {k}")
        kept = set(keep[group.root])
        return [i for i in range(group.size) if i not in kept]
    if removed:
        model = bypass(model, removed)
    heads = _heads_plan(vector, structure, removed)
    if structure.attention:
        model = prune_heads(model, {n: heads.get(n, k) for n, k in structure.attention.items()
                                    if not any(_inside(n, r) for r in removed)})
    grad_inputs = (probes if probes is not None else example_input) if importance in NEEDS_GRAD else None
    groups = _prune_channels(model, example_input, structure, vector, removed, round_to, choose, seed,
                             grad_inputs=grad_inputs)
    if vector.resolution is not None:
        try:
            model = at_resolution(model, vector.resolution)
        except ValueError as err:
            raise PruningError(str(err)) from None
    spec = _spec(parent, model, vector, example_input, removed, heads, groups, model_name, importance,
                 round_to, seed, block_criterion)
    return Pruned(model, spec)


def exact_vector(structure: ModelStructure, removed: Sequence[str], keep: Mapping[str, Sequence[int]],
                 resolution: int | None = None) -> PruningVector:
    """The per-group vector that keeps exactly `keep` channels and drops exactly `removed` blocks."""
    sizes = {g.root: g.size for s in structure.channel_stages for g in s.groups}
    unknown = sorted(set(keep) - set(sizes))
    if unknown:
        raise PruningError(f"keep.{unknown[0]}: no such channel group")
    channels = {root: len(idx) / sizes[root] for root, idx in keep.items() if len(idx) < sizes[root]}
    depth = {st.name: st.max_depth - sum(b in removed for b in st.removable) for st in structure.depth_stages
             if any(b in removed for b in st.removable)}
    return PruningVector(channels=channels, depth=depth, resolution=resolution)


def _check_removed_blocks(found: list[str], asked: list[str], vector: PruningVector,
                          structure: ModelStructure) -> None:
    missing = sorted(set(asked) - set(found))
    if missing:
        raise PruningError(f"drop_blocks: {missing[0]!r} is not a removable block of this model")
    for st in structure.depth_stages:
        n = sum(b in found for b in st.removable)
        if st.max_depth - n != vector.depth.get(st.name, st.max_depth):
            raise PruningError(f"depth.{st.name}: the vector keeps {vector.depth.get(st.name, st.max_depth)} "
                               f"blocks, drop_blocks leaves {st.max_depth - n}")


def _heads_plan(vector, structure, removed) -> dict[str, int]:
    plan = {}
    for stage in structure.channel_stages:
        ratio = vector.heads.get(stage.name)
        for name in stage.attention:
            if ratio is not None and not any(_inside(name, r) for r in removed):
                plan[name] = kept_channels(structure.attention[name], ratio)
    return plan


def _top_k_drop(scores: torch.Tensor, keep: int) -> list[int]:
    return sorted(torch.argsort(scores, stable=True)[: scores.numel() - keep].tolist())


def _fill_gradients(model: nn.Module, inputs: torch.Tensor) -> None:
    """Gradients for gradient-based criteria (Taylor): cross-entropy of the model against its
    own predictions on `inputs` (no labels are needed; BN stays in eval mode)."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = model(inputs)
        out = out[0] if isinstance(out, tuple) else out
        loss = (torch.nn.functional.cross_entropy(out, out.argmax(-1).detach()) if out.dim() == 2
                else out.float().pow(2).mean())
        loss.backward()


def _prune_channels(model, example_input, structure, vector, removed, round_to, choose, seed, *,
                    grad_inputs: torch.Tensor | None = None) -> dict[str, int]:
    """Prune every group of every stage with a ratio; returns {group root: channels kept}."""
    # A group's own key (per-group granularity) wins over its stage's key.
    targets = [(g, vector.channels.get(g.root, vector.channels.get(s.name))) for s in structure.channel_stages
               for g in s.groups if not any(_inside(g.root, r) for r in removed)]
    targets = [(g, r) for g, r in targets if r is not None]
    kept: dict[str, int] = {}
    if not targets:
        return kept
    attn = tuple(n for n, _ in model.named_modules()
                 if any(_inside(n, a) and n != a for a in structure.attention))
    backend = BACKENDS["torch-pruning"](model, example_input, ignored=(structure.classifier, *attn))
    if grad_inputs is not None:
        _fill_gradients(model, grad_inputs)
    rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for group, ratio in targets:
            k = kept_channels(group.size, ratio, round_to)
            kept[group.root] = k
            if k < group.size:
                try:
                    backend.prune(group.root, choose(backend, group, k))
                except ValueError as err:
                    raise PruningError(str(err)) from None
    finally:
        torch.random.set_rng_state(rng)
        if grad_inputs is not None:
            model.zero_grad(set_to_none=True)
    return kept


def _widths(model: nn.Module) -> dict[str, int]:
    widths = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            widths[n] = m.out_channels
        elif isinstance(m, nn.Linear):
            widths[n] = m.out_features
        elif isinstance(m, nn.LSTM):
            widths[n] = m.hidden_size
    return widths


def _spec(parent, model, vector, example_input, removed, heads, groups, model_name, importance,
          round_to, seed, block_criterion) -> SubnetSpec:
    native = example_input.shape[-1] if example_input.dim() == 4 else 0
    return SubnetSpec(
        parent_id=model_name or type(parent).__name__, parent_hash=state_hash(parent), vector=vector,
        widths=_widths(model), removed_blocks=removed, resolution=vector.resolution or native,
        in_channels=example_input.shape[1] if example_input.dim() == 4 else 0,
        native_resolution=native, round_to=round_to, importance=importance, seed=seed,
        engine="generic", heads=heads, groups=groups, block_criterion=block_criterion,
        input_shape=list(example_input.shape), input_dtype=str(example_input.dtype).removeprefix("torch."),
    )


def example_from_spec(spec: SubnetSpec) -> torch.Tensor:
    """The parent's example input (zeros), as recorded in the spec."""
    dtype = getattr(torch, spec.input_dtype)
    return torch.zeros(spec.input_shape, dtype=dtype)


def _check_removed(spec: SubnetSpec, structure: ModelStructure) -> None:
    """Removed blocks must be distinct removable blocks, as many per stage as the vector says."""
    removed = list(spec.removed_blocks)
    if len(set(removed)) != len(removed):
        raise PruningError(f"removed_blocks: listed twice in {removed}")
    removable = {b: st for st in structure.depth_stages for b in st.removable}
    for b in removed:
        if b not in removable:
            raise PruningError(f"removed_blocks: {b!r} is not a removable block of this model")
    for st in structure.depth_stages:
        want = st.max_depth - spec.vector.depth.get(st.name, st.max_depth)
        got = sum(removable[b] is st for b in removed)
        if got != want:
            raise PruningError(f"removed_blocks: {got} blocks removed from {st.name}, its vector "
                               f"keeps {st.max_depth - want} of {st.max_depth}")


def rebuild(skeleton: nn.Module, spec: SubnetSpec) -> nn.Module:
    """Give a freshly built parent the structure recorded in `spec`; load the weights next."""
    example = example_from_spec(spec)
    structure = describe(skeleton, example)
    validate(spec.vector, structure)
    _check_removed(spec, structure)
    model = copy.deepcopy(skeleton).cpu().eval()
    if spec.removed_blocks:
        model = bypass(model, spec.removed_blocks)
    if structure.attention:
        keep = {n: spec.heads.get(n, k) for n, k in structure.attention.items()
                if not any(_inside(n, r) for r in spec.removed_blocks)}
        model = prune_heads(model, keep)
    recorded = dict(spec.groups)
    stages = {g.root: s.name for s in structure.channel_stages for g in s.groups}

    def first_k(_backend, group, k):
        if recorded.get(group.root) != k:
            raise PruningError(f"groups.{group.root}: spec says {recorded.get(group.root)} channels, its vector "
                               f"gives {k} (stage {stages.get(group.root)}, round_to {spec.round_to})")
        return list(range(k, group.size))

    kept = _prune_channels(model, example, structure, spec.vector, spec.removed_blocks,
                           spec.round_to, first_k, spec.seed)
    if set(kept) != set(recorded):
        raise PruningError(f"groups: spec records {sorted(set(recorded) ^ set(kept))[:5]} differently")
    if spec.vector.resolution is not None:
        model = at_resolution(model, spec.vector.resolution)
    got = _widths(model)
    if got != dict(spec.widths):
        diff = sorted(k for k in set(got) | set(spec.widths) if got.get(k) != spec.widths.get(k))
        raise PruningError(f"widths: rebuilt model differs from the spec at {diff[:5]}")
    return model
