"""CKA estimators: identities, invariances, agreement with the formulas, bias, minibatch."""

import doctest
import itertools

import pytest
import torch

import prunetune.trainers.cka as cka_mod
from prunetune.trainers.cka import hsic0, hsic1, kernel_cka, linear_cka, minibatch_cka, unbiased_cka


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _related(n, p=16, q=12, noise=1.0, seed=0):
    g = _gen(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = x @ torch.randn(p, q, generator=g, dtype=torch.float64) + noise * torch.randn(n, q, generator=g, dtype=torch.float64)
    return x, y


def test_doctests():
    assert doctest.testmod(cka_mod).failed == 0


@pytest.mark.parametrize("cka", [linear_cka, unbiased_cka, lambda a, b: kernel_cka(a, b, kernel="rbf"),
                                 lambda a, b: kernel_cka(a, b, kernel="rbf", unbiased=True)])
def test_self_similarity_is_one(cka):
    x = torch.randn(80, 4, 3, generator=_gen())  # trailing dims are flattened
    assert cka(x, x) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("cka", [linear_cka, unbiased_cka])
def test_orthogonal_and_scale_invariance(cka):
    x, y = _related(100)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=_gen(1), dtype=torch.float64))
    base = cka(x, y)
    assert 0.1 < base < 0.99
    assert cka(x, y @ q) == pytest.approx(base, abs=1e-10)
    assert cka(7.5 * x, 0.01 * y) == pytest.approx(base, abs=1e-10)


def test_linear_cka_equals_kernel_cka_via_hsic0():
    x, y = _related(50, p=30, q=20)
    expected = linear_cka(x, y)
    assert kernel_cka(x, y) == pytest.approx(expected, abs=1e-10)
    K, L = x @ x.T, y @ y.T
    assert hsic0(K, L) / (hsic0(K, K) * hsic0(L, L)) ** 0.5 == pytest.approx(expected, abs=1e-10)


def test_hsic0_matches_explicit_centring_matrix():
    x, y = _related(9)
    K, L = x @ x.T, torch.exp(-torch.cdist(y, y) ** 2 / 50)
    n = K.shape[0]
    H = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    assert hsic0(K, L) == pytest.approx(float(torch.trace(K @ H @ L @ H)) / (n - 1) ** 2, rel=1e-10)


def test_hsic1_matches_u_statistic_loop():
    """HSIC_1 is the U-statistic of E[k_ij l_ij] + E[k_ij] E[l_qr] - 2 E[k_ij l_iq] over distinct indices."""
    x, y = _related(7)
    K, L = (x @ x.T).tolist(), (y @ y.T).tolist()
    n = 7
    t2 = [K[i][j] * L[i][j] for i, j in itertools.permutations(range(n), 2)]
    t3 = [K[i][j] * L[i][q] for i, j, q in itertools.permutations(range(n), 3)]
    t4 = [K[i][j] * L[q][r] for i, j, q, r in itertools.permutations(range(n), 4)]
    expected = sum(t2) / len(t2) + sum(t4) / len(t4) - 2 * sum(t3) / len(t3)
    assert hsic1(torch.tensor(K, dtype=torch.float64), torch.tensor(L, dtype=torch.float64)) == pytest.approx(expected, rel=1e-9)


def test_unbiased_removes_the_bias_of_independent_features():
    g = _gen(2)
    x, y = torch.randn(500, 10, generator=g), torch.randn(500, 10, generator=g)
    assert abs(unbiased_cka(x, y)) < 0.05
    x, y = torch.randn(20, 1000, generator=g), torch.randn(20, 1000, generator=g)
    assert linear_cka(x, y) > 0.5  # biased: wide features look similar
    assert abs(unbiased_cka(x, y)) < 0.2


def _passes(x, y, batch, passes=10, seed=0):
    g = _gen(seed)
    for _ in range(passes):
        order = torch.randperm(x.shape[0], generator=g)
        for idx in order.split(batch):
            yield x[idx], y[idx]


def test_minibatch_converges_to_full_batch_unbiased():
    x, y = _related(2000, p=32, q=24, noise=3.0)
    full = unbiased_cka(x, y)
    mb256 = minibatch_cka(_passes(x, y, 256))
    mb512 = minibatch_cka(_passes(x, y, 512))
    assert 0.1 < full < 0.9
    assert abs(mb256 - full) < 0.02
    assert abs(mb256 - mb512) < 0.02


def test_errors():
    x = torch.randn(10, 3)
    for fn in (linear_cka, unbiased_cka, kernel_cka):
        with pytest.raises(ValueError, match="same examples"):
            fn(x, x[:9])
    with pytest.raises(ValueError, match="n >= 4"):
        unbiased_cka(x[:3], x[:3])
    with pytest.raises(ValueError, match="n >= 4"):
        hsic1(torch.eye(3), torch.eye(3))
    with pytest.raises(ValueError, match="n >= 4"):
        minibatch_cka([(x, x), (x[:3], x[:3])])
    with pytest.raises(ValueError, match="Gram"):
        hsic0(torch.eye(3), torch.eye(4))
    with pytest.raises(ValueError, match="at least one batch"):
        minibatch_cka([])
    with pytest.raises(ValueError, match="kernel"):
        kernel_cka(x, x, kernel="poly")


def test_mean_counts_a_stage_equal_to_the_penultimate_once():
    from prunetune.trainers.probes import cka_to_parent

    g = torch.Generator().manual_seed(0)
    a, pen = torch.randn(50, 8, generator=g), torch.randn(50, 16, generator=g)
    child_a, child_pen = torch.randn(50, 8, generator=g), pen + 0.1 * torch.randn(50, 16, generator=g)
    out = cka_to_parent({"layer1": a, "layer3": pen, "penultimate": pen},
                        {"layer1": child_a, "layer3": child_pen, "penultimate": child_pen})
    assert out["layer3"] == out["penultimate"]
    assert out["mean"] == pytest.approx((out["layer1"] + out["penultimate"]) / 2)
