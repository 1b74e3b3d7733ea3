"""Hard constraints: violations from a cost, and the violation reaching Optuna's samplers."""

import optuna

from prunetune.search.constraints import ATTR, ConstraintsConfig, constraints_func
from prunetune.search.optuna_search import PrunetuneOptunaSearch
from prunetune.spaces import Cost


def test_violations_are_relative_excess():
    c = ConstraintsConfig(max_macs=100, max_latency_ms=2.0)
    assert c.violations(Cost(macs=150, params=10, latency_ms=1.0)) == {"max_macs": 0.5}
    assert c.violations(Cost(macs=90, params=10, latency_ms=None)) == {}
    assert not ConstraintsConfig().active and c.active


def test_violation_is_told_to_optuna_and_ranks_last():
    sampler = optuna.samplers.NSGAIISampler(seed=0, constraints_func=constraints_func, population_size=2)
    search = PrunetuneOptunaSearch({"x": optuna.distributions.FloatDistribution(0, 1)}, metric=["acc", "macs"],
                                   mode=["max", "min"], sampler=sampler)
    for i, violation in enumerate([0.0, 0.7]):
        search.suggest(f"t{i}")
        result = {"acc": 0.9, "macs": 10.0}
        if violation:
            result["constraint_violation"] = violation
        search.on_trial_complete(f"t{i}", result)
    trials = search._ot_study.trials
    assert [constraints_func(t) for t in trials] == [[0.0], [0.7]]
    assert ATTR not in trials[0].user_attrs and trials[1].user_attrs[ATTR] == [0.7]
