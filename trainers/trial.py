"""One candidate, start to finish, as a stream of events (pure torch: no Ray, no MLflow).

A policy (`trainers.policies`) prunes the parent, possibly over several rounds that each yield
an `Iteration`; then every policy yields `Materialized` (cost and CKA to the parent on the
probes, before the final fine-tune), one `Epoch` per final fine-tune epoch, and `Finished`
(test accuracy and the subnet). The search layer turns these events into Ray Tune reports and
MLflow logs, and may stop consuming at any point. The steps policies share live here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from prunetune.spaces import (Cost, ModelStructure, Pruned, PruningVector, describe, measure_full_cost, prune,
                              state_hash)
from prunetune.spaces.cost import CostConfig
from prunetune.spaces.cost_cache import CostCache
from prunetune.trainers.data import DataSplits
from prunetune.trainers.distill import DistillConfig
from prunetune.trainers.distributed import DataParallel, distributed_train_epochs
from prunetune.trainers.finetune import EpochStats, Trainer, evaluate, train_epochs
from prunetune.trainers.probes import cka_to_parent, probe_features
from prunetune.trainers.recipe import TrainRecipe

if TYPE_CHECKING:
    from prunetune.trainers.policies.base import Policy


@dataclass(frozen=True)
class CandidateSetup:
    parent: nn.Module
    parent_id: str
    splits: DataSplits
    probes: torch.Tensor            # (n, C, H, W) fixed validation images
    vector: PruningVector
    recipe: TrainRecipe
    importance: str = "l2"
    round_to: int = 1
    block_criterion: str = "position"
    model_name: str = ""
    seed: int = 0
    device: torch.device = torch.device("cpu")
    structure: ModelStructure | None = None   # describe() of the parent; computed when None
    cost: CostConfig = field(default_factory=CostConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # KD from the parent while fine-tuning
    cost_cache: Path | None = None            # latency/MACs cache folder, keyed by structure
    policy: Policy | None = None              # how the candidate is pruned; None = joint
    data_parallel: DataParallel | None = None  # final fine-tune on several DeepSpeed workers


@dataclass(frozen=True)
class Materialized:
    cost: Cost
    cka: dict[str, float]
    val_acc: float                  # accuracy right after pruning, before fine-tuning
    val_loss: float
    seconds: float


@dataclass(frozen=True)
class Epoch:
    stats: EpochStats
    # The fine-tune's resumable state after this epoch (optimiser, schedule, data order; the
    # weights are the subnet's own): pass it back as `finetune_and_test(..., resume=)`.
    state: Callable[[], dict] | None = field(default=None, compare=False, repr=False)
    subnet: Pruned | None = field(default=None, compare=False, repr=False)   # the network being fine-tuned


@dataclass(frozen=True)
class Finished:
    subnet: Pruned
    test_acc: float
    test_loss: float
    seconds: float


@dataclass(frozen=True)
class Iteration:
    """One round of an iterative policy (SAP, allatonce, sparse training): logged to MLflow."""

    step: int
    metrics: dict[str, float]
    info: dict[str, str] = field(default_factory=dict)   # e.g. {"choice": "layer", "block": "layer2.2"}
    seconds: float = 0.0


Event = Materialized | Iteration | Epoch | Finished


def run_candidate(setup: CandidateSetup) -> Iterator[Event]:
    """Run the candidate's policy (`joint` when none is set): its events, in order."""
    from prunetune.trainers.policies import make_policy

    policy = setup.policy if setup.policy is not None else make_policy("joint")
    return policy.run(setup)


def example_input(setup: CandidateSetup) -> torch.Tensor:
    s = setup.splits
    return torch.zeros(1, s.in_channels, s.image_size, s.image_size)


def parent_structure(setup: CandidateSetup) -> ModelStructure:
    return setup.structure or describe(setup.parent, example_input(setup))


def cka_against_parent(setup: CandidateSetup, model: nn.Module, resolution: int | None = None) -> dict[str, float]:
    """Linear CKA of `model` to the parent on the probes, per stage end + penultimate + "mean"."""
    return cka_between(setup, setup.parent, model, resolution)


def cka_between(setup: CandidateSetup, reference: nn.Module, model: nn.Module,
                resolution: int | None = None) -> dict[str, float]:
    """Linear CKA of `model` to `reference` (the parent or a pruned version of it) on the probes.
    Stages that a bypassed block hides in either network are left out."""
    structure = parent_structure(setup)
    names = {n for n, _ in reference.named_modules()} & {n for n, _ in model.named_modules()}
    stages = [s for s in probe_stages(structure) if s in names]
    ref_feats = probe_features(reference, setup.probes, stages, classifier=structure.classifier)
    child_feats = probe_features(model, setup.probes, stages, classifier=structure.classifier,
                                 resolution=resolution)
    return cka_to_parent(ref_feats, child_feats)


