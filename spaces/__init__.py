"""What can be searched, and how one point of the search becomes a real smaller network.

`discover` finds the stages, removable blocks and prunable channels of a model;
`PruningVector` is one point (channel keep ratio and blocks kept per stage, input
resolution); `materialize` turns a vector into a physically smaller copy of the parent and
a `SubnetSpec` that `rebuild` replays deterministically. This package imports neither
`trainers` nor `search`.
"""

from prunetune.spaces.cost import Cost, measure_cost
from prunetune.spaces.discovery import ModelSpace, Stage, discover
from prunetune.spaces.distributions import RatioRange, SpaceConfig, optuna_distributions
from prunetune.spaces.importance import IMPORTANCES, register_importance
from prunetune.spaces.materialize import PruningError, Subnet, materialize, rebuild
from prunetune.spaces.spec import SubnetSpec, load_subnet, save_subnet
from prunetune.spaces.vector import PruningVector

__all__ = [
    "Cost", "IMPORTANCES", "ModelSpace", "PruningError", "PruningVector", "RatioRange",
    "SpaceConfig", "Stage", "Subnet", "SubnetSpec", "discover", "load_subnet", "materialize",
    "measure_cost", "optuna_distributions", "rebuild", "register_importance", "save_subnet",
]
