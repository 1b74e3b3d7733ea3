"""Centred Kernel Alignment between two representations of the same examples.

Linear CKA (Kornblith et al., 2019), biased estimator, computed in float64:
CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) with column-centred X and Y.
"""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of (n, p1) and (n, p2) features; 1.0 means identical up to rotation and scale.

    >>> x = torch.randn(100, 8)
    >>> round(linear_cka(x, 3 * x), 6)
    1.0
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples: {x.shape[0]} vs {y.shape[0]} rows")
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    num = torch.linalg.matrix_norm(y.T @ x) ** 2
    den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if den <= 0:
        return 0.0
    return float(num / den)
