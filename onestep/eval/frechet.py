"""Fréchet distance between Gaussians fitted to feature sets (FID, Heusel et al. 2017, eq. (6)):

    d^2 = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2})

tr((S_1 S_2)^{1/2}) is computed as the trace of the square root of the symmetric PSD matrix
S_1^{1/2} S_2 S_1^{1/2} (same eigenvalues as S_1 S_2), with symmetric square roots from ``eigh`` in float64:
no complex parts to discard, unlike ``scipy.linalg.sqrtm`` of the non-symmetric product.
"""

from __future__ import annotations

import torch


def gaussian_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (float64) of features (N, D)."""
    f = torch.as_tensor(feats).double().reshape(feats.shape[0], -1)
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    mu = f.mean(0)
    fc = f - mu
    return mu, fc.T @ fc / (f.shape[0] - 1)


def sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clamped to 0)."""
    a = 0.5 * (a + a.T)
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = torch.as_tensor(mu1).double().flatten(), torch.as_tensor(mu2).double().flatten()
    s1, s2 = torch.as_tensor(sigma1).double(), torch.as_tensor(sigma2).double()
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(),) * 2:
        raise ValueError(f"statistics do not match: means {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
                         f"covariances {tuple(s1.shape)}/{tuple(s2.shape)}")
    r1 = sqrtm_psd(s1)
    inner = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh(0.5 * (inner + inner.T)).clamp_min(0).sqrt().sum()
    d = ((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean
    return float(d.clamp_min(0))


def frechet_distance_feats(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
