"""The define-by-run search space over policies, vectors and hyperparameters, sampled by a real
Optuna study, and how a trial's sampled values become its policy and distillation settings."""

import optuna
import pytest

from prunetune.search.policy_space import POLICY_KEY, PolicyConfig, SearchSpace, resolve
from prunetune.trainers.distill import DistillConfig
from prunetune.trainers.policies import POLICIES

VECTOR = {"ch.layer1": optuna.distributions.FloatDistribution(0.25, 1.0, step=0.25),
          "depth.layer1": optuna.distributions.IntDistribution(1, 3)}


def _sample(space: SearchSpace, n: int = 40) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        fixed = space(trial) or {}
        out.append({**trial.params, **fixed})
        study.tell(trial, 0.0)
    return out


def test_each_trial_carries_only_what_its_policy_uses():
    cfg = PolicyConfig(name=["joint", "sap", "allatonce"], search={"sap.gamma": None, "sap.p": {"low": 0.3, "high": 0.6},
                                                                     "allatonce.target_macs_ratio": None,
                                                                     "distill.weight": None})
    samples = _sample(SearchSpace(VECTOR, cfg))
    assert {s[POLICY_KEY] for s in samples} == {"joint", "sap", "allatonce"}
    for s in samples:
        name = s[POLICY_KEY]
        assert ("ch.layer1" in s) == POLICIES[name].uses_vector
        assert all(k.split(".")[0] in (name, "distill", "ch", "depth", POLICY_KEY) for k in s)
        assert 0.0 <= s["distill.weight"] <= 0.9
        if name == "sap":
            assert 0.3 <= s["sap.p"] <= 0.6 and 0.5 <= s["sap.gamma"] <= 3.0


def test_a_single_policy_is_fixed_not_sampled():
    samples = _sample(SearchSpace(VECTOR, PolicyConfig(name="joint")), n=3)
    assert all(s[POLICY_KEY] == "joint" and "ch.layer1" in s for s in samples)


def test_resolve_merges_fixed_and_sampled_hyperparameters():
    cfg = PolicyConfig(name=["joint", "sap"], params={"sap": {"iterations": 4, "mode": "unstructured"}},
                       search={"sap.gamma": None, "distill.temperature": {"choices": [2.0, 8.0]}})
    policy, kd = resolve({POLICY_KEY: "sap", "sap.gamma": 2.5, "distill.temperature": 8.0}, cfg,
                         DistillConfig(weight=0.3))
    assert policy.name == "sap" and policy.get_params()["gamma"] == 2.5
    assert policy.get_params()["iterations"] == 4 and policy.get_params()["mode"] == "unstructured"
    assert kd == DistillConfig(weight=0.3, temperature=8.0)
    policy, kd = resolve({}, PolicyConfig(), DistillConfig())
    assert policy.name == "joint" and kd == DistillConfig()


def test_integer_hyperparameters_stay_integers():
    samples = _sample(SearchSpace({}, PolicyConfig(name="sap", search={"sap.iterations": None})), n=10)
    assert all(isinstance(s["sap.iterations"], int) and 1 <= s["sap.iterations"] <= 5 for s in samples)


def test_bad_range_is_rejected_at_config_time():
    with pytest.raises(ValueError, match="search.sap.beta"):
        PolicyConfig(name="sap", search={"sap.beta": {"low": 0.5, "high": 1.5}})
