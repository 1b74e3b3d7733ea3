"""`depgraph-sl`: group sparse training with DepGraph's regulariser, then prune the vector.

Fang et al. (CVPR 2023), torch-pruning's `GroupNormPruner`: after every backward pass each
coupled group's gradients get reg * gamma_k * w[k], gamma_k = 2^(alpha (I_max - I_k) /
(I_max - I_min)), pushing whole low-norm groups towards zero. After `sparse_epochs` of this
(the paper: 100), the candidate's vector is applied with group-magnitude (L2) importance, so
the channels the regulariser emptied are the ones removed; then the trial's final fine-tune.
Each sparse epoch logs validation accuracy and the spread of the group norms.
"""

from __future__ import annotations

import copy
import time

import optuna
import torch
from pydantic import Field

from prunetune.spaces import prune
from prunetune.trainers.policies.base import Policy, PolicyParams, register_policy
from prunetune.trainers.policies.joint import one_shot
from prunetune.trainers.policies.masked import channel_scores
from prunetune.trainers.sap import pq_index
from prunetune.trainers.trial import Iteration, credited_to_parent, example_input, finetune_and_test, measure, parent_structure, train


class DepGraphSLParams(PolicyParams):
    reg: float = Field(default=5e-4, gt=0, description="regularisation strength (paper's CIFAR recipe: 5e-4)")
    alpha: float = Field(default=4.0, ge=0, description="gamma spans [1, 2^alpha] within a group (paper: 4)")
    sparse_epochs: int = Field(default=1, ge=1, description="sparse-training epochs before pruning (paper: 100)")


@register_policy
class DepGraphSLPolicy(Policy):
    name = "depgraph-sl"
    Params = DepGraphSLParams
    search_space = {"reg": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True),
                    "alpha": optuna.distributions.FloatDistribution(0.0, 6.0)}
    test_params = {"sparse_epochs": 1}

    def preview(self, setup):
        t0 = time.perf_counter()
        return measure(setup, one_shot(setup, setup.parent), t0)  # same widths as after sparse training

    def run(self, setup):
        import torch_pruning as tp

        cfg: DepGraphSLParams = self.params
        t0 = time.perf_counter()
        structure = parent_structure(setup)
        example = example_input(setup)
        model = copy.deepcopy(setup.parent).cpu()
        # No ignored_layers at build time (torch-pruning 1.6.1 mis-maps flatten indices then); the
        # classifier is dropped from the regularised groups afterwards.
        sl = tp.pruner.GroupNormPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       reg=cfg.reg, alpha=cfg.alpha)
        sl.ignored_layers = [model.get_submodule(structure.classifier)]
        sl.update_regularizer()
        roots = [g.root for s in structure.channel_stages for g in s.groups]

        def regularize(m):
            sl.regularize(m, alpha=2.0 ** cfg.alpha)

        t1 = time.perf_counter()
        for stats in train(setup, model, cfg.sparse_epochs, after_backward=regularize):
            model.cpu().eval()
            scores = channel_scores(model, example, structure.classifier, roots, "group_l2")
            norms = torch.cat(list(scores.values())).sqrt()  # L2 norm per channel over all coupled slices
            yield Iteration(stats.epoch, {"val_acc": stats.val_acc, "train_loss": stats.train_loss,
                                          "group_norm_mean": float(norms.mean()),
                                          "group_norm_pqi": pq_index(norms, 0.5, 1.0),
                                          "near_zero_channels": float((norms < 1e-2 * norms.max()).double().mean())},
                            {"phase": "sparse-training"}, time.perf_counter() - t1)
            t1 = time.perf_counter()
        model.cpu().eval()
        subnet = prune(model, setup.vector, example, model_name=setup.model_name, importance="l2",
                       round_to=setup.round_to, block_criterion=setup.block_criterion, probes=setup.probes,
                       structure=structure, seed=setup.seed)
        subnet = credited_to_parent(setup, subnet, "depgraph-sl")
        yield measure(setup, subnet, t0)
        yield from finetune_and_test(setup, subnet)
