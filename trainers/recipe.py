"""How a network is trained: SGD with momentum and cosine annealing (the papers' default)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainRecipe(BaseModel):
    """One training run's optimiser and schedule; part of the parent cache key."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=3, ge=0, description="passes over the training split")
    lr: float = Field(default=0.05, gt=0, description="initial SGD learning rate, cosine-annealed per step to 0")
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    nesterov: bool = True
    batch_size: int = Field(default=128, ge=1, description="training batch size")
