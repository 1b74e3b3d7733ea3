"""Pruning policies a trial runs on its candidate; see `base` for the contract."""

from prunetune.trainers.policies.base import POLICIES, Policy, PolicyError, PolicyParams, make_policy, register_policy
from prunetune.trainers.policies import allatonce, depgraph_sl, joint, sap  # noqa: F401  (registration)

__all__ = ["POLICIES", "Policy", "PolicyError", "PolicyParams", "make_policy", "register_policy"]
