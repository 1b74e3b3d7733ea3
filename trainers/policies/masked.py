"""The working network of an iterative policy: the parent's full shape, blocks bypassed and
channels switched off by masks, so every decision stays in the parent's coordinates.

`materialize` removes what is switched off for real (`engine.prune` with explicit blocks and
channels) and gives a `Pruned` whose spec rebuilds from the parent like any other subnet.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from prunetune.spaces import Pruned, exact_vector, prune
from prunetune.spaces.backend import TorchPruningBackend
from prunetune.spaces.blocks import bypass
from prunetune.spaces.engine import ModelStructure
from prunetune.spaces.importance import get_importance
from prunetune.spaces.masks import Masks, apply_masks, group_masks, merge
from prunetune.trainers.finetune import EpochStats
from prunetune.trainers.trial import CandidateSetup, credited_to_parent, example_input, parent_structure, train


def _inside(name: str, block: str) -> bool:
    return name == block or name.startswith(block + ".")


class MaskedNet:
    """A full-size copy of the parent plus what has been removed from it so far."""

    def __init__(self, setup: CandidateSetup, *, coupled: bool = True):
        self.setup = setup
        self.structure: ModelStructure = parent_structure(setup)
        self.example = example_input(setup)
        self.model: nn.Module = copy.deepcopy(setup.parent).cpu().eval()
        self.removed: list[str] = []
        self.sizes = {g.root: g.size for s in self.structure.channel_stages for g in s.groups
                      if coupled or not g.coupled}
        self.alive: dict[str, list[int]] = {r: list(range(n)) for r, n in self.sizes.items()}
        self.masks: Masks = {}
        self._macs: dict[tuple, int] = {}   # by structure (blocks removed, channels kept); shared by copies

    def copy(self) -> MaskedNet:
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model)
        other.removed = list(self.removed)
        other.alive = {k: list(v) for k, v in self.alive.items()}
        other.masks = {k: v.clone() for k, v in self.masks.items()}
        return other

    # -- what can still be removed -------------------------------------------------------
    def groups(self) -> list[str]:
        """Roots of groups still in the network (not inside a bypassed block)."""
        return [r for r in self.alive if not any(_inside(r, b) for b in self.removed)]

    def removable_blocks(self, min_blocks: int = 1) -> list[str]:
        out = []
        for st in self.structure.depth_stages:
            gone = [b for b in st.removable if b in self.removed]
            if st.max_depth - len(gone) > max(min_blocks, st.min_depth):
                out += [b for b in st.removable if b not in self.removed]
        return out

    def channel_scores(self, importance: str = "l2") -> dict[str, torch.Tensor]:
        """{root: score per channel} on the current weights (switched-off channels score 0)."""
        return channel_scores(self.model, self.example, self.structure.classifier, self.groups(), importance)

    # -- removing ------------------------------------------------------------------------
    def drop_block(self, name: str) -> None:
        self.model = bypass(self.model, [name])
        self.removed.append(name)

    def switch_off(self, off: dict[str, list[int]]) -> None:
        """Switch off channels `off[root]` (indices into the full group)."""
        off = {r: sorted(set(i) & set(self.alive[r])) for r, i in off.items()}
        off = {r: i for r, i in off.items() if i}
        if not off:
            return
        for r, idxs in off.items():
            if len(idxs) >= len(self.alive[r]):
                raise ValueError(f"{r}: cannot switch off all {len(self.alive[r])} remaining channels")
            self.alive[r] = [i for i in self.alive[r] if i not in set(idxs)]
        new = group_masks(self.model, self.example, off, ignored=(self.structure.classifier,))
        self.masks = merge(self.masks, new)
        apply_masks(self.model, self.masks)

    def reapply(self, model: nn.Module | None = None) -> None:
        apply_masks(model if model is not None else self.model, self.masks)

    # -- training and the result ---------------------------------------------------------
    def train(self, epochs: int, **hooks) -> Iterator[EpochStats]:
        """Fine-tune with the masks held (re-applied after every optimiser step)."""
        masks = self.masks
        yield from train(self.setup, self.model, epochs, after_step=lambda m: apply_masks(m, masks), **hooks)
        self.model.cpu().eval()

    def materialize(self, provenance: str) -> Pruned:
        """The physically smaller subnet, its spec relative to the parent."""
        keep = {r: self.alive[r] for r in self.groups()}
        vector = exact_vector(self.structure, self.removed, keep)
        pruned = prune(self.model, vector, self.example, model_name=self.setup.model_name, importance="l2",
                       structure=self.structure, seed=self.setup.seed, drop_blocks=self.removed, keep=keep)
        pruned.module.eval()
        return credited_to_parent(self.setup, pruned, provenance)

    def macs(self) -> int:
        """MACs of the physical subnet; they depend only on which blocks and how many channels remain."""
        from prunetune.spaces.cost import measure_cost

        key = (tuple(sorted(self.removed)), tuple(len(self.alive[r]) for r in self.groups()))
        if key not in self._macs:
            self._macs[key] = measure_cost(self.materialize("count").module, example_input=self.example).macs
        return self._macs[key]


def channel_scores(model: nn.Module, example: torch.Tensor, classifier: str, roots: list[str],
                   importance: str) -> dict[str, torch.Tensor]:
    """{root: one float64 score per channel of its group} for `model` as it is now."""
    backend = TorchPruningBackend(model, example, ignored=(classifier,))
    scorer = get_importance(importance)
    return {r: backend.scores(r, scorer).detach().double() for r in roots}
