"""Centred Kernel Alignment between two representations of the same examples.

Linear CKA (Kornblith et al., 2019), biased estimator, computed in float64:
CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) with column-centred X and Y.
The one implementation lives in `spaces` (its block criterion needs it, and `spaces` may not
import `trainers`); this module is the trainers-side entry point and adds the row check.
"""

from __future__ import annotations

import torch

from prunetune.spaces.block_criteria import linear_cka as _linear_cka


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of (n, p1) and (n, p2) features; 1.0 means identical up to rotation and scale.

    >>> x = torch.randn(100, 8)
    >>> round(linear_cka(x, 3 * x), 6)
    1.0
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples: {x.shape[0]} vs {y.shape[0]} rows")
    return _linear_cka(x, y)
