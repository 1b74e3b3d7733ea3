"""`allatonce`: Pruning Everything, Everywhere, All at Once (do Nascimento et al., IJCNN 2025).

Each iteration builds two candidates from the current network: a layer candidate (the
lowest-scoring removable block bypassed) and a filter candidate that removes a matched amount
(equal MACs by default [ours]; equal filter count as in the paper's code) as a uniform share of
every prunable layer's remaining channels. Both get a short recovery fine-tune; the one with
the higher linear CKA to the parent on the validation probes wins (a tie goes to the layer
candidate) and gets a longer fine-tune; the winner is the next iteration's reference. Repeat
until the MACs target is met or nothing is removable; then the trial's final fine-tune. [ours]:
the filter candidate never goes below the target, so the last step lands on it; the
`candidates: layer|filter` baselines remove the same amount per iteration as the method. Every choice, both CKAs, MACs and accuracies go
to MLflow. Epochs are the paper's 10 + 190 per iteration scaled to `recovery_epochs` and
`iteration_epochs`; the candidates train one after the other inside the trial.
"""

from __future__ import annotations

import time
from typing import Literal

import optuna
import torch
from pydantic import Field

from prunetune.spaces.block_criteria import get_block_criterion
from prunetune.spaces.engine import _widths
from prunetune.trainers.finetune import evaluate
from prunetune.trainers.policies.base import Policy, PolicyParams, register_policy
from prunetune.trainers.policies.masked import MaskedNet
from prunetune.trainers.trial import Iteration, cka_between, finetune_and_test, measure


class AllAtOnceParams(PolicyParams):
    target_macs_ratio: float = Field(default=0.5, gt=0, le=1, description="stop once MACs <= this share of the parent's")
    match: Literal["macs", "filters"] = Field(
        default="macs", description="filter candidate removes as many MACs as the layer candidate, or as many filters (paper)")
    recovery_epochs: int = Field(default=1, ge=0, description="fine-tune of each candidate before the CKA comparison (paper: 10)")
    iteration_epochs: int = Field(default=1, ge=0, description="fine-tune of the winner (paper: 190)")
    layer_criterion: str = Field(default="kl", description="block criterion that picks the layer candidate (paper: kl)")
    filter_importance: str = Field(default="l1", description="channel criterion of the filter candidate (paper: l1 or kl)")
    filter_groups: Literal["internal", "all"] = Field(
        default="internal", description="prune block-internal channels only (paper) or residual streams too")
    min_blocks: int = Field(default=2, ge=1, description="a stage keeps at least this many blocks (paper: 2)")
    cka_layer: Literal["penultimate", "mean"] = Field(
        default="penultimate", description="compare the penultimate features (paper) or the mean over stage ends")
    cka_reference: Literal["current", "original"] = Field(
        default="current", description="candidates are compared with the network they came from (paper) or the original parent")
    max_iterations: int = Field(default=20, ge=1)
    candidates: Literal["both", "layer", "filter"] = Field(
        default="both", description="both (the method), or layer-only / filter-only pruning as baselines")


