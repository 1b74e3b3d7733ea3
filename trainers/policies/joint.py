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

    def preview(self, setup):
        t0 = time.perf_counter()
        subnet = one_shot(setup, setup.parent)
        self._previewed = (setup, subnet, measure(setup, subnet, t0))  # run() continues from it
        return self._previewed[2]

    def run(self, setup):
        previewed = getattr(self, "_previewed", None)
        if previewed is None or previewed[0] is not setup:
            self.preview(setup)
        _, subnet, event = self._previewed
        yield event
        yield from finetune_and_test(setup, subnet)


def one_shot(setup, model):
    """The candidate's vector applied to `model` (the parent, or a retrained copy of it)."""
    return prune(model, setup.vector, example_input(setup), model_name=setup.model_name,
                 importance=setup.importance, round_to=setup.round_to, block_criterion=setup.block_criterion,
                 probes=setup.probes, structure=parent_structure(setup), seed=setup.seed)
