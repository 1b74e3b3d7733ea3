"""Optuna samplers by name (the config's `sampler.name`)."""

from __future__ import annotations

import optuna

from prunetune.search.config import ExperimentConfig


def make_sampler(cfg: ExperimentConfig) -> optuna.samplers.BaseSampler:
    name, seed = cfg.sampler.name, cfg.seed
    if name == "nsga2":
        pop = cfg.sampler.population_size or max(4, cfg.budget.trials // 3)
        return optuna.samplers.NSGAIISampler(population_size=pop, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, cfg.budget.trials // 4),
                                          multivariate=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler.name: unknown sampler {name!r}")
