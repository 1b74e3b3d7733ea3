"""CKA early selection: stop weak candidates before (and while) they are fine-tuned.

No existing tool does this for a multi-objective pruning search: Optuna takes no intermediate
values in multi-objective studies and every Ray scheduler ranks one metric. Two stages:

1. Pruned, before any fine-tuning, each trial reports its cost and its CKA to the parent. After
   `warmup` trials have, a candidate stops when its (CKA up, cost down) point is dominated by
   at least `dominated_by` candidates already seen, or when its CKA is below the
   `bucket_quantile` of the candidates in its cost bucket (costs split into `buckets` by
   quantile; a bucket needs `warmup` members).
2. Survivors go through asynchronous multi-objective successive halving on (validation
   accuracy, cost): at each rung (an epoch count) a trial continues only if, ranked among the
   trials that reached that rung by non-dominated rank then accuracy, it is in the best
   1/`reduction_factor` (a rung decides once it holds `reduction_factor` trials).

`EarlySelection` is the pure decision logic; `CKAEarlySelectionScheduler` plugs it into Ray Tune.
The reason for every stop is kept so the driver can record it in MLflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from prunetune.search.pareto import non_dominated_sort

CONTINUE, STOP = "CONTINUE", "STOP"


class EarlySelectionConfig(BaseModel):
    """The `early_stop` section: off by default."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    warmup: int = Field(default=4, ge=1, description="candidates seen before any is stopped")
    dominated_by: int | None = Field(default=2, ge=1, description="stop when this many seen candidates have higher "
                                     "CKA and lower cost (null: off)")
    bucket_quantile: float | None = Field(default=0.25, gt=0, lt=1, description="stop below this CKA quantile of the "
                                          "candidate's cost bucket (null: off)")
    buckets: int = Field(default=3, ge=1, description="cost buckets (by quantile of the costs seen)")
    rungs: list[int] = Field(default_factory=lambda: [1], description="fine-tune epochs at which successive halving "
                             "compares (validation accuracy, cost); [] = off")
    reduction_factor: int = Field(default=2, ge=2, description="keep the best 1/this at each rung")


@dataclass
class EarlySelection:
    cfg: EarlySelectionConfig
    seen: dict[str, tuple[float, float]] = field(default_factory=dict)          # trial -> (cka, cost)
    rungs: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)  # epoch -> trial -> (acc, cost)
    reasons: dict[str, str] = field(default_factory=dict)

    def on_pruned(self, trial: str, cka: float, cost: float) -> str:
        """Decision for a candidate right after pruning (before it is fine-tuned)."""
        earlier = dict(self.seen)
        self.seen[trial] = (cka, cost)
        if len(earlier) < self.cfg.warmup:
            return CONTINUE
        if self.cfg.dominated_by is not None:
            n = sum(c >= cka and k <= cost and (c > cka or k < cost) for c, k in earlier.values())
            if n >= self.cfg.dominated_by:
                return self._stop(trial, f"dominated in (CKA, cost) by {n} earlier candidates "
                                         f"(CKA {cka:.3f}, cost {cost:.4g})")
        if self.cfg.bucket_quantile is not None:
            peers = [c for c, _ in self._bucket(cost)]
            if len(peers) >= self.cfg.warmup:
                cut = _quantile(peers, self.cfg.bucket_quantile)
                if cka < cut:
                    return self._stop(trial, f"CKA {cka:.3f} below the {self.cfg.bucket_quantile:.0%} quantile "
                                             f"({cut:.3f}) of {len(peers)} candidates of similar cost")
        return CONTINUE

    def on_epoch(self, trial: str, epoch: int, acc: float, cost: float) -> str:
        """Decision at a fine-tune epoch; only rung epochs can stop a trial."""
        if epoch not in self.cfg.rungs:
            return CONTINUE
        rung = self.rungs.setdefault(epoch, {})
        rung[trial] = (acc, cost)
        if len(rung) < self.cfg.reduction_factor:
            return CONTINUE
        ids = list(rung)
        ranks = non_dominated_sort([list(rung[i]) for i in ids], ["max", "min"])
        order = sorted(range(len(ids)), key=lambda j: (ranks[j], -rung[ids[j]][0]))
        keep = max(1, math.floor(len(ids) / self.cfg.reduction_factor))
        position = order.index(ids.index(trial))
        if position >= keep:
            return self._stop(trial, f"rung {epoch}: ranked {position + 1} of {len(ids)} on (val_acc, cost), "
                                     f"only the best {keep} continue")
        return CONTINUE

    def _bucket(self, cost: float) -> list[tuple[float, float]]:
        costs = sorted(k for _, k in self.seen.values())
        edges = [_quantile(costs, b / self.cfg.buckets) for b in range(1, self.cfg.buckets)]
        index = sum(cost > e for e in edges)
        return [(c, k) for c, k in self.seen.values() if sum(k > e for e in edges) == index]

    def _stop(self, trial: str, reason: str) -> str:
        self.reasons[trial] = reason
        return STOP


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile of a non-empty list."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def make_scheduler(cfg: EarlySelectionConfig, cost_metric: str):
    """The Ray Tune scheduler (Ray is imported here, not at module import)."""
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    class CKAEarlySelectionScheduler(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self.selection = EarlySelection(cfg)

        def on_trial_result(self, tune_controller, trial, result):
            if result.get("epoch") == 0 and "cka" in result and cost_metric in result:
                decision = self.selection.on_pruned(trial.trial_id, float(result["cka"]), float(result[cost_metric]))
            elif "val_acc" in result and cost_metric in result and not result.get("trial_complete"):
                decision = self.selection.on_epoch(trial.trial_id, int(result.get("epoch", 0)),
                                                   float(result["val_acc"]), float(result[cost_metric]))
            else:
                decision = CONTINUE
            return TrialScheduler.STOP if decision == STOP else TrialScheduler.CONTINUE

        def debug_string(self) -> str:
            return f"CKA early selection: {len(self.selection.reasons)} stopped of {len(self.selection.seen)} seen"

    return CKAEarlySelectionScheduler()
