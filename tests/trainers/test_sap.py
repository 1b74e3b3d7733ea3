"""SAP / PQ Index: Theorem 1 properties, Theorem 2 bound, prune-count ranges, scopes of sap_step."""

import math
import random

import pytest
import torch
from pydantic import ValidationError

from prunetune.trainers.sap import (SAPConfig, pq_index, prune_count, retain_bound, sap_step,
                                    structured_prune_count)

P, Q = 0.5, 1.0


def test_pqi_constant_is_zero_and_one_hot_is_max():
    assert pq_index(torch.full((50,), 3.0), P, Q) == pytest.approx(0.0, abs=1e-12)
    for p, q in [(0.5, 1.0), (1.0, 2.0), (0.2, 1.0)]:
        d = 20
        one_hot = torch.zeros(d)
        one_hot[7] = -4.0
        # zeros are part of the vector: I over all d entries reaches 1 - d^(1/q - 1/p)
        assert pq_index(one_hot, p, q) == pytest.approx(1 - d ** (1 / q - 1 / p), abs=1e-12)
    assert pq_index(torch.zeros(5), P, Q) == 0.0
    assert pq_index(torch.zeros(0), P, Q) == 0.0


def test_pqi_scale_invariant_and_in_range():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        w = torch.randn(100, generator=g, dtype=torch.float64)
        i = pq_index(w, P, Q)
        assert pq_index(7.3 * w, P, Q) == pytest.approx(i, abs=1e-12)
        assert 0 <= i <= 1 - 100 ** (1 / Q - 1 / P)


def test_pqi_bill_gates_and_robin_hood():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    richer = torch.tensor([0.5, 2.0, 3.0, 4.5])  # mass moved from the smallest to the largest
    assert pq_index(richer, P, Q) > pq_index(w, P, Q)
    fairer = torch.tensor([1.5, 2.0, 3.0, 3.5])  # Robin Hood: from the largest to the smallest
    assert pq_index(fairer, P, Q) < pq_index(w, P, Q)
    assert pq_index(torch.randn(200) ** 5, P, Q) > pq_index(torch.rand(200) + 1, P, Q)


