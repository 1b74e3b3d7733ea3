"""Numerical-gradient search over the joint pruning vector (after JointPruning, Liu et al. 2021).

The paper's estimator is not public (PAPERS.md section 2); this is the documented [ours] form.
The vector is relaxed to x in [0, 1]^D (channel keep ratios within their range, depth and the
resolution index scaled to [0, 1]). Each iteration evaluates the centre and N antithetic pairs
x +- sigma * eps_i (eps_i ~ N(0, I), 2N + 1 parallel trials); with f the scalarised objective
the gradient estimate is

    g = 1 / (2 N sigma) * sum_i (f(x + sigma eps_i) - f(x - sigma eps_i)) eps_i,

x moves by -lr * g / ||g|| (a step of fixed length, robust to the scale of f), is projected
onto the cost constraint (channel ratios scaled down together, by bisection on a multiplier,
until the MACs fit) and clipped to the box. sigma adapts: it grows when the pairs' differences
are lost in noise (|f+ - f-| below `noise` on average) and shrinks otherwise. Depth and
resolution are rounded to valid values when a point is turned into a vector.

f is the validation loss after fine-tuning plus a cost term: `penalty * max(0, macs / target
- 1)` (loss under a MACs constraint) or `penalty * macs / parent_macs` (a cost penalty).
`NumericalGradient` is the pure optimiser; `make_searcher` wraps it as a Ray Tune Searcher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import optuna
from pydantic import BaseModel, ConfigDict, Field


class GradientConfig(BaseModel):
    """`sampler.gradient`: the numerical-gradient searcher's settings."""

    model_config = ConfigDict(extra="forbid")

    pairs: int = Field(default=2, ge=1, description="antithetic pairs per iteration (2N+1 trials with the centre)")
    sigma: float = Field(default=0.15, gt=0, le=0.5, description="initial perturbation size in the unit box")
    lr: float = Field(default=0.2, gt=0, description="step length in the unit box")
    noise: float = Field(default=0.01, ge=0, description="|f+ - f-| below this on average counts as noise: sigma grows")
    objective: Literal["constraint", "penalty"] = Field(
        default="constraint", description="loss + penalty*max(0, macs/target - 1), or loss + penalty*macs/parent")
    penalty: float = Field(default=1.0, ge=0)
    target_macs_ratio: float = Field(default=0.5, gt=0, le=1, description="MACs target as a share of the parent's")
    start: float = Field(default=0.75, ge=0, le=1, description="initial point: this position in every coordinate's range")


@dataclass
class Coordinate:
    key: str
    values: list[Any] | None      # discrete values (depth, resolution), None for a continuous ratio
    low: float = 0.0
    high: float = 1.0
    step: float | None = None     # ratios snap to low + k * step, as the other samplers' grid

    def decode(self, u: float) -> Any:
        u = min(max(u, 0.0), 1.0)
        if self.values is not None:
            return self.values[int(round(u * (len(self.values) - 1)))]
        value = self.low + u * (self.high - self.low)
        if self.step:
            value = min(self.high, self.low + round((value - self.low) / self.step) * self.step)
        return value


def coordinates(distributions: dict[str, optuna.distributions.BaseDistribution]) -> list[Coordinate]:
    """The relaxed coordinates of a vector space (Optuna distributions keyed by vector names)."""
    out = []
    for key, d in distributions.items():
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            out.append(Coordinate(key, sorted(d.choices)))
        elif isinstance(d, optuna.distributions.IntDistribution):
            out.append(Coordinate(key, list(range(d.low, d.high + 1, d.step))))
        else:
            out.append(Coordinate(key, None, d.low, d.high, d.step))
    return out


