"""`sap`: Sparsity-informed Adaptive Pruning with the PQ Index (Diao et al., ICLR 2023).

Each of T rounds: PQ Index of the current trained weights -> prune count c_t from the retain
bound (`trainers.sap`) -> remove the c_t smallest -> rewind to the initial weights or keep
them -> train E epochs. The parent is the trained round-0 network.

- `mode: unstructured` (the paper): 0/1 masks on every conv/linear weight, scopes global,
  layer or neuron; the network keeps its shape, so MACs do not fall (non-zero weights do).
- `mode: structured` [ours, PAPERS.md]: the PQ Index of the DepGraph group norms (one L2 norm
  per channel over every coupled slice), scopes global (all channels of all groups) or layer
  (each group); the c_t lowest-norm channels are switched off and finally removed, giving a
  physically smaller network.

`between: rewind` restores the initial weights w_init (times the mask) before training, as
Algorithm 1 (see `initial_state`); `finetune` keeps training the pruned weights (cheaper; the paper
does not test it, PAPERS.md). PQI, counts, remaining share and accuracy go to MLflow each round.
"""

from __future__ import annotations

import copy
import time
from typing import Literal

import optuna
import torch
from pydantic import Field, model_validator
from torch import nn

from prunetune.spaces import PruningVector, prune
from prunetune.spaces.masks import apply_masks
from prunetune.trainers.finetune import evaluate
from prunetune.trainers.policies.base import Policy, PolicyParams, register_policy
from prunetune.trainers.policies.masked import MaskedNet
from prunetune.trainers.sap import SAPConfig, prune_count, pq_index, sap_step, structured_prune_count
from prunetune.trainers.trial import Iteration, credited_to_parent, example_input, finetune_and_test, measure, train

F = optuna.distributions.FloatDistribution
I = optuna.distributions.IntDistribution  # noqa: E741


class SAPParams(PolicyParams, SAPConfig):
    """SAP's hyperparameters (defaults: the paper's p=0.5, q=1, eta_r=0, gamma=1, beta=0.9) plus
    how a trial runs it; T and E are scaled down from the paper's 30 x 200 epochs."""

    iterations: int = Field(default=3, ge=1, description="T, prune-train rounds (paper: 30 small nets, 15 ResNets)")
    epochs_per_iteration: int = Field(default=1, ge=0, description="E, training epochs per round (paper: 200)")
    mode: Literal["unstructured", "structured"] = Field(
        default="structured", description="weights with masks (paper), or DepGraph channel groups (smaller network)")
    between: Literal["rewind", "finetune"] = Field(
        default="finetune", description="rewind to the initial weights before each round (paper) or keep training")

    @model_validator(mode="after")
    def _scope_fits_mode(self):
        if self.mode == "structured" and self.scope == "neuron":
            raise ValueError("scope: 'neuron' is unstructured only (structured scopes: global, layer)")
        return self


def initial_state(setup) -> dict[str, torch.Tensor]:
    """w_init for rewinding: the parent's own initial weights when prunetune trained it (its
    factory under the same seed, as `trainers.parent.get_parent` does). For a parent loaded from
    a checkpoint the true init is unknown and this is a fresh seeded init of the architecture,
    so `rewind` then means re-initialising, not lottery-ticket rewinding."""
    if not setup.model_name:
        return _init_state(setup.parent, setup.seed)
    from prunetune.trainers.models import build_model

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(setup.seed)
    try:
        fresh = build_model(setup.model_name, in_channels=setup.splits.in_channels,
                            num_classes=setup.splits.num_classes)
    finally:
        torch.random.set_rng_state(gen_state)
    return {k: v.clone() for k, v in fresh.state_dict().items()}


def _init_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A seeded re-initialisation through each layer's `reset_parameters` (inits a model's
    constructor applies afterwards are not reproduced: prefer `initial_state`)."""
    fresh = copy.deepcopy(model)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for m in fresh.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    finally:
        torch.random.set_rng_state(gen_state)
    return {k: v.clone() for k, v in fresh.state_dict().items()}


def _prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Conv/linear weights (dim > 1): the tensors the paper's masks cover."""
    return {n: p for n, p in model.named_parameters() if p.dim() > 1}


