"""What a pruning policy is, and the registry the config, the search space and the tests read.

A policy turns the parent into a fine-tuned subnet as a stream of trial events
(`trainers.trial`). Like a scikit-learn estimator, its constructor only stores keyword
hyperparameters (validated by the policy's pydantic `Params`), so `get_params()` is the whole
state and `search_space` says which of them a search may vary and over what range. Register a
new policy with `@register_policy` and the registry-driven tests run it end to end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import optuna
from pydantic import BaseModel, ConfigDict, ValidationError

from prunetune.trainers.trial import CandidateSetup, Event, Materialized


class PolicyParams(BaseModel):
    """Base of every policy's hyperparameters (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


class Policy(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[PolicyParams]] = PolicyParams
    uses_vector: ClassVar[bool] = True   # False: the searched pruning vector is not used (not sampled)
    search_space: ClassVar[dict[str, optuna.distributions.BaseDistribution]] = {}  # default ranges
    test_params: ClassVar[dict[str, Any]] = {}  # small settings the registry-driven tests run it with

    def __init__(self, **params: Any) -> None:
        self.params = self.Params(**params)

    def get_params(self) -> dict[str, Any]:
        return self.params.model_dump()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @abstractmethod
    def run(self, setup: CandidateSetup) -> Iterator[Event]:
        """[Iteration ...] Materialized, Epoch ..., Finished."""

    def preview(self, setup: CandidateSetup) -> Materialized | None:
        """The subnet's cost, CKA and accuracy before any training, for policies that know its
        structure up front (the searched vector); None when training decides it. The search
        checks hard constraints on it, so an infeasible candidate is never trained."""
        return None


POLICIES: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    for key in cls.search_space:
        if key not in cls.Params.model_fields:
            raise TypeError(f"{cls.__name__}.search_space: {key!r} is not a field of {cls.Params.__name__}")
    POLICIES[cls.name] = cls
    return cls


class PolicyError(ValueError):
    """Unknown policy or bad hyperparameters; the message names the key."""


def make_policy(name: str, params: dict[str, Any] | None = None) -> Policy:
    if name not in POLICIES:
        raise PolicyError(f"unknown policy {name!r}; registered: {', '.join(sorted(POLICIES))}")
    try:
        return POLICIES[name](**(params or {}))
    except ValidationError as err:
        problems = "; ".join(f"{name}.{'.'.join(str(p) for p in e['loc'])}: "
                             f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
                             for e in err.errors())
        raise PolicyError(problems) from None
