"""Sparsity-informed Adaptive Pruning (SAP) and the PQ Index (Diao et al., ICLR 2023).

What: one pruning *step* of SAP (Algorithm 1) on unstructured 0/1 masks, plus the pieces it is
made of. Training, rewinding to init and the outer loop over T iterations are the caller's job;
this module is pure torch so it can be unit-tested and reused by any trainer.

Why: SAP sets the pruning ratio from how sparse the trained weights already are, instead of a
fixed ratio per round. The sparsity measure is the PQ Index (0 < p < q), on a vector w of length d:

    I_{p,q}(w) = 1 - d^(1/q - 1/p) * ||w||_p / ||w||_q  =  1 - M_p(|w|) / M_q(|w|)

(M_s is the power mean (mean |w_i|^s)^(1/s)); 0 <= I <= 1 - d^(1/q - 1/p), larger is sparser.
Theorem 2 turns I into a lower bound on how many weights carry most of the p-mass:

    r_t = d_t (1 + eta_r)^(-q/(q-p)) [1 - I(w_t)]^(qp/(q-p))      (rounded up, as the reference code)
    c_t = floor(d_t * min(gamma (1 - r_t/d_t), beta))              (number of weights to prune)

and the c_t smallest-magnitude unmasked weights are removed in each scope (global / layer / neuron).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# Floors of products like 0.9 * 30 can land a hair under the integer (26.999999999999996).
_FLOOR_EPS = 1e-9


class SAPConfig(BaseModel):
    """SAP hyper-parameters; defaults are the paper's main setting (p=0.5, q=1, eta_r=0, gamma=1, beta=0.9).

    ``scope`` defaults to "global" (the paper's Fig. 2); its Fig. 3 finds "layer"/"neuron" better
    when few weights remain. ``iterations`` (T) is 30 for the paper's small models, 15 for ResNets;
    it is used by the outer loop, not by :func:`sap_step`.

    >>> SAPConfig(scope="neuron").q
    1.0
    """

    model_config = ConfigDict(extra="forbid")

    p: float = Field(default=0.5, gt=0, description="the smaller norm order of the PQ Index")
    q: float = Field(default=1.0, gt=0, description="the larger norm order of the PQ Index, q > p")
    eta_r: float = Field(default=0.0, ge=0, description="tolerated tail p-mass ratio in Theorem 2; >0 prunes more")
    gamma: float = Field(default=1.0, gt=0, description="multiplier of the prune ratio 1 - r/d; >1 prunes more")
    beta: float = Field(default=0.9, gt=0, le=1, description="cap on the share of remaining weights pruned per step")
    scope: Literal["global", "layer", "neuron"] = Field(
        default="global", description="where PQI, budget and threshold are computed: all weights, each tensor, each output row")
    iterations: int = Field(default=30, ge=1, description="T, number of prune-retrain rounds")

    @field_validator("q")
    @classmethod
    def _q_above_p(cls, q: float, info: ValidationInfo) -> float:
        p = info.data.get("p")
        if p is not None and q <= p:
            raise ValueError(f"q must be greater than p (got q={q}, p={p})")
        return q


def pq_index(w: torch.Tensor, p: float, q: float) -> float:
    """PQ Index I = 1 - d^(1/q - 1/p) ||w||_p / ||w||_q of the given (already masked) values.

    Computed as 1 - M_p/M_q on |w| in float64, after dividing by max|w| (I is scale invariant,
    and this keeps |w|^p of p<1 quasi-norms well conditioned). Returns 0 for an empty or all-zero
    w, where I is undefined (the reference code does the same).

    >>> pq_index(torch.tensor([1.0, 1.0, 1.0]), 0.5, 1.0)
    0.0
    """
    x = w.detach().abs().to(torch.float64).flatten()
    if x.numel() == 0:
        return 0.0
    top = x.max()
    if top == 0:
        return 0.0
    x = x / top
    m_p = x.pow(p).mean().pow(1.0 / p)
    m_q = x.pow(q).mean().pow(1.0 / q)
    return float(1.0 - m_p / m_q)


def retain_bound(d: int, pqi: float, p: float, q: float, eta_r: float) -> float:
    """Theorem 2 lower bound on the weights to keep: r = d (1+eta_r)^(-q/(q-p)) [1 - I]^(qp/(q-p)).

    1 - I is clamped at 0 against rounding. Real-valued; :func:`prune_count` rounds it up.
    """
    if q <= p:
        raise ValueError(f"q must be greater than p (got q={q}, p={p})")
    base = max(1.0 - pqi, 0.0)
    return d * (1.0 + eta_r) ** (-q / (q - p)) * base ** (q * p / (q - p))


def prune_count(d: int, pqi: float, cfg: SAPConfig) -> int:
    """Number of weights to remove from a scope of d weights with PQ Index ``pqi``.

    r = ceil(retain_bound); if r >= d nothing is pruned; else
    c = floor(d * min(gamma (1 - r/d), beta)) = floor(min(gamma (d - r), beta d)),
    clamped to [0, d - 1] so a scope is never emptied.
    """
    if d <= 0:
        return 0
    r = math.ceil(retain_bound(d, pqi, cfg.p, cfg.q, cfg.eta_r))
    if r >= d:
        return 0
    c = math.floor(min(cfg.gamma * (d - r), cfg.beta * d) + _FLOOR_EPS)
    return int(min(max(c, 0), d - 1))


def _prune_flat(w: torch.Tensor, m: torch.Tensor, cfg: SAPConfig) -> tuple[torch.Tensor, dict]:
    """Prune one scope given as flat weights ``w`` and 0/1 mask ``m``; returns the new mask and stats.

    Removes exactly c entries: the c smallest |w| among the unmasked ones (stable argsort, so ties
    go to the lower index). The reference code prunes ``|w| < pivot``, which lets ties keep extras.
    """
    alive = m.nonzero(as_tuple=True)[0]
    vals = w[alive]
    d = int(alive.numel())
    pqi = pq_index(vals, cfg.p, cfg.q)
    r = math.ceil(retain_bound(d, pqi, cfg.p, cfg.q, cfg.eta_r)) if d else 0
    c = prune_count(d, pqi, cfg)
    new = m.clone()
    if c:
        order = torch.argsort(vals.detach().abs(), stable=True)
        new[alive[order[:c]]] = 0
    return new, {"pqi": pqi, "d": d, "r": r, "c": c}


@torch.no_grad()
def sap_step(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
             cfg: SAPConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """One SAP pruning step: new masks (ones only turn to zeros) and stats.

    ``weights`` and ``masks`` share keys and shapes; only tensors with dim > 1 belong here (biases
    and norms are not pruned). Scopes, each with its own PQI over its unmasked |w|, budget c and
    magnitude cut:
      - global: all masked weights concatenated;
      - layer: each tensor;
      - neuron: each output row ``w.view(out, -1)`` (still unstructured inside the row).

    Stats: ``{"scopes": {name: {"pqi", "d", "r", "c"}}, "pruned": int, "remaining": float}``, with
    scope names "global", the tensor name, or "name/row"; ``remaining`` is the share of all weights
    still unmasked after the step.
    """
    if set(weights) != set(masks):
        raise ValueError(f"weights and masks differ in keys: {sorted(set(weights) ^ set(masks))}")
    for name, w in weights.items():
        if w.dim() < 2:
            raise ValueError(f"{name}: only weights with dim > 1 are pruned, got shape {tuple(w.shape)}")
        if masks[name].shape != w.shape:
            raise ValueError(f"{name}: mask shape {tuple(masks[name].shape)} != weight shape {tuple(w.shape)}")

    names = list(weights)
    scopes: dict[str, dict] = {}
    new_masks: dict[str, torch.Tensor] = {}
    if cfg.scope == "global":
        flat_w = torch.cat([weights[n].detach().flatten() for n in names])
        flat_m = torch.cat([masks[n].flatten() for n in names])
        new_flat, scopes["global"] = _prune_flat(flat_w, flat_m, cfg)
        for n, part in zip(names, new_flat.split([weights[n].numel() for n in names])):
            new_masks[n] = part.view_as(masks[n]).clone()
    elif cfg.scope == "layer":
        for n in names:
            new, scopes[n] = _prune_flat(weights[n].detach().flatten(), masks[n].flatten(), cfg)
            new_masks[n] = new.view_as(masks[n])
    else:  # neuron
        for n in names:
            w_rows = weights[n].detach().reshape(weights[n].shape[0], -1)
            m_rows = masks[n].reshape(masks[n].shape[0], -1)
            rows = []
            for i in range(w_rows.shape[0]):
                row, scopes[f"{n}/{i}"] = _prune_flat(w_rows[i], m_rows[i], cfg)
                rows.append(row)
            new_masks[n] = torch.stack(rows).view_as(masks[n])

    total = sum(m.numel() for m in new_masks.values())
    kept = sum(int(m.count_nonzero()) for m in new_masks.values())
    stats = {"scopes": scopes, "pruned": sum(s["c"] for s in scopes.values()),
             "remaining": kept / total if total else 0.0}
    return new_masks, stats


def structured_prune_count(group_norms: torch.Tensor, cfg: SAPConfig) -> int:
    """[ours, not in the paper] Number of groups (filters/channels) to remove in a structured step.

    The PQ Index is taken over the vector of group norms (d = number of groups) and the same
    r/c rule as :func:`prune_count` is applied; the caller removes the c lowest-norm groups.
    """
    g = group_norms.detach().flatten()
    return prune_count(int(g.numel()), pq_index(g, cfg.p, cfg.q), cfg)
