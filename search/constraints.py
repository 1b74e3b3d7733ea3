"""Hard cost constraints: checked on a candidate's cost before it is trained, told to Optuna.

`constraints: {max_macs, max_params, max_latency_ms}` in the config. A trial whose policy knows
the subnet up front (joint, depgraph-sl) is checked right after pruning, before any training;
iterative policies (sap, allatonce) are checked when their rounds end, before the final
fine-tune. An infeasible trial ends there with status `infeasible`: its real measured values
(cost, validation accuracy of the untrained subnet) and a positive `constraint_violation` go
to Optuna, whose NSGA-II and TPE samplers rank it behind every feasible trial (Optuna's
constraints_func); it never enters the Pareto front.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from prunetune.spaces import Cost

VIOLATION_KEY = "constraint_violation"
ATTR = "constraints"   # Optuna user attribute read by constraints_func


class ConstraintsConfig(BaseModel):
    """Upper bounds on the subnet's cost; none = unconstrained."""

    model_config = ConfigDict(extra="forbid")

    max_macs: float | None = Field(default=None, gt=0, description="multiply-accumulates per sample")
    max_params: float | None = Field(default=None, gt=0, description="parameters")
    max_latency_ms: float | None = Field(default=None, gt=0, description="measured batch-1 latency (needs cost.latency)")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.max_macs, self.max_params, self.max_latency_ms))

    def violations(self, cost: Cost) -> dict[str, float]:
        """{bound name: relative excess > 0} for every bound `cost` breaks."""
        out = {}
        for key, value in (("max_macs", cost.macs), ("max_params", cost.params), ("max_latency_ms", cost.latency_ms)):
            bound = getattr(self, key)
            if bound is not None and value is not None and value > bound:
                out[key] = value / bound - 1.0
        return out


def constraints_func(trial) -> list[float]:
    """Optuna's constraints_func: <= 0 feasible. Trials told without the attribute count as feasible."""
    return list(trial.user_attrs.get(ATTR, [0.0]))
