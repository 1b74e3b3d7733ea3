"""Find the residual blocks of any model from one traced forward pass, and bypass them.

A module is a removable block when its output has its input's shape and is `x + f(x)`
(optionally under an elementwise activation, optionally through nested additions as in
ViT and Swin blocks), with `f` really reading `x`. This is read off the autograd graph,
not class names: from the output's node, walk down through additions to the input's node
without crossing any other op (conv, norm, mul by a layer scale, projection...). Replacing
such a module by `nn.Identity` keeps every shape valid, so depth can be searched on models
this package has never seen. A block's stage is its parent container.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

# Autograd node names (trailing version digits stripped) that may sit between the output
# and the top addition: elementwise activations and value-preserving copies/views.
_TOP_UNARY = frozenset({
    "ReluBackward", "HardtanhBackward", "LeakyReluBackward", "EluBackward", "CeluBackward",
    "GeluBackward", "SiluBackward", "MishBackward", "HardswishBackward", "HardsigmoidBackward",
    "SigmoidBackward", "TanhBackward", "SoftplusBackward", "ThresholdBackward",
})
# Value-preserving nodes, allowed anywhere on the skip path.
_PASS_THROUGH = frozenset({
    "CloneBackward", "ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward",
    "AliasBackward", "ToCopyBackward",
})
_ADD = "AddBackward"
_TOP = _TOP_UNARY | _PASS_THROUGH


@dataclass(frozen=True)
class ResidualBlock:
    """A removable block: qualified `name`, its parent container `stage` and its `index` there."""

    name: str
    stage: str
    index: int


@dataclass(frozen=True)
class StageInfo:
    """A container holding removable blocks.

    `children` are all its children in order (blocks or not), `removable` the blocks among
    them. Rule: non-removable children always stay and a stage never loses every child, so
    `min_depth = max(1, len(children) - len(removable))` children are always kept.
    """

    name: str
    children: tuple[str, ...]
    removable: tuple[str, ...]
    min_depth: int

    @property
    def max_depth(self) -> int:
        return len(self.children)

    @property
    def max_drop(self) -> int:
        """How many removable blocks may go at most."""
        return self.max_depth - self.min_depth


def find_residual_blocks(model: nn.Module, example_input: torch.Tensor) -> list[ResidualBlock]:
    """The removable residual blocks of `model`, in module order.

    Runs one forward pass in eval mode with grad enabled (BN statistics are not updated, no
    backward is run), then restores every module's train/eval mode and requires_grad flag.
    When a module and a descendant produce the same output (a wrapper, or a Sequential and
    its last block) only the innermost is kept.
    """
    calls = _trace(model, example_input)
    candidates = {}
    for name, _ in model.named_modules():
        module_calls = calls.get(name)
        if module_calls and all(_is_residual_call(*c) for c in module_calls):
            candidates[name] = {id(c[2]) for c in module_calls}
    kept = [name for name, outs in candidates.items()
            if not any(other.startswith(name + ".") and outs & other_outs
                       for other, other_outs in candidates.items())]
    return [ResidualBlock(name=n, stage=_parent_name(n), index=_child_index(model, n))
            for n in kept]


def group_stages(model: nn.Module, blocks: Iterable[ResidualBlock]) -> list[StageInfo]:
    """One `StageInfo` per container holding blocks, in the order their blocks come."""
    by_stage: dict[str, list[str]] = {}
    for b in blocks:
        by_stage.setdefault(b.stage, []).append(b.name)
    stages = []
    for stage, removable in by_stage.items():
        container = model.get_submodule(stage) if stage else model
        prefix = f"{stage}." if stage else ""
        children = tuple(prefix + n for n, _ in container.named_children())
        stranger = [b for b in removable if b not in children]
        if stranger:
            raise ValueError(f"{stranger[0]!r} is not a child of stage {stage!r}")
        stages.append(StageInfo(name=stage, children=children, removable=tuple(removable),
                                min_depth=max(1, len(children) - len(set(removable)))))
    return stages


def bypass(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """A deep copy of `model` with the named blocks replaced by `nn.Identity`."""
    names = list(names)
    for name in names:
        _check_name(model, name)
    clone = copy.deepcopy(model)
    for name in names:
        _set_child(clone, name, nn.Identity())
    return clone


@contextlib.contextmanager
def bypassed(model: nn.Module, names: Iterable[str]) -> Iterator[nn.Module]:
    """Bypass the named blocks of `model` itself for the duration; restored on exit.

    Cheaper than `bypass` when scoring many blocks of a large model one at a time.
    """
    names = list(names)
    for name in names:
        _check_name(model, name)
    originals = []
    try:
        for name in names:
            originals.append((name, _set_child(model, name, nn.Identity())))
        yield model
    finally:
        for name, original in reversed(originals):
            _set_child(model, name, original)


def _trace(model: nn.Module, example_input: torch.Tensor) -> dict[str, list[tuple]]:
    """Per module, one (input node, input shape, output node, output shape) per call.

    Input nodes are taken before the module runs, so in-place ops inside it do not hide them.
    Only calls with exactly one tensor argument and a tensor output are recorded.
    """
    calls: dict[str, list[tuple]] = {}
    pending: dict[str, list] = {}
    handles = []

    def pre_hook(name):
        def hook(module, args, kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensor_kwargs = any(isinstance(v, torch.Tensor) for v in kwargs.values())
            ok = len(tensors) == 1 and not tensor_kwargs and tensors[0].grad_fn is not None
            pending.setdefault(name, []).append(
                (tensors[0].grad_fn, tensors[0].shape) if ok else None)
        return hook

    def post_hook(name):
        def hook(module, args, output):
            entry = pending[name].pop()
            calls.setdefault(name, [])
            if entry is None or not isinstance(output, torch.Tensor) or output.grad_fn is None:
                calls[name].append((None, None, None, None))
            else:
                calls[name].append((*entry, output.grad_fn, output.shape))
        return hook

    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
                handles.append(module.register_forward_hook(post_hook(name)))
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            # Frozen parameters or an integer input (token ids) must not cut the graph.
            for p in grads:
                p.requires_grad_(True)
            x = example_input.detach().clone()
            if x.is_floating_point():
                # The second clone gives the model input a node, like every later tensor.
                x = x.requires_grad_(True).clone()
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
        for p, requires_grad in grads.items():
            p.requires_grad_(requires_grad)
    return calls


def _is_residual_call(in_node, in_shape, out_node, out_shape) -> bool:
    if in_node is None or out_node is None or in_shape != out_shape:
        return False
    node = out_node
    while node is not in_node and _kind(node) in _TOP:
        node = _single_input(node)
    stack, seen = [node], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen or _kind(node) != _ADD:
            continue
        seen.add(node)
        edges = [f for f, _ in node.next_functions]
        for i, child in enumerate(edges):
            child = _through_copies(child, in_node)
            if child is in_node:
                branches = edges[:i] + edges[i + 1:]
                if any(_reaches(b, in_node) for b in branches):
                    return True
            else:
                stack.append(child)
    return False


def _reaches(start, target) -> bool:
    """True when `target` is an ancestor of autograd node `start` (f really reads x)."""
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node is target:
            return True
        seen.add(node)
        stack.extend(f for f, _ in node.next_functions)
    return False


def _kind(node) -> str:
    return type(node).__name__.rstrip("0123456789") if node is not None else ""


def _single_input(node):
    inputs = [f for f, _ in node.next_functions if f is not None]
    return inputs[0] if len(inputs) == 1 else None


def _through_copies(node, stop):
    while node is not None and node is not stop and _kind(node) in _PASS_THROUGH:
        node = _single_input(node)
    return node


def _parent_name(name: str) -> str:
    return name.rpartition(".")[0]


def _child_index(model: nn.Module, name: str) -> int:
    parent = _parent_name(name)
    container = model.get_submodule(parent) if parent else model
    return [n for n, _ in container.named_children()].index(name.rpartition(".")[2])


def _check_name(model: nn.Module, name: str) -> None:
    if not name:
        raise ValueError("cannot bypass the whole model (empty block name)")
    try:
        model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{name!r}: no such module in {type(model).__name__}") from None


def _set_child(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the module at `name`; works for Sequential, ModuleList/Dict and attributes."""
    parent, _, attr = name.rpartition(".")
    container = model.get_submodule(parent) if parent else model
    old = container.get_submodule(attr)
    setattr(container, attr, new)
    return old
