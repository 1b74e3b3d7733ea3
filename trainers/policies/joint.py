"""`joint` (the default): one-shot materialization of the searched vector, then fine-tune."""

from __future__ import annotations

import time

from prunetune.spaces import prune
from prunetune.trainers.policies.base import Policy, register_policy
from prunetune.trainers.trial import example_input, finetune_and_test, measure, parent_structure


@register_policy
class JointPolicy(Policy):
    """Channels, depth, heads and resolution of the candidate's vector, applied at once."""

    name = "joint"

    def run(self, setup):
        t0 = time.perf_counter()
        subnet = prune(setup.parent, setup.vector, example_input(setup), model_name=setup.model_name,
                       importance=setup.importance, round_to=setup.round_to,
                       block_criterion=setup.block_criterion, probes=setup.probes,
                       structure=parent_structure(setup), seed=setup.seed)
        yield measure(setup, subnet, t0)
        yield from finetune_and_test(setup, subnet)
