"""What can be searched, and how one point of the search becomes a real smaller network.

`describe` reads the searchable structure off any model (channel stages through DepGraph,
removable residual blocks, attention heads, resolution); `PruningVector` is one point;
`prune` turns a vector into a physically smaller copy of the parent plus a `SubnetSpec`
that `rebuild` replays deterministically. This package imports neither `trainers` nor `search`.
"""

from prunetune.spaces.common import PruningError, kept_channels, state_hash
from prunetune.spaces.cost import Cost, measure_cost, measure_full_cost
from prunetune.spaces.distributions import RatioRange, SpaceConfig, optuna_distributions
from prunetune.spaces.engine import (ModelStructure, Pruned, describe, exact_vector, example_from_spec, prune,
                                     rebuild)
from prunetune.spaces.importance import IMPORTANCES, register_importance
from prunetune.spaces.spec import SubnetSpec, load_subnet, save_subnet
from prunetune.spaces.vector import PruningVector

__all__ = [
    "Cost", "IMPORTANCES", "ModelStructure", "Pruned", "PruningError", "PruningVector", "RatioRange",
    "SpaceConfig", "SubnetSpec", "describe", "example_from_spec", "kept_channels", "load_subnet",
    "measure_cost", "measure_full_cost", "optuna_distributions", "prune", "rebuild", "exact_vector",
    "register_importance", "save_subnet", "state_hash",
]
