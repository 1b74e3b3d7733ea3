"""The grid sampler: every point of a discrete space exactly once, through the same define-by-run
space the search uses; non-discrete or multi-policy spaces are config errors naming the key."""

import optuna
import pytest

from prunetune.search.config import ConfigError, parse_config
from prunetune.search.policy_space import PolicyConfig, SearchSpace
from prunetune.search.samplers import grid_size, grid_space, make_sampler

BASE = {"name": "g", "model": {"name": "cifar:resnet8"}, "data": {"name": "digits", "image_size": 16}}
VECTOR = {"ch.layer1": optuna.distributions.FloatDistribution(0.5, 1.0, step=0.25),
          "depth.layer1": optuna.distributions.IntDistribution(1, 2)}


def test_grid_visits_every_point_once():
    cfg = parse_config({**BASE, "sampler": {"name": "grid"}, "space": {"channel_ratio": {"low": 0.5, "step": 0.25}},
                        "policy": {"name": "depgraph-sl", "search": {"depgraph-sl.alpha": {"choices": [2.0, 4.0]}}}})
    space = SearchSpace(VECTOR, cfg.policy)
    grid = grid_space(space.single_policy_distributions())
    assert grid == {"ch.layer1": [0.5, 0.75, 1.0], "depth.layer1": [1, 2], "depgraph-sl.alpha": [2.0, 4.0]}
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(cfg, grid))
    seen = []
    for _ in range(grid_size(grid)):
        trial = study.ask()
        space(trial)
        seen.append(tuple(sorted(trial.params.items())))
        study.tell(trial, [0.0, 0.0])
    assert len(set(seen)) == grid_size(grid) == 12


@pytest.mark.parametrize("patch,key", [
    ({"space": {"channel_ratio": {"step": None}}}, "space.channel_ratio.step: the grid sampler needs a step"),
    ({"policy": {"name": ["joint", "sap"]}}, "grid searches one policy at a time"),
    ({"policy": {"name": "sap", "search": {"sap.gamma": None}}}, "policy.search.sap.gamma: the grid sampler needs"),
])
def test_grid_needs_a_discrete_single_policy_space(patch, key):
    with pytest.raises(ConfigError, match=key):
        parse_config({**BASE, "sampler": {"name": "grid"}, **patch})


def test_continuous_distribution_is_named():
    space = SearchSpace({"ch.x": optuna.distributions.FloatDistribution(0.1, 1.0)}, PolicyConfig())
    with pytest.raises(ValueError, match="ch.x: the grid sampler needs a discrete range"):
        grid_space(space.single_policy_distributions())
