"""The search-space section of an experiment, and its Optuna distributions."""

from __future__ import annotations

from typing import Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prunetune.spaces.importance import IMPORTANCES
from prunetune.spaces.vector import CHANNEL_PREFIX, DEPTH_PREFIX, HEADS_PREFIX, RESOLUTION_KEY


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

    channel_ratio: RatioRange = Field(default_factory=RatioRange, description="keep ratio per channel stage")
    head_ratio: RatioRange = Field(default_factory=lambda: RatioRange(low=0.5, high=1.0, step=0.25),
                                   description="keep ratio of attention heads per stage (transformers)")
    depth: bool = Field(default=True, description="search blocks kept per stage (removable residual blocks)")
    min_blocks: int = Field(default=1, ge=1, description="never keep fewer blocks than this in a stage")
    resolutions: list[int] | None = Field(default=None, description="input resolutions to search; none = native only")
    importance: str = Field(default="l2", description="channel criterion: l1, l2, group_l2, bn_scale, taylor, random")
    block_criterion: str = Field(default="position", description="which blocks go first: position, weight_norm, kl, cka")
    round_to: int = Field(default=1, ge=1, description="kept channel counts are multiples of this")
    granularity: Literal["stage", "group"] = Field(
        default="stage", description="one channel ratio per stage, or per DepGraph group (`ch.<group root>`)")

    @field_validator("importance")
    @classmethod
    def _known_importance(cls, v: str) -> str:
        if v not in IMPORTANCES:
            raise ValueError(f"unknown importance {v!r}; known: {sorted(IMPORTANCES)}")
        return v

    @field_validator("block_criterion")
    @classmethod
    def _known_block_criterion(cls, v: str) -> str:
        from prunetune.spaces.block_criteria import BLOCK_CRITERIA

        if v not in BLOCK_CRITERIA:
            raise ValueError(f"unknown block criterion {v!r}; known: {sorted(BLOCK_CRITERIA)}")
        return v

    @field_validator("resolutions")
    @classmethod
    def _positive(cls, v):
        if v is not None and (not v or any(r < 4 for r in v)):
            raise ValueError("resolutions must be a non-empty list of sizes >= 4")
        return v


def optuna_distributions(structure, cfg: SpaceConfig) -> dict[str, optuna.distributions.BaseDistribution]:
    """One distribution per searchable coordinate of an engine `ModelStructure`, keyed by the
    vector's flat names (`ch.<stage>`, `heads.<stage>`, `depth.<stage>`, `resolution`)."""
    dists: dict[str, optuna.distributions.BaseDistribution] = {}

    def ratio(key: str, r: RatioRange) -> None:
        if r.low < r.high:
            dists[key] = optuna.distributions.FloatDistribution(r.low, r.high, step=r.step)

    for stage in structure.channel_stages:
        if stage.groups and cfg.granularity == "stage":
            ratio(f"{CHANNEL_PREFIX}{stage.name}", cfg.channel_ratio)
        elif stage.groups:
            for group in stage.groups:
                ratio(f"{CHANNEL_PREFIX}{group.root}", cfg.channel_ratio)
        if stage.attention:
            ratio(f"{HEADS_PREFIX}{stage.name}", cfg.head_ratio)
    if cfg.depth:
        for st in structure.depth_stages:
            low = min(max(st.min_depth, cfg.min_blocks), st.max_depth)
            if low < st.max_depth:
                dists[f"{DEPTH_PREFIX}{st.name}"] = optuna.distributions.IntDistribution(low, st.max_depth)
    if cfg.resolutions and len(cfg.resolutions) > 1 and structure.resolution_adaptable:
        dists[RESOLUTION_KEY] = optuna.distributions.CategoricalDistribution(sorted(set(cfg.resolutions)))
    return dists