@dataclass
class NumericalGradient:
    """Ask for points (2N+1 per iteration), tell their objective, and x moves downhill."""

    coords: list[Coordinate]
    cfg: GradientConfig
    project: Callable[[np.ndarray], np.ndarray] = lambda x: x
    seed: int = 0
    x: np.ndarray = field(init=False)
    sigma: float = field(init=False)
    iteration: int = 0
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        self.x = self.project(np.full(len(self.coords), self.cfg.start))
        self.sigma = self.cfg.sigma
        self._batch: dict[str, np.ndarray] = {}
        self._eps: list[np.ndarray] = []
        self._values: dict[str, float] = {}
        self._queue: list[str] = []

    def _new_batch(self) -> None:
        self._eps = [self.rng.standard_normal(len(self.coords)) for _ in range(self.cfg.pairs)]
        self._batch = {"c": self.x.copy()}
        for i, e in enumerate(self._eps):
            self._batch[f"+{i}"] = np.clip(self.x + self.sigma * e, 0, 1)
            self._batch[f"-{i}"] = np.clip(self.x - self.sigma * e, 0, 1)
        self._values = {}
        self._queue = list(self._batch)

    def ask(self) -> tuple[str, np.ndarray] | None:
        """The next point of the current iteration, or None while its points are still running."""
        if not self._batch:
            self._new_batch()
        if not self._queue:
            return None
        name = self._queue.pop(0)
        return f"{self.iteration}:{name}", self._batch[name]

    def tell(self, point: str, value: float | None) -> None:
        """Record a point's objective (None: the trial failed; its pair then counts as flat)."""
        it, name = point.split(":")
        if int(it) != self.iteration:
            return
        self._values[name] = value if value is not None and math.isfinite(value) else math.nan
        if len(self._values) == len(self._batch):
            self._step()

    def _step(self) -> None:
        diffs = []
        g = np.zeros(len(self.coords))
        for i, e in enumerate(self._eps):
            d = self._values[f"+{i}"] - self._values[f"-{i}"]
            if math.isnan(d):
                continue
            diffs.append(abs(d))
            g += d * e
        g /= 2 * self.cfg.pairs * self.sigma
        norm = float(np.linalg.norm(g))
        moved = norm > 0
        if moved:
            self.x = self.project(np.clip(self.x - self.cfg.lr * g / norm, 0, 1))
        mean_diff = float(np.mean(diffs)) if diffs else 0.0
        self.history.append({"iteration": self.iteration, "f_centre": self._values.get("c", math.nan),
                             "sigma": self.sigma, "grad_norm": norm, "mean_abs_diff": mean_diff})
        self.sigma = min(0.5, self.sigma * 1.5) if mean_diff < self.cfg.noise else max(0.02, self.sigma * 0.8)
        self.iteration += 1
        self._batch = {}

    def decode(self, u: np.ndarray) -> dict[str, Any]:
        return {c.key: c.decode(float(v)) for c, v in zip(self.coords, u)}


def scalarise(cfg: GradientConfig, val_loss: float, macs: float, parent_macs: float) -> float:
    if cfg.objective == "constraint":
        return val_loss + cfg.penalty * max(0.0, macs / (cfg.target_macs_ratio * parent_macs) - 1.0)
    return val_loss + cfg.penalty * macs / parent_macs


def projector(coords: list[Coordinate], macs_of: Callable[[dict[str, Any]], float], budget: float):
    """x -> x with every channel ratio scaled by the largest multiplier in [0, 1] whose MACs fit
    `budget` (bisection; depth and resolution are left as they are)."""
    channel = [i for i, c in enumerate(coords) if c.values is None]

    def decode(x):
        return {c.key: c.decode(float(v)) for c, v in zip(coords, x)}

    def project(x: np.ndarray) -> np.ndarray:
        if not channel or macs_of(decode(x)) <= budget:
            return x
        lo, hi = 0.0, 1.0
        for _ in range(12):
            mid = (lo + hi) / 2
            y = x.copy()
            y[channel] = x[channel] * mid
            if macs_of(decode(y)) <= budget:
                lo = mid
            else:
                hi = mid
        y = x.copy()
        y[channel] = x[channel] * lo
        return y

    return project


def make_searcher(opt: NumericalGradient, cfg: GradientConfig, parent_macs: float, fixed: dict[str, Any]):
    """The Ray Tune Searcher around `opt` (Ray imported here)."""
    from ray.tune.search import Searcher

    class NumericalGradientSearcher(Searcher):
        def __init__(self):
            super().__init__(metric="val_loss", mode="min")
            self.points: dict[str, str] = {}
            self.last: dict[str, dict] = {}

        def suggest(self, trial_id):
            asked = opt.ask()
            if asked is None:
                return None
            point, u = asked
            self.points[trial_id] = point
            return {**opt.decode(u), **fixed, "gradient.point": point}

        def on_trial_result(self, trial_id, result):
            self.last[trial_id] = {**self.last.get(trial_id, {}), **result}

        def on_trial_complete(self, trial_id, result=None, error=False):
            seen = {**self.last.pop(trial_id, {}), **(result or {})}
            value = None
            if not error and seen.get("trial_complete") and "val_loss" in seen and "macs" in seen:
                value = scalarise(cfg, float(seen["val_loss"]), float(seen["macs"]), parent_macs)
            if trial_id in self.points:
                opt.tell(self.points.pop(trial_id), value)

    return NumericalGradientSearcher()
