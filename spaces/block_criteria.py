"""Which removable blocks to drop first, by name of a criterion.

A criterion scores blocks, lower = dropped first: `score(model, blocks, *, probes=None)`
returns one float per block name. Data-driven criteria compare the model's outputs with and
without each block on `probes` (a batch of inputs). Register a new one with
`@register_block_criterion("name", needs_probes=...)` and the registry-driven tests cover it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from prunetune.spaces.blocks import bypassed

ScoreFn = Callable[..., dict[str, float]]


@dataclass(frozen=True)
class BlockCriterion:
    """A registered scorer; calling it checks that data-driven criteria got probes."""

    name: str
    fn: ScoreFn
    needs_probes: bool = False

    def __call__(self, model: nn.Module, blocks: Sequence[str], *,
                 probes: torch.Tensor | None = None) -> dict[str, float]:
        self.check_probes(probes)
        return self.fn(model, list(blocks), probes=probes)

    def check_probes(self, probes: torch.Tensor | None) -> None:
        if self.needs_probes and probes is None:
            raise ValueError(f"block criterion {self.name!r} is data-driven: pass probes "
                             "(a batch of example inputs)")


BLOCK_CRITERIA: dict[str, BlockCriterion] = {}


def register_block_criterion(name: str, *, needs_probes: bool = False):
    def deco(fn: ScoreFn) -> ScoreFn:
        BLOCK_CRITERIA[name] = BlockCriterion(name, fn, needs_probes)
        return fn
    return deco


def get_block_criterion(name: str) -> BlockCriterion:
    try:
        return BLOCK_CRITERIA[name]
    except KeyError:
        raise KeyError(f"unknown block criterion {name!r}; known: {sorted(BLOCK_CRITERIA)}") from None


def choose_blocks_to_drop(model: nn.Module, stage_blocks: Sequence[str], n_drop: int,
                          criterion: str, *, probes: torch.Tensor | None = None) -> list[str]:
    """The `n_drop` lowest-scoring of `stage_blocks`, lowest first; ties drop the later block."""
    stage_blocks = list(stage_blocks)
    if not 0 <= n_drop <= len(stage_blocks):
        raise ValueError(f"n_drop must be in [0, {len(stage_blocks)}], got {n_drop}")
    crit = get_block_criterion(criterion)
    crit.check_probes(probes)
    if n_drop == 0:
        return []
    scores = crit(model, stage_blocks, probes=probes)
    order = sorted(range(len(stage_blocks)), key=lambda i: (scores[stage_blocks[i]], -i))
    return [stage_blocks[i] for i in order[:n_drop]]


@register_block_criterion("position")
def _position(model, blocks, *, probes=None):
    """The last block of a stage goes first (depth pruning as in materialize)."""
    del probes
    scores = {}
    for name in blocks:
        parent, _, attr = name.rpartition(".")
        container = model.get_submodule(parent) if parent else model
        scores[name] = -float([n for n, _ in container.named_children()].index(attr))
    return scores


@register_block_criterion("weight_norm")
def _weight_norm(model, blocks, *, probes=None):
    """Mean absolute parameter value; a block without parameters scores 0."""
    del probes
    scores = {}
    for name in blocks:
        params = [p.detach().abs().flatten().double() for p in model.get_submodule(name).parameters()]
        scores[name] = float(torch.cat(params).mean()) if params else 0.0
    return scores


@register_block_criterion("kl", needs_probes=True)
def _kl(model, blocks, *, probes=None):
    """Mean KL(p_full || p_bypassed) of the softmax outputs on the probes."""
    with _evaluating(model):
        log_p = torch.log_softmax(model(probes).double(), dim=-1)
        scores = {}
        for name in blocks:
            with bypassed(model, [name]):
                log_q = torch.log_softmax(model(probes).double(), dim=-1)
            scores[name] = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    return scores


@register_block_criterion("cka", needs_probes=True)
def _cka(model, blocks, *, probes=None):
    """1 - linear CKA of the penultimate features (input of the last nn.Linear)."""
    if probes.shape[0] < 2:
        raise ValueError(f"block criterion 'cka' needs at least 2 probes, got {probes.shape[0]}")
    head = _last_linear(model)
    with _evaluating(model):
        full = _features(model, head, probes)
        scores = {}
        for name in blocks:
            with bypassed(model, [name]):
                scores[name] = 1.0 - linear_cka(full, _features(model, head, probes))
    return scores


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) of (n, ...) features in float64; 1 = same up to
    rotation and scale."""
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    num = torch.linalg.matrix_norm(y.T @ x) ** 2
    den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(num / den) if den > 0 else 0.0


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the duration; every module's mode is restored."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__}: no nn.Linear, so no penultimate features for 'cka'")
    return linears[-1]


def _features(model: nn.Module, head: nn.Linear, probes: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        model(probes)
    finally:
        handle.remove()
    return seen[-1]
