"""KID: unbiased polynomial-kernel MMD^2 between two feature sets, averaged over random subsets.

k(x, y) = (gamma * x.y + coef) ** degree with gamma = 1/d by default (Bińkowski et al. 2018). For
each subset we draw ``subset_size`` rows of each set without replacement, with a seeded
``torch.Generator`` in the same order as torchmetrics' ``KernelInceptionDistance.compute`` (real
permutation, then fake permutation), so with ``torch.manual_seed(seed)`` before torchmetrics the
subsets are identical. The std is the population std over subsets, as torchmetrics reports it.
Computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch


def poly_kernel(x: torch.Tensor, y: torch.Tensor, degree: int, gamma: float, coef: float) -> torch.Tensor:
    """(gamma * x y^T + coef) ** degree: (m, d), (n, d) -> (m, n)."""
    return (x @ y.T * gamma + coef) ** degree


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, degree: int = 3, gamma: float | None = None,
                  coef: float = 1.0) -> float:
    """Unbiased MMD^2 of equal-size samples x, y (m, d) under the polynomial kernel."""
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise ValueError(f"need two equal-size samples of at least 2 rows, got {x.shape[0]} and {y.shape[0]}")
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    kxx = poly_kernel(x, x, degree, gamma, coef)
    kyy = poly_kernel(y, y, degree, gamma, coef)
    kxy = poly_kernel(x, y, degree, gamma, coef)
    # Off-diagonal means of k(x, x') and k(y, y'), full mean of k(x, y).
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.sum() / (m * m))


def kid(feats1: np.ndarray, feats2: np.ndarray, *, n_subsets: int = 100, subset_size: int = 1000,
        degree: int = 3, gamma: float | None = None, coef: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased poly-kernel MMD^2 over ``n_subsets`` seeded random subsets.

    ``feats1`` are the reference (real) features, ``feats2`` the generated ones, both (N, d).
    """
    x = torch.as_tensor(np.asarray(feats1), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(feats2), dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sets must be (N, d) with equal d, got {tuple(x.shape)} and {tuple(y.shape)}")
    if subset_size > min(len(x), len(y)):
        raise ValueError(f"subset_size {subset_size} exceeds the smaller feature set "
                         f"({len(x)} reference, {len(y)} generated); lower kid subset_size")
    if n_subsets < 1:
        raise ValueError(f"n_subsets must be >= 1, got {n_subsets}")
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(n_subsets):
        xi = x[torch.randperm(len(x), generator=g)[:subset_size]]
        yi = y[torch.randperm(len(y), generator=g)[:subset_size]]
        vals.append(mmd2_unbiased(xi, yi, degree, gamma, coef))
    v = np.asarray(vals)
    return float(v.mean()), float(v.std())
