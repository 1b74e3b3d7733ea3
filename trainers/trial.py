"""One candidate, start to finish, as a stream of events (pure torch: no Ray, no MLflow).

materialize the vector -> cost and CKA to the parent on the probes (before any training)
-> fine-tune, one event per epoch -> test accuracy and the subnet. The search layer turns
these events into Ray Tune reports and MLflow logs, and may stop consuming at any point.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunetune.spaces import Cost, ModelStructure, Pruned, PruningVector, describe, measure_full_cost, prune
from prunetune.spaces.cost import CostConfig
from prunetune.spaces.cost_cache import CostCache
from prunetune.trainers.data import DataSplits
from prunetune.trainers.distill import DistillConfig
from prunetune.trainers.finetune import EpochStats, evaluate, train_epochs
from prunetune.trainers.probes import cka_to_parent, probe_features
from prunetune.trainers.recipe import TrainRecipe


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


@dataclass(frozen=True)
class Finished:
    subnet: Pruned
    test_acc: float
    test_loss: float
    seconds: float


def run_candidate(setup: CandidateSetup) -> Iterator[Materialized | Epoch | Finished]:
    t0 = time.perf_counter()
    splits = setup.splits
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    structure = setup.structure or describe(setup.parent, example)
    subnet = prune(setup.parent, setup.vector, example, model_name=setup.model_name,
                   importance=setup.importance, round_to=setup.round_to,
                   block_criterion=setup.block_criterion, probes=setup.probes,
                   structure=structure, seed=setup.seed)
    res = subnet.spec.resolution
    stages = probe_stages(structure)
    parent_feats = probe_features(setup.parent, setup.probes, stages, classifier=structure.classifier)
    child_feats = probe_features(subnet.module, setup.probes, stages, classifier=structure.classifier,
                                 resolution=res)
    cka = cka_to_parent(parent_feats, child_feats)
    model = subnet.module.to(setup.device)
    c = setup.cost
    cost = measure_full_cost(model, torch.zeros(1, splits.in_channels, res, res, device=setup.device),
                             batch=c.batch, latency=c.latency, threads=c.threads, repeats=c.repeats,
                             warmup=3, cache=CostCache(setup.cost_cache) if setup.cost_cache else None)
    val_acc, val_loss = evaluate(model, splits.val, device=setup.device, resolution=res)
    yield Materialized(cost, cka, val_acc, val_loss, time.perf_counter() - t0)

    torch.manual_seed(setup.seed)
    for stats in train_epochs(model, splits.train, splits.val, setup.recipe, device=setup.device,
                              resolution=res, seed=setup.seed, teacher=setup.parent, distill=setup.distill):
        yield Epoch(stats)
    t1 = time.perf_counter()
    test_acc, test_loss = evaluate(model, splits.test, device=setup.device, resolution=res)
    model.cpu().eval()
    yield Finished(subnet, test_acc, test_loss, time.perf_counter() - t1)


def probe_stages(structure: ModelStructure) -> list[str]:
    """Modules whose outputs CKA compares: the end of every stage of blocks (real module
    names, present in parent and subnet alike); the penultimate features are always added."""
    return [st.name for st in structure.depth_stages]
