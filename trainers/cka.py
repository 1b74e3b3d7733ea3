"""Centred Kernel Alignment (CKA) between two representations of the same n examples.

CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) on n x n Gram matrices (Kornblith et al.,
2019). The biased HSIC_0 inflates CKA when features are wide relative to n; the unbiased HSIC_1
(Song et al., 2012) removes that bias and, averaged over minibatches, gives minibatch CKA
(Nguyen et al., 2021). See PAPERS.md section 5. Everything is computed in float64; inputs are
(n, ...) features, flattened to (n, p).
The one linear-CKA implementation lives in `spaces` (its block criterion needs it, and `spaces`
may not import `trainers`); `linear_cka` here re-exports it with a row check.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from prunetune.spaces.block_criteria import linear_cka as _linear_cka


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of (n, p1) and (n, p2) features, biased: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
    with centred columns; 1.0 means identical up to rotation and scale.

    >>> x = torch.randn(100, 8)
    >>> round(linear_cka(x, 3 * x), 6)
    1.0
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples: {x.shape[0]} vs {y.shape[0]} rows")
    return _linear_cka(x, y)


def _pair(a: torch.Tensor, b: torch.Tensor, min_n: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten to (n, p) float64 and check both have the same n >= min_n."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{what} needs the same examples: {a.shape[0]} vs {b.shape[0]} rows")
    if a.shape[0] < min_n:
        raise ValueError(f"{what} needs n >= {min_n} examples, got n={a.shape[0]}")
    return a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()


def _grams(K: torch.Tensor, L: torch.Tensor, min_n: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = K.shape[0]
    if K.dim() != 2 or K.shape != (n, n) or L.shape != (n, n):
        raise ValueError(f"{what} needs two n x n Gram matrices of the same n, got {tuple(K.shape)} and {tuple(L.shape)}")
    return _pair(K, L, min_n, what)


def hsic0(K: torch.Tensor, L: torch.Tensor) -> float:
    """Biased HSIC_0(K, L) = tr(K H L H) / (n-1)^2, H = I - 11^T/n; with K = XX^T it gives linear CKA.

    >>> round(hsic0(torch.eye(3), torch.eye(3)), 6)  # tr(H H) / 4 = 2 / 4
    0.5
    """
    K, L = _grams(K, L, 2, "HSIC_0")
    n = K.shape[0]
    Kc = K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()  # H K H
    return float((Kc * L.T).sum() / (n - 1) ** 2)


def hsic1(K: torch.Tensor, L: torch.Tensor) -> float:
    """Unbiased HSIC_1 (Song et al. 2012; Nguyen et al. eq. 3); with Kt, Lt = K, L with zero diagonals:
    [tr(Kt Lt) + (1^T Kt 1)(1^T Lt 1)/((n-1)(n-2)) - 2/(n-2) 1^T Kt Lt 1] / (n(n-3)). Needs n >= 4.

    >>> x = torch.randn(50, 3, dtype=torch.float64)
    >>> abs(hsic1(x @ x.T, x @ x.T) - hsic1(x @ x.T, (2 * x) @ (2 * x).T) / 4) < 1e-12
    True
    """
    K, L = _grams(K, L, 4, "HSIC_1")
    n = K.shape[0]
    K = K - torch.diag(torch.diagonal(K))
    L = L - torch.diag(torch.diagonal(L))
    trace = (K * L.T).sum()
    middle = K.sum() * L.sum() / ((n - 1) * (n - 2))
    last = 2.0 / (n - 2) * (K.sum(0) @ L.sum(1))  # 1^T K L 1
    return float((trace + middle - last) / (n * (n - 3)))


def _gram(x: torch.Tensor, kernel: str, sigma_frac: float) -> torch.Tensor:
    if kernel == "linear":
        return x @ x.T
    if kernel == "rbf":
        sq = torch.cdist(x, x).square()
        n = x.shape[0]
        off = sq[~torch.eye(n, dtype=torch.bool)]
        sigma2 = (sigma_frac**2) * off.sqrt().median().square()
        return torch.exp(-sq / (2 * sigma2)) if sigma2 > 0 else torch.ones_like(sq)
    raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")


def _cka(hsic, K: torch.Tensor, L: torch.Tensor) -> float:
    den = hsic(K, K) * hsic(L, L)
    return hsic(K, L) / math.sqrt(den) if den > 0 else 0.0


def kernel_cka(
    x: torch.Tensor, y: torch.Tensor, *, kernel: str = "linear", sigma_frac: float = 1.0, unbiased: bool = False
) -> float:
    """CKA from n x n Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC = hsic1 if
    `unbiased` else hsic0. kernel="rbf": K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)),
    sigma = sigma_frac * median pairwise distance (off-diagonal). Costs O(n^2) memory.

    >>> x = torch.randn(60, 5)
    >>> round(kernel_cka(x, x, kernel="rbf", sigma_frac=0.5), 6)
    1.0
    """
    x, y = _pair(x, y, 4 if unbiased else 2, "unbiased CKA" if unbiased else "CKA")
    return _cka(hsic1 if unbiased else hsic0, _gram(x, kernel, sigma_frac), _gram(y, kernel, sigma_frac))


def unbiased_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Debiased linear CKA: linear kernels with hsic1, so independent features give ~0 even when
    p >> n (the biased estimator does not). Needs n >= 4.

    >>> x = torch.randn(100, 8)
    >>> round(unbiased_cka(x, x @ torch.linalg.qr(torch.randn(8, 8))[0]), 6)
    1.0
    """
    return kernel_cka(x, y, kernel="linear", unbiased=True)


def minibatch_cka(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Minibatch linear CKA (Nguyen et al. 2021) over k batches (x_i, y_i) of the same examples:
    (1/k sum hsic1(K_i, L_i)) / sqrt((1/k sum hsic1(K_i, K_i)) (1/k sum hsic1(L_i, L_i))).
    HSIC_1 is unbiased, so the value barely depends on the batch size. Each batch needs n_i >= 4.

    >>> x = torch.randn(64, 4)
    >>> round(minibatch_cka([(x[:32], 2 * x[:32]), (x[32:], 2 * x[32:])]), 6)
    1.0
    """
    kl = kk = ll = 0.0
    k = 0
    for x, y in batches:
        x, y = _pair(x, y, 4, "minibatch CKA")
        K, L = x @ x.T, y @ y.T
        kl, kk, ll, k = kl + hsic1(K, L), kk + hsic1(K, K), ll + hsic1(L, L), k + 1
    if k == 0:
        raise ValueError("minibatch CKA needs at least one batch")
    return kl / math.sqrt(kk * ll) if kk * ll > 0 else 0.0