def measure(setup: CandidateSetup, subnet: Pruned, t0: float) -> Materialized:
    """The pruned subnet before its final fine-tune: cost, CKA to the parent, validation accuracy."""
    splits = setup.splits
    res = subnet.spec.resolution
    cka = cka_against_parent(setup, subnet.module, res)
    model = subnet.module.to(setup.device)
    c = setup.cost
    cost = measure_full_cost(model, torch.zeros(1, splits.in_channels, res, res, device=setup.device),
                             batch=c.batch, latency=c.latency, threads=c.threads, repeats=c.repeats,
                             warmup=3, cache=CostCache(setup.cost_cache) if setup.cost_cache else None)
    val_acc, val_loss = evaluate(model, splits.val, device=setup.device, resolution=res)
    return Materialized(cost, cka, val_acc, val_loss, time.perf_counter() - t0)


def train(setup: CandidateSetup, model: nn.Module, epochs: int, **hooks) -> Iterator[EpochStats]:
    """`epochs` of the candidate's recipe (distilling from the parent if configured)."""
    recipe = setup.recipe.model_copy(update={"epochs": epochs})
    torch.manual_seed(setup.seed)
    yield from train_epochs(model.to(setup.device), setup.splits.train, setup.splits.val, recipe,
                            device=setup.device, seed=setup.seed, teacher=setup.parent,
                            distill=setup.distill, **hooks)


def credited_to_parent(setup: CandidateSetup, subnet: Pruned, provenance: str) -> Pruned:
    """A subnet pruned from a retrained copy of the parent, recorded against the parent itself
    (its hash) with the policy that chose the channels as provenance."""
    spec = subnet.spec.model_copy(update={"parent_hash": state_hash(setup.parent), "importance": provenance})
    return Pruned(subnet.module, spec)


def finetune_and_test(setup: CandidateSetup, subnet: Pruned, *, resume: dict | None = None) -> Iterator[Epoch | Finished]:
    """The final fine-tune every policy ends with (the `finetune` recipe), then test accuracy.

    With `resume` (an `Epoch.state()` of an earlier run, `subnet` holding that epoch's
    weights) it continues after that epoch instead of starting over: how a trial restored from
    its checkpoint after losing its node picks up.
    """
    splits = setup.splits
    res = subnet.spec.resolution
    if setup.data_parallel is not None:
        yield from _finetune_data_parallel(setup, subnet, resume)
    else:
        torch.manual_seed(setup.seed)
        trainer = Trainer(subnet.module, splits.train, splits.val, setup.recipe, device=setup.device, resolution=res,
                          seed=setup.seed, teacher=setup.parent, distill=setup.distill)
        if resume is not None:
            trainer.load_state_dict(resume)
        for stats in trainer.epochs():
            yield Epoch(stats, state=trainer.state_dict, subnet=subnet)
    model = subnet.module.to(setup.device)
    t1 = time.perf_counter()
    test_acc, test_loss = evaluate(model, splits.test, device=setup.device, resolution=res)
    model.cpu().eval()
    yield Finished(subnet, test_acc, test_loss, time.perf_counter() - t1)


def _finetune_data_parallel(setup: CandidateSetup, subnet: Pruned, resume: dict | None) -> Iterator[Epoch]:
    """The final fine-tune on DeepSpeed workers; the subnet takes each epoch's gathered weights.
    Resuming restores the weights and the schedule's position, not SGD momentum (see
    `trainers.distributed`)."""
    dp = setup.data_parallel
    start = int(resume["epoch"]) if resume is not None else 0
    for stats, weights in distributed_train_epochs(
            subnet.module.cpu(), setup.splits.train, setup.splits.val, setup.recipe, workers=dp.workers,
            cpus_per_worker=dp.cpus, gpus_per_worker=dp.gpus, ds=dp.ds, resolution=subnet.spec.resolution,
            seed=setup.seed, teacher=setup.parent, distill=setup.distill, start_epoch=start):
        subnet.module.load_state_dict(weights)
        yield Epoch(stats, state=lambda e=stats.epoch: {"epoch": e}, subnet=subnet)


def probe_stages(structure: ModelStructure) -> list[str]:
    """Modules whose outputs CKA compares: the end of every stage of blocks (real module
    names, present in parent and subnet alike); the penultimate features are always added."""
    return [st.name for st in structure.depth_stages]
