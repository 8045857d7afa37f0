"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs", eq. (2)): the unbiased
MMD^2 estimate with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets
(as clean-fid and the paper's reference code do). Unlike FID it is unbiased in the sample count.
"""

from __future__ import annotations

import torch


def _kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # products in the features' precision (float32 for network features, as the reference code), sums in float64
    return ((x @ y.T / x.shape[1] + 1) ** 3).double()


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MMD_u^2 = 1/(m(m-1)) sum_{i!=j} [k(x_i,x_j) + k(y_i,y_j)] - 2/m^2 sum_{i,j} k(x_i,y_j), |x| = |y| = m."""
    m = x.shape[0]
    kxx, kyy, kxy = _kernel(x, x), _kernel(y, y), _kernel(x, y)
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * kxy.mean()


def kid(a: torch.Tensor, b: torch.Tensor, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    a, b = (a, b) if a.dtype == b.dtype == torch.float64 else (a.float(), b.float())
    m = min(a.shape[0], b.shape[0], subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = a[torch.randperm(a.shape[0], generator=g)[:m]]
        y = b[torch.randperm(b.shape[0], generator=g)[:m]]
        total += float(mmd2_unbiased(x, y))
    return total / num_subsets
