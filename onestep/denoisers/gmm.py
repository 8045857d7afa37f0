"""Analytic Gaussian-mixture teacher: exact posterior mean and score at every t of every schedule.

Data: p(x0 | c) = sum_k w_ck N(x0; mu_ck, S_ck). Noising x_t = a x0 + s eps gives
    p_t(x | c) = sum_k w_ck N(x; a mu_ck, C_ck),   C_ck = a^2 S_ck + s^2 I.
Posterior over components r_k = w_k N_k(x) / sum_j w_j N_j(x), and per component (Gaussian conditioning)
    E[x0 | x, k] = mu_k + a S_k C_k^{-1} (x - a mu_k),
    grad log p_t = sum_k r_k ( -C_k^{-1} (x - a mu_k) ).
Class label ``num_classes`` (or cond=None) means the marginal mixture over classes, so classifier-free
guidance on this teacher is exact too.
"""

from __future__ import annotations

import math

import torch

from onestep.conditioning import labels_of
from onestep.denoisers.base import Denoiser
from onestep.errors import ConfigError
from onestep.schedules import Schedule


class GaussianMixture:
    """A (class-conditional) Gaussian mixture in R^D. Tensors are float64 for exactness."""

    def __init__(self, means, covs, weights, labels=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        k, d = self.means.shape
        if self.covs.shape != (k, d, d) or self.weights.shape != (k,):
            raise ConfigError(f"mixture shapes disagree: means {tuple(self.means.shape)}, covs "
                              f"{tuple(self.covs.shape)}, weights {tuple(self.weights.shape)}; expected (K,D),(K,D,D),(K,)")
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.num_classes = 0 if self.labels is None else int(self.labels.max()) + 1
        self.dim = d

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def class_prior(self) -> torch.Tensor:
        return torch.zeros(self.num_classes, dtype=torch.float64).index_add_(0, self.labels, self.weights)

    def component_logweights(self, cond: torch.Tensor | None, n: int) -> torch.Tensor:
        """(n, K) log mixture weights given labels; label == num_classes or None -> marginal mixture."""
        logw = self.weights.log().expand(n, -1)
        cond = labels_of(cond)
        if cond is None or self.labels is None:
            return logw
        cond = cond.to(torch.long).cpu()
        member = self.labels[None, :] == cond[:, None]
        uncond = (cond == self.num_classes)[:, None]
        keep = member | uncond
        logw = torch.where(keep, logw, torch.full_like(logw, -math.inf))
        return logw - torch.logsumexp(logw, 1, keepdim=True)

    def sample(self, n: int, cond: torch.Tensor | None = None, generator: torch.Generator | None = None):
        logw = self.component_logweights(cond, n)
        k = torch.multinomial(logw.exp(), 1, generator=generator).squeeze(1)
        chol = torch.linalg.cholesky(self.covs)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[k] + torch.einsum("nij,nj->ni", chol[k], z)

    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        if self.labels is None:
            return None
        return torch.multinomial(self.class_prior(), n, replacement=True, generator=generator)

    # --- the noised mixture --------------------------------------------------------------------------
    def _noised(self, x, a, s):
        """Per-sample, per-component log N_k(x) and C_k^{-1}(x - a mu_k)."""
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        mu = self.means.to(x)
        cov = a[:, None, None, None] ** 2 * self.covs.to(x) + s[:, None, None, None] ** 2 * eye  # (n, K, D, D)
        chol = torch.linalg.cholesky(cov)
        diff = x[:, None, :] - a[:, None, None] * mu[None]  # (n, K, D)
        sol = torch.cholesky_solve(diff.unsqueeze(-1), chol).squeeze(-1)  # C^{-1} diff
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        logn = -0.5 * ((diff * sol).sum(-1) + logdet + self.dim * math.log(2 * math.pi))
        return logn, sol

    def log_prob(self, x, t, schedule: Schedule, cond=None):
        """log p_t(x | c) of the noised mixture (exact)."""
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        logn, _ = self._noised(x, schedule.alpha(t), schedule.sigma(t))
        return torch.logsumexp(logn + self.component_logweights(cond, x.shape[0]).to(x), 1)

    def posterior(self, x, t, schedule: Schedule, cond=None):
        """Exact (E[x0 | x_t], grad log p_t(x_t), responsibilities r)."""
        a, s = schedule.alpha(t), schedule.sigma(t)
        logn, sol = self._noised(x, a, s)
        r = torch.softmax(logn + self.component_logweights(cond, x.shape[0]).to(x), 1)  # (n, K)
        score = -(r[..., None] * sol).sum(1)
        # E[x0|x,k] = mu_k + a S_k C_k^{-1}(x - a mu_k)
        x0_k = self.means.to(x)[None] + a[:, None, None] * torch.einsum("kij,nkj->nki", self.covs.to(x), sol)
        return (r[..., None] * x0_k).sum(1), score, r


class GMMDenoiser(Denoiser):
    """The exact teacher. Native prediction x0; evaluates in float64 and returns the input dtype."""

    prediction = "x0"

    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule
        self.data_shape, self.num_classes = (mixture.dim,), mixture.num_classes

    def forward(self, x_t, t, cond=None):
        self.check_input(x_t, "x_t")
        t = self._time(t, x_t)
        x0, _, _ = self.mixture.posterior(x_t.double(), t.double(), self.schedule, cond)
        return x0.to(x_t.dtype)

    def score(self, x_t, t, cond=None):
        # direct formula (also used by tests to cross-check param.convert)
        t = self._time(t, x_t)
        _, score, _ = self.mixture.posterior(x_t.double(), t.double(), self.schedule, cond)
        return score.to(x_t.dtype)


# --- the mixtures the experiments use ------------------------------------------------------------------

def ring(num_modes: int = 8, radius: float = 1.0, std: float = 0.05) -> GaussianMixture:
    ang = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    means = radius * torch.stack([ang.cos(), ang.sin()], 1)
    covs = (std**2) * torch.eye(2, dtype=torch.float64).expand(num_modes, 2, 2).clone()
    return GaussianMixture(means, covs, torch.ones(num_modes))


def grid(side: int = 5, spacing: float = 0.5, std: float = 0.04, unequal: bool = True, seed: int = 0) -> GaussianMixture:
    """side x side grid centred at 0; with ``unequal`` the weights vary by up to 4x (fixed by seed)."""
    g = torch.Generator().manual_seed(seed)
    c = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    means = torch.cartesian_prod(c, c)
    k = means.shape[0]
    covs = (std**2) * torch.eye(2, dtype=torch.float64).expand(k, 2, 2).clone()
    w = 1 + 3 * torch.rand(k, generator=g, dtype=torch.float64) if unequal else torch.ones(k, dtype=torch.float64)
    return GaussianMixture(means, covs, w)


def class_mixture(dim: int = 16, num_classes: int = 10, per_class: int = 2, scale: float = 1.0,
                  seed: int = 0) -> GaussianMixture:
    """num_classes classes, each a mixture of ``per_class`` anisotropic full-covariance Gaussians in R^dim."""
    g = torch.Generator().manual_seed(seed)
    k = num_classes * per_class
    means = scale * torch.randn(k, dim, generator=g, dtype=torch.float64) / math.sqrt(dim) * 2
    a = torch.randn(k, dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    covs = 0.02 * (a @ a.transpose(1, 2)) + 0.005 * torch.eye(dim, dtype=torch.float64)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return GaussianMixture(means, covs, torch.ones(k), labels)


MIXTURES = {"ring": ring, "grid": grid, "class_mixture": class_mixture}


def make_mixture(name: str, **kwargs) -> GaussianMixture:
    if name not in MIXTURES:
        raise ConfigError(f"teacher.mixture '{name}' is unknown; choose one of {sorted(MIXTURES)}")
    return MIXTURES[name](**kwargs)
