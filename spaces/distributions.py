"""The search-space section of an experiment, and its Optuna distributions."""

from __future__ import annotations

from typing import Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prunetune.spaces.discovery import ModelSpace
from prunetune.spaces.importance import IMPORTANCES
from prunetune.spaces.vector import CHANNEL_PREFIX, DEPTH_PREFIX, RESOLUTION_KEY


class RatioRange(BaseModel):
    """Keep ratios searched per stage, on a grid of `step`."""

    model_config = ConfigDict(extra="forbid")

    low: float = 0.25
    high: float = 1.0
    step: float | None = 0.125

    @field_validator("low", "high")
    @classmethod
    def _in_unit(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.step is not None and not 0.0 < self.step <= 1.0:
            raise ValueError(f"step must be in (0, 1], got {self.step}")
        return self


class SpaceConfig(BaseModel):
    """What the search may change. Stages are discovered from the model."""

    model_config = ConfigDict(extra="forbid")

    channel_ratio: RatioRange = Field(default_factory=RatioRange)
    depth: bool = True
    min_blocks: int = Field(default=1, ge=1)
    resolutions: list[int] | None = None
    importance: str = "l2"
    round_to: int = Field(default=1, ge=1)
    granularity: Literal["stage"] = "stage"

    @field_validator("importance")
    @classmethod
    def _known_importance(cls, v: str) -> str:
        if v not in IMPORTANCES:
            raise ValueError(f"unknown importance {v!r}; known: {sorted(IMPORTANCES)}")
        return v

    @field_validator("resolutions")
    @classmethod
    def _positive(cls, v):
        if v is not None and (not v or any(r < 4 for r in v)):
            raise ValueError("resolutions must be a non-empty list of sizes >= 4")
        return v


def optuna_distributions(space: ModelSpace, cfg: SpaceConfig) -> dict[str, optuna.distributions.BaseDistribution]:
    """One distribution per searchable coordinate, keyed by the vector's flat names."""
    r = cfg.channel_ratio
    dists: dict[str, optuna.distributions.BaseDistribution] = {}
    for stage in space.stages:
        if r.low < r.high:
            dists[f"{CHANNEL_PREFIX}{stage.name}"] = optuna.distributions.FloatDistribution(
                r.low, r.high, step=r.step)
        if cfg.depth and stage.max_depth > cfg.min_blocks:
            dists[f"{DEPTH_PREFIX}{stage.name}"] = optuna.distributions.IntDistribution(
                cfg.min_blocks, stage.max_depth)
    if cfg.resolutions and len(cfg.resolutions) > 1:
        dists[RESOLUTION_KEY] = optuna.distributions.CategoricalDistribution(sorted(set(cfg.resolutions)))
    return dists