@pytest.mark.parametrize("eta", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("p,q", [(0.5, 1.0), (1.0, 2.0)])
def test_theorem2_bound_holds(eta, p, q):
    g = torch.Generator().manual_seed(1)
    for k in range(6):
        w = torch.randn(300, generator=g, dtype=torch.float64) ** (1 + k)  # sparser as k grows
        mass = w.abs().sort(descending=True).values ** p
        head = mass.cumsum(0)
        # smallest r whose top-r p-mass is at least 1/(1+eta) of the total (tail <= eta * head)
        r = int((head < mass.sum() / (1 + eta) * (1 - 1e-12)).sum()) + 1
        assert r >= retain_bound(300, pq_index(w, p, q), p, q, eta) - 1e-9


def test_prune_count_zero_when_retain_covers_all():
    cfg = SAPConfig()
    pqi = pq_index(torch.full((40,), 0.2), cfg.p, cfg.q)
    assert retain_bound(40, pqi, cfg.p, cfg.q, cfg.eta_r) == pytest.approx(40)
    assert prune_count(40, pqi, cfg) == 0
    assert prune_count(0, 0.5, cfg) == 0
    # maximal sparsity, aggressive gamma: capped by beta and never removes everything
    assert prune_count(10, 1 - 10 ** (1 / cfg.q - 1 / cfg.p), SAPConfig(gamma=9)) == 9
    assert prune_count(3, 0.4, SAPConfig(gamma=9, beta=1.0)) == 2


def test_prune_count_matches_formula():
    cfg = SAPConfig()
    d, pqi = 1000, 0.3
    r = math.ceil(d * (1 - pqi) ** (Q * P / (Q - P)))  # = ceil(490.0...) with eta=0
    assert prune_count(d, pqi, cfg) == d - r


def test_prune_count_property_ranges():
    rng = random.Random(2)
    for _ in range(2000):
        d = rng.randint(1, 5000)
        p = rng.uniform(0.05, 2.0)
        q = p + rng.uniform(0.01, 3.0)
        cfg = SAPConfig(p=p, q=q, eta_r=rng.choice([0.0, rng.uniform(0, 2)]),
                        gamma=rng.uniform(0.1, 10), beta=rng.uniform(0.01, 1.0))
        pqi = rng.uniform(0, 1 - d ** (1 / q - 1 / p))
        c = prune_count(d, pqi, cfg)
        assert isinstance(c, int)
        assert 0 <= c <= min(cfg.beta * d + 1e-6, d - 1)
        if math.ceil(retain_bound(d, pqi, p, q, cfg.eta_r)) >= d:
            assert c == 0


def test_config_defaults_and_validation():
    cfg = SAPConfig()
    assert (cfg.p, cfg.q, cfg.eta_r, cfg.gamma, cfg.beta) == (0.5, 1.0, 0.0, 1.0, 0.9)
    with pytest.raises(ValidationError) as err:
        SAPConfig(p=1.0, q=1.0)
    assert err.value.errors()[0]["loc"] == ("q",) and "q must be greater than p" in str(err.value)
    for bad in [{"beta": 0}, {"beta": 1.5}, {"gamma": 0}, {"eta_r": -0.1}, {"p": 0}, {"iterations": 0},
                {"scope": "row"}, {"lr": 0.1}]:
        with pytest.raises(ValidationError):
            SAPConfig(**bad)


def _model(seed: int):
    g = torch.Generator().manual_seed(seed)
    weights = {"conv": torch.randn(4, 3, 3, 3, generator=g) ** 3, "fc": torch.randn(5, 12, generator=g) ** 3}
    masks = {n: (torch.rand(w.shape, generator=g) > 0.2).float() for n, w in weights.items()}
    return weights, masks


def _scope_views(scope, weights, masks):
    """(name, flat weights, flat old mask, flat new mask getter) for each scope."""
    names = list(weights)
    if scope == "global":
        return {"global": (torch.cat([weights[n].flatten() for n in names]), lambda m: torch.cat([m[n].flatten() for n in names]))}
    if scope == "layer":
        return {n: (weights[n].flatten(), lambda m, n=n: m[n].flatten()) for n in names}
    return {f"{n}/{i}": (weights[n].reshape(weights[n].shape[0], -1)[i],
                         lambda m, n=n, i=i: m[n].reshape(m[n].shape[0], -1)[i])
            for n in names for i in range(weights[n].shape[0])}


@pytest.mark.parametrize("scope", ["global", "layer", "neuron"])
def test_sap_step_removes_smallest_unmasked_per_scope(scope):
    weights, masks = _model(3)
    cfg = SAPConfig(scope=scope)
    new, stats = sap_step(weights, masks, cfg)
    assert set(stats["scopes"]) == set(_scope_views(scope, weights, masks))
    for name, (w, get) in _scope_views(scope, weights, masks).items():
        old_m, new_m = get(masks), get(new)
        assert torch.all(new_m <= old_m)  # masks only lose ones
        s = stats["scopes"][name]
        alive = old_m.bool()
        assert s["d"] == int(alive.sum())
        assert s["pqi"] == pytest.approx(pq_index(w[alive], cfg.p, cfg.q))
        assert s["c"] == prune_count(s["d"], s["pqi"], cfg)
        removed = alive & ~new_m.bool()
        kept = new_m.bool()
        assert int(removed.sum()) == s["c"]
        if s["c"] and kept.any():
            assert w[removed].abs().max() <= w[kept].abs().min()
    assert stats["pruned"] > 0
    total = sum(m.numel() for m in new.values())
    assert stats["remaining"] == pytest.approx(sum(float(m.sum()) for m in new.values()) / total)
    for n in weights:
        assert new[n].shape == masks[n].shape and new[n].dtype == masks[n].dtype


def test_sap_step_ties_do_not_keep_extras():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 50.0, 100.0, 200.0]])
    m = torch.ones_like(w)
    new, stats = sap_step({"a": w}, {"a": m}, SAPConfig(scope="layer"))
    c = stats["scopes"]["a"]["c"]
    assert 0 < c < 5  # a cut inside the tied block
    assert int((m - new["a"]).sum()) == c


def test_sap_step_scopes_differ_when_one_layer_is_large():
    g = torch.Generator().manual_seed(4)
    small = torch.randn(3, 6, generator=g) ** 3 * 1e-3
    large = torch.randn(3, 6, generator=g) ** 3 * 1e3
    small[0] *= 100  # rows of different scale too, so neuron != layer
    weights = {"small": small, "large": large}
    masks = {n: torch.ones_like(w) for n, w in weights.items()}
    out = {s: sap_step(weights, masks, SAPConfig(scope=s))[0] for s in ["global", "layer", "neuron"]}
    flat = {s: torch.cat([m["small"].flatten(), m["large"].flatten()]) for s, m in out.items()}
    assert not torch.equal(flat["global"], flat["layer"])
    assert not torch.equal(flat["global"], flat["neuron"])
    assert not torch.equal(flat["layer"], flat["neuron"])
    # global cuts the small layer hardest, since all its weights sit below the large layer's
    assert out["global"]["small"].sum() < out["layer"]["small"].sum()


def test_sap_step_rejects_bad_input():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="differ in keys"):
        sap_step({"a": w}, {"b": torch.ones(3, 4)}, SAPConfig())
    with pytest.raises(ValueError, match="mask shape"):
        sap_step({"a": w}, {"a": torch.ones(4, 3)}, SAPConfig())
    with pytest.raises(ValueError, match="dim > 1"):
        sap_step({"b": torch.randn(4)}, {"b": torch.ones(4)}, SAPConfig())


def test_structured_prune_count_on_group_norms():
    cfg = SAPConfig()
    assert structured_prune_count(torch.ones(16), cfg) == 0  # equal groups: nothing to prune
    norms = torch.tensor([5.0, 4.0, 0.01, 0.02, 0.01, 0.03, 0.02, 0.01])
    c = structured_prune_count(norms, cfg)
    assert c == prune_count(8, pq_index(norms, cfg.p, cfg.q), cfg)
    # prunes some of the six tiny groups and never reaches the two large ones
    assert 0 < c <= 6