@register_policy
class SAPPolicy(Policy):
    name = "sap"
    Params = SAPParams
    uses_vector = False
    search_space = {"p": F(0.1, 0.9), "q": F(1.0, 2.0), "eta_r": F(0.0, 1.0), "gamma": F(0.5, 3.0),
                    "beta": F(0.5, 0.95), "iterations": I(1, 5)}
    test_params = {"iterations": 2, "epochs_per_iteration": 1}

    def run(self, setup):
        cfg: SAPParams = self.params
        t0 = time.perf_counter()
        rounds = self._structured(setup) if cfg.mode == "structured" else self._unstructured(setup)
        subnet = None
        for event in rounds:
            if isinstance(event, Iteration):
                yield event
            else:
                subnet = event
        yield measure(setup, subnet, t0)
        yield from finetune_and_test(setup, subnet)

    def _train_round(self, setup, model: nn.Module, hold) -> float:
        for _ in train(setup, model, self.params.epochs_per_iteration, after_step=hold):
            pass
        model.cpu().eval()
        return evaluate(model, setup.splits.val, device=torch.device("cpu"))[0]

    def _unstructured(self, setup):
        cfg: SAPParams = self.params
        model = copy.deepcopy(setup.parent).cpu().eval()
        w_init = initial_state(setup) if cfg.between == "rewind" else None
        masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in _prunable_weights(model).items()}
        total = sum(m.numel() for m in masks.values())
        for t in range(1, cfg.iterations + 1):
            t1 = time.perf_counter()
            weights = {n: p.detach() for n, p in _prunable_weights(model).items()}
            masks, stats = sap_step(weights, masks, cfg)
            if w_init is not None:
                model.load_state_dict(w_init)
            apply_masks(model, masks)
            val_acc = self._train_round(setup, model, lambda m: apply_masks(m, masks))
            pqis = [s["pqi"] for s in stats["scopes"].values()]
            yield Iteration(t, {"pqi": sum(pqis) / len(pqis), "pruned": stats["pruned"],
                                "remaining": stats["remaining"], "nonzero_weights": stats["remaining"] * total,
                                "val_acc": val_acc}, {"mode": "unstructured", "scope": cfg.scope},
                            time.perf_counter() - t1)
        base = prune(model, PruningVector(), example_input(setup), model_name=setup.model_name,
                     structure=setup.structure, seed=setup.seed)
        yield credited_to_parent(setup, base, "sap-unstructured")

    def _structured(self, setup):
        cfg: SAPParams = self.params
        net = MaskedNet(setup)
        w_init = initial_state(setup) if cfg.between == "rewind" else None
        total = sum(net.sizes.values())
        for t in range(1, cfg.iterations + 1):
            t1 = time.perf_counter()
            scores = net.channel_scores("group_l2")
            norms = {r: scores[r][net.alive[r]].sqrt() for r in net.groups()}  # group L2 norm per alive channel
            off, pqi = self._structured_step(net, norms)
            net.switch_off(off)
            if w_init is not None:
                net.model.load_state_dict({k: v for k, v in w_init.items() if k in net.model.state_dict()})
                net.reapply()
            val_acc = self._train_round(setup, net.model, net.reapply)
            alive = sum(len(net.alive[r]) for r in net.groups())
            yield Iteration(t, {"pqi": pqi, "pruned": sum(len(v) for v in off.values()),
                                "remaining": alive / total, "val_acc": val_acc},
                            {"mode": "structured", "scope": cfg.scope}, time.perf_counter() - t1)
        yield net.materialize("sap-structured")

    def _structured_step(self, net: MaskedNet, norms: dict[str, torch.Tensor]) -> tuple[dict[str, list[int]], float]:
        """Channels to switch off ({root: full-group indices}) and the PQ Index that set the count."""
        cfg: SAPParams = self.params
        off: dict[str, list[int]] = {}
        if cfg.scope == "layer":
            pqis = []
            for r, g in norms.items():
                pqis.append(pq_index(g, cfg.p, cfg.q))
                c = structured_prune_count(g, cfg)
                order = torch.argsort(g, stable=True)[:c]
                off[r] = [net.alive[r][int(i)] for i in order]
            return off, sum(pqis) / max(len(pqis), 1)
        roots = list(norms)
        flat = torch.cat([norms[r] for r in roots])
        pqi = pq_index(flat, cfg.p, cfg.q)
        c = prune_count(flat.numel(), pqi, cfg)
        owner = [(r, j) for r in roots for j in range(norms[r].numel())]
        left = {r: norms[r].numel() for r in roots}
        for i in torch.argsort(flat, stable=True).tolist():
            if c == 0:
                break
            r, j = owner[i]
            if left[r] > 1:  # a group never loses its last channel
                off.setdefault(r, []).append(net.alive[r][j])
                left[r] -= 1
                c -= 1
        return off, pqi
