"""The `policy` section: which pruning policies a search runs and which hyperparameters it varies.

    policy:
      name: [joint, sap]            # one name, or a list the sampler chooses from ("policy" param)
      params:                       # fixed hyperparameters per policy
        sap: {mode: structured, iterations: 3}
      search:                       # searched hyperparameters: null = the policy's default range
        sap.gamma: null
        sap.p: {low: 0.3, high: 0.9}
        distill.weight: {low: 0.0, high: 0.9}
        distill.temperature: {choices: [2, 4, 8]}

Sampled keys keep these names in Optuna, Ray Tune and MLflow. The space is define-by-run: the
policy is drawn first, then the vector (only for policies that use it) and that policy's
hyperparameters, so a trial never carries values its policy ignores.
"""

from __future__ import annotations

from typing import Any

import optuna
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prunetune.trainers.distill import DistillConfig
from prunetune.trainers.policies import POLICIES, Policy, PolicyError, make_policy

POLICY_KEY = "policy"
DISTILL_PREFIX = "distill."
DISTILL_RANGES = {"weight": optuna.distributions.FloatDistribution(0.0, 0.9),
                  "temperature": optuna.distributions.FloatDistribution(1.0, 8.0)}


class Range(BaseModel):
    """A searched range: low/high (with optional step or log scale) or a list of choices."""

    model_config = ConfigDict(extra="forbid")

    low: float | None = None
    high: float | None = None
    step: float | None = Field(default=None, gt=0)
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        if self.choices is not None:
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("give either choices (non-empty) or low/high, not both")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError("give low <= high, or choices")
        return self

    def distribution(self, default: optuna.distributions.BaseDistribution | None):
        if self.choices is not None:
            return optuna.distributions.CategoricalDistribution(self.choices)
        as_int = isinstance(default, optuna.distributions.IntDistribution)
        if as_int:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                        step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | list[str] = Field(default="joint", description="policy, or a list of policies to search over: "
                                  + ", ".join(sorted(POLICIES)))
    params: dict[str, dict[str, Any]] = Field(default_factory=dict, description="fixed hyperparameters per policy")
    search: dict[str, Range | None] = Field(
        default_factory=dict, description="searched hyperparameters `<policy>.<param>` or `distill.weight|temperature`; "
                                          "null = the default range")

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        names = [v] if isinstance(v, str) else v
        if not names:
            raise ValueError("name at least one policy")
        for n in names:
            if n not in POLICIES:
                raise ValueError(f"unknown policy {n!r}; registered: {', '.join(sorted(POLICIES))}")
        if len(set(names)) != len(names):
            raise ValueError(f"a policy is listed twice in {names}")
        return v

    @property
    def names(self) -> list[str]:
        return [self.name] if isinstance(self.name, str) else list(self.name)

    @model_validator(mode="after")
    def _params_and_search(self):
        for policy, params in self.params.items():
            if policy not in self.names:
                raise ValueError(f"params.{policy}: not among the policies searched ({self.names})")
            try:
                make_policy(policy, params)
            except PolicyError as err:
                raise ValueError(f"params.{err}") from None
        for key, rng in self.search.items():
            dist = self._default(key)
            if rng is None and dist is None:
                raise ValueError(f"search.{key}: has no default range; give low/high or choices")
            if rng is not None:
                try:
                    for value in _corners(rng.distribution(dist)):
                        self._check_value(key, value)
                except (PolicyError, ValueError) as err:
                    raise ValueError(f"search.{key}: {err}") from None
        return self

    def _default(self, key: str) -> optuna.distributions.BaseDistribution | None:
        head, _, param = key.partition(".")
        if key.startswith(DISTILL_PREFIX):
            if param not in DISTILL_RANGES:
                raise ValueError(f"search.{key}: distillation searches {sorted(DISTILL_RANGES)}")
            return DISTILL_RANGES[param]
        if head not in POLICIES:
            raise ValueError(f"search.{key}: expected <policy>.<param> or distill.<param>; "
                             f"policies: {', '.join(sorted(POLICIES))}")
        if head not in self.names:
            raise ValueError(f"search.{key}: policy {head!r} is not among the policies searched ({self.names})")
        cls = POLICIES[head]
        if param not in cls.Params.model_fields:
            raise ValueError(f"search.{key}: {head} has no hyperparameter {param!r} "
                             f"(it has {', '.join(cls.Params.model_fields)})")
        return cls.search_space.get(param)

    def _check_value(self, key: str, value: Any) -> None:
        head, _, param = key.partition(".")
        if key.startswith(DISTILL_PREFIX):
            DistillConfig(**{param: value})
        else:
            make_policy(head, {**self.params.get(head, {}), param: value})

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """Searched hyperparameters -> Optuna distribution (defaults filled in)."""
        out = {}
        for key, rng in self.search.items():
            default = self._default(key)
            out[key] = rng.distribution(default) if rng is not None else default
        return out


def _corners(dist) -> list[Any]:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


def suggest(trial, name: str, dist: optuna.distributions.BaseDistribution) -> Any:
    """Sample `dist` through Optuna's public suggest API (works on Ray's trial captor too)."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


class SearchSpace:
    """Define-by-run space for Ray's OptunaSearch: policy -> vector (if used) -> hyperparameters."""

    def __init__(self, vector: dict[str, optuna.distributions.BaseDistribution], policy: PolicyConfig):
        self.vector = vector
        self.names = policy.names
        self.hyper = policy.distributions()

    def __call__(self, trial) -> dict[str, Any] | None:
        if len(self.names) > 1:
            name = trial.suggest_categorical(POLICY_KEY, self.names)
            fixed = None
        else:
            name = self.names[0]
            fixed = {POLICY_KEY: name}
        if POLICIES[name].uses_vector:
            for key, dist in self.vector.items():
                suggest(trial, key, dist)
        for key, dist in self.hyper.items():
            if key.startswith(DISTILL_PREFIX) or key.startswith(name + "."):
                suggest(trial, key, dist)
        return fixed

    def single_policy_distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """Everything a trial samples when one policy is searched (what a grid enumerates)."""
        if len(self.names) != 1:
            raise ValueError("policy.name: several policies make a conditional space")
        vector = self.vector if POLICIES[self.names[0]].uses_vector else {}
        return {**vector, **self.hyper}

    def keys(self) -> list[str]:
        return ([POLICY_KEY] if len(self.names) > 1 else []) + list(self.vector) + list(self.hyper)


def resolve(sampled: dict[str, Any], policy: PolicyConfig, distill: DistillConfig) -> tuple[Policy, DistillConfig]:
    """The policy instance and distillation settings a trial runs with."""
    name = str(sampled.get(POLICY_KEY, policy.names[0]))
    params = dict(policy.params.get(name, {}))
    params.update({k[len(name) + 1:]: v for k, v in sampled.items() if k.startswith(name + ".")})
    kd = {k[len(DISTILL_PREFIX):]: v for k, v in sampled.items() if k.startswith(DISTILL_PREFIX)}
    return make_policy(name, params), distill.model_copy(update=kd) if kd else distill
