"""The joint pruning vector: channel keep ratio per stage, blocks kept per stage, resolution.

The flat form (`ch.<stage>`, `depth.<stage>`, `resolution`) is what Optuna samples and what
MLflow stores as run params, so a vector can always be read back from a run record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

CHANNEL_PREFIX = "ch."
DEPTH_PREFIX = "depth."
HEADS_PREFIX = "heads."
RESOLUTION_KEY = "resolution"


class PruningVector(BaseModel):
    """One candidate: what to keep of each stage and the input resolution.

    >>> v = PruningVector(channels={"layer1": 0.5}, depth={"layer1": 2}, resolution=16)
    >>> PruningVector.from_flat(v.to_flat()) == v
    True
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: dict[str, float] = Field(default_factory=dict)
    depth: dict[str, int] = Field(default_factory=dict)
    heads: dict[str, float] = Field(default_factory=dict)
    resolution: int | None = None

    def to_flat(self) -> dict[str, Any]:
        flat: dict[str, Any] = {f"{CHANNEL_PREFIX}{k}": v for k, v in self.channels.items()}
        flat.update({f"{DEPTH_PREFIX}{k}": v for k, v in self.depth.items()})
        flat.update({f"{HEADS_PREFIX}{k}": v for k, v in self.heads.items()})
        if self.resolution is not None:
            flat[RESOLUTION_KEY] = self.resolution
        return flat

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> PruningVector:
        """Read a vector back from sampled params or MLflow params (values may be strings)."""
        channels = {k[len(CHANNEL_PREFIX):]: float(v) for k, v in flat.items()
                    if k.startswith(CHANNEL_PREFIX)}
        depth = {k[len(DEPTH_PREFIX):]: int(float(v)) for k, v in flat.items()
                 if k.startswith(DEPTH_PREFIX)}
        heads = {k[len(HEADS_PREFIX):]: float(v) for k, v in flat.items() if k.startswith(HEADS_PREFIX)}
        res = flat.get(RESOLUTION_KEY)
        return cls(channels=channels, depth=depth, heads=heads,
                   resolution=None if res in (None, "None") else int(float(res)))