@register_policy
class AllAtOncePolicy(Policy):
    name = "allatonce"
    Params = AllAtOnceParams
    uses_vector = False
    search_space = {"target_macs_ratio": optuna.distributions.FloatDistribution(0.15, 0.9),
                    "match": optuna.distributions.CategoricalDistribution(["macs", "filters"])}
    test_params = {"target_macs_ratio": 0.7, "recovery_epochs": 1, "iteration_epochs": 1, "min_blocks": 1}

    def run(self, setup):
        cfg: AllAtOnceParams = self.params
        get_block_criterion(cfg.layer_criterion)
        t0 = time.perf_counter()
        net = MaskedNet(setup, coupled=cfg.filter_groups == "all")
        parent_macs = net.macs()
        macs = parent_macs
        target = cfg.target_macs_ratio * parent_macs
        step = 0
        while macs > target and step < cfg.max_iterations:
            t1 = time.perf_counter()
            layer = self._layer_candidate(net)
            goal = self._goal(net, layer, macs, target)
            filt = self._filter_candidate(net, goal) if cfg.candidates != "layer" else None
            if cfg.candidates == "filter":
                layer = None  # it only set the amount the filter candidate removes
            if layer is None and filt is None:
                break
            reference = net.model if cfg.cka_reference == "current" else setup.parent
            scored = {}
            for kind, pair in (("layer", layer), ("filter", filt)):
                if pair is None:
                    continue
                cand, what = pair
                for _ in cand.train(cfg.recovery_epochs):
                    pass
                scored[kind] = (self._cka(setup, reference, cand), cand, what)
            choice = "layer" if "layer" in scored and scored["layer"][0] >= scored.get("filter", (-1.0,))[0] else "filter"
            net = scored[choice][1]
            for _ in net.train(cfg.iteration_epochs):
                pass
            macs = scored[choice][2]["macs"]
            step += 1
            val_acc = evaluate(net.model, setup.splits.val, device=torch.device("cpu"))[0]
            metrics = {"macs": macs, "macs_ratio": macs / parent_macs, "val_acc": val_acc,
                       "choice_layer": float(choice == "layer")}
            for kind, (cka, _, what) in scored.items():
                metrics[f"cka_{kind}"] = cka
                metrics[f"macs_{kind}"] = what["macs"]
            yield Iteration(step, metrics, {"choice": choice, "removed": scored[choice][2]["removed"]},
                            time.perf_counter() - t1)
        subnet = net.materialize("allatonce")
        yield measure(setup, subnet, t0)
        yield from finetune_and_test(setup, subnet)

    def _cka(self, setup, reference, cand: MaskedNet) -> float:
        ckas = cka_between(setup, reference, cand.model)
        return ckas["penultimate" if self.params.cka_layer == "penultimate" else "mean"]

    def _layer_candidate(self, net: MaskedNet):
        blocks = net.removable_blocks(self.params.min_blocks)
        if not blocks:
            return None
        crit = get_block_criterion(self.params.layer_criterion)
        scores = crit(net.model, blocks, probes=net.setup.probes if crit.needs_probes else None)
        worst = min(blocks, key=lambda b: (scores[b], -blocks.index(b)))
        cand = net.copy()
        cand.drop_block(worst)
        return cand, {"macs": cand.macs(), "removed": worst}

    def _goal(self, net, layer, macs, target) -> dict:
        """What the filter candidate must leave: the layer candidate's MACs (or filters), but
        never below the target (the last step removes only what the target needs) [ours]; with
        no layer candidate left, down to the target but at most half the MACs per iteration."""
        if layer is None:
            return {"macs": max(target, macs / 2)}
        if self.params.match == "macs" or layer[1]["macs"] < target:
            return {"macs": max(layer[1]["macs"], target)}
        return {"filters": _filters(layer[0])}

    def _filter_candidate(self, net: MaskedNet, goal: dict):
        scores = net.channel_scores(self.params.filter_importance)
        roots = [r for r in net.groups() if len(net.alive[r]) > 1]
        if not roots:
            return None

        def build(share: float) -> MaskedNet:
            cand = net.copy()
            off = {}
            for r in roots:
                alive = net.alive[r]
                n = min(round(share * len(alive)), len(alive) - 1)
                order = torch.argsort(scores[r][alive], stable=True)[:n]
                off[r] = [alive[int(i)] for i in order]
            cand.switch_off(off)
            return cand

        def amount(c: MaskedNet) -> float:
            return c.macs() if "macs" in goal else _filters(c)

        want = goal.get("macs", goal.get("filters"))
        lo, hi = 0.0, 1.0
        best = None
        for _ in range(12):  # bisection on the uniform share removed per layer
            mid = (lo + hi) / 2
            cand = build(mid)
            got = amount(cand)
            if got <= want:
                best, hi = (cand, got), mid
            else:
                lo = mid
        if best is None:
            best = (build(1.0), None)
        cand = best[0]
        if all(len(cand.alive[r]) == len(net.alive[r]) for r in roots):
            return None
        removed = {r: len(net.alive[r]) - len(cand.alive[r]) for r in roots}
        return cand, {"macs": cand.macs(), "removed": f"{sum(removed.values())} channels"}


def _filters(net: MaskedNet) -> int:
    """Conv filters in the physical network (the paper's matching unit)."""
    sub = net.materialize("count").module
    return sum(w for n, w in _widths(sub).items() if isinstance(sub.get_submodule(n), torch.nn.Conv2d))
