"""Metrics against the true Gaussian mixture (exact where possible).

- sliced Wasserstein-2: mean over random unit directions of the exact 1-D W2 between equal-size sorted
  projections of the samples and of a fresh reference sample from the true mixture;
- per-mode mass: each sample is assigned to its most probable component (exact posterior at t=0);
- modes covered: components whose mass reaches ``cover_frac`` of their true weight;
- mean and covariance error (Frobenius) of the samples vs the mixture's exact moments.
"""

from __future__ import annotations

import torch

from onestep.denoisers.gmm import GaussianMixture


def sliced_w2(x: torch.Tensor, y: torch.Tensor, num_projections: int = 512, seed: int = 0) -> float:
    if x.shape != y.shape:
        raise ValueError(f"sliced_w2 needs equal sample sets, got {tuple(x.shape)} and {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(x.shape[1], num_projections, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)
    px, _ = (x.double() @ d).sort(0)
    py, _ = (y.double() @ d).sort(0)
    return float(((px - py) ** 2).mean().sqrt())


def assign_modes(mix: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """Most probable component of each sample under the clean mixture."""
    chol = torch.linalg.cholesky(mix.covs)
    diff = x.double()[:, None, :] - mix.means[None]
    sol = torch.cholesky_solve(diff.unsqueeze(-1), chol.expand(x.shape[0], -1, -1, -1)).squeeze(-1)
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    logp = mix.weights.log()[None] - 0.5 * ((diff * sol).sum(-1) + logdet)
    return logp.argmax(1)


def gmm_metrics(mix: GaussianMixture, x: torch.Tensor, cond: torch.Tensor | None = None, *,
                reference: torch.Tensor | None = None, cover_frac: float = 0.1, seed: int = 0) -> dict:
    """Metrics for samples ``x`` (n, D). ``cond``: their labels, so the reference has the same class mix."""
    x = x.double().cpu()
    n = x.shape[0]
    if reference is None:
        reference = mix.sample(n, cond, generator=torch.Generator().manual_seed(10_000 + seed))
    k = mix.num_components
    target = mix.weights if cond is None else _expected_weights(mix, cond)
    mass = torch.bincount(assign_modes(mix, x), minlength=k).double() / n
    rel_err = (mass - target).abs() / target
    covered = int((mass >= cover_frac * target).sum())
    mean, cov = _moments(mix, target)
    xc = x - x.mean(0)
    return {
        "sliced_w2": sliced_w2(x, reference.double(), seed=seed),
        "modes_covered": covered,
        "num_modes": k,
        "worst_mode_mass_err": float(rel_err.max()),
        "mode_mass": mass.tolist(),
        "mean_err": float((x.mean(0) - mean).norm()),
        "cov_err": float(((xc.T @ xc) / (n - 1) - cov).norm()),
        "n": n,
    }


def _expected_weights(mix: GaussianMixture, cond: torch.Tensor) -> torch.Tensor:
    return mix.component_logweights(cond, cond.shape[0]).exp().mean(0)


def _moments(mix: GaussianMixture, w: torch.Tensor):
    mean = (w[:, None] * mix.means).sum(0)
    d = mix.means - mean
    cov = (w[:, None, None] * (mix.covs + d[:, :, None] * d[:, None, :])).sum(0)
    return mean, cov
