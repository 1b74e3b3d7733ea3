"""Optuna samplers by name (the config's `sampler.name`).

`grid` enumerates every combination of a discrete space (stepped ratios, integer depths,
categorical resolutions and choices) in a seeded random order; it needs one policy, since a
grid cannot hold parameters that exist only for some of its points.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import optuna

from prunetune.search.constraints import constraints_func

if TYPE_CHECKING:
    from prunetune.search.config import ExperimentConfig


def grid_values(dist: optuna.distributions.BaseDistribution, key: str) -> list:
    """Every value a discrete distribution can take; ValueError naming `key` otherwise."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, optuna.distributions.FloatDistribution) and dist.step is not None:
        n = int(round((dist.high - dist.low) / dist.step))
        return [round(dist.low + i * dist.step, 10) for i in range(n + 1)]
    raise ValueError(f"{key}: the grid sampler needs a discrete range (give a step or choices)")


def grid_space(distributions: dict[str, optuna.distributions.BaseDistribution]) -> dict[str, list]:
    return {k: grid_values(d, k) for k, d in distributions.items()}


def grid_size(grid: dict[str, list]) -> int:
    return math.prod(len(v) for v in grid.values())


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler driven by ask/tell (Ray Tune): Optuna's version calls `study.stop()` after the
    last grid point, which raises outside `study.optimize`; the trial count stops Ray instead."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def make_sampler(cfg: ExperimentConfig, grid: dict[str, list] | None = None) -> optuna.samplers.BaseSampler:
    name, seed = cfg.sampler.name, cfg.seed
    if name == "grid":
        if grid is None:
            raise ValueError("sampler.name: grid needs the search space's grid")
        return AskTellGridSampler(grid, seed=seed)
    constrained = constraints_func if cfg.constraints.active else None
    if name == "nsga2":
        pop = cfg.sampler.population_size or max(4, cfg.budget.trials // 3)
        return optuna.samplers.NSGAIISampler(population_size=pop, seed=seed, constraints_func=constrained)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, cfg.budget.trials // 4),
                                          multivariate=True, constraints_func=constrained)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler.name: unknown sampler {name!r}")
