"""DSM, the DMD gradient and the GMM metrics against closed forms."""

import math

import pytest
import torch

from onestep.denoisers.gmm import GaussianMixture, GMMDenoiser, ring
from onestep.eval.gmm_metrics import gmm_metrics, sliced_w2
from onestep.objectives.distribution_matching import dmd_gradient, dmd_loss
from onestep.core import dsm_loss
from onestep.schedules import make_schedule


def gaussian(mean, std, dim=2):
    return GaussianMixture(torch.full((1, dim), float(mean)), (std**2) * torch.eye(dim, dtype=torch.float64)[None], [1.0])


@pytest.mark.parametrize("weighting", ["x0", "eps", "edm"])
def test_dsm_loss_of_exact_denoiser_is_posterior_variance(weighting):
    """For data N(0, c^2 I) at fixed t: E||E[x0|x_t] - x0||^2 per dim = c^2 s^2 / (a^2 c^2 + s^2)."""
    torch.manual_seed(0)
    s = make_schedule("vp_linear")
    c, tval = 0.8, 0.3
    exact = GMMDenoiser(gaussian(0.0, c), s)
    x0 = c * torch.randn(200_000, 2, dtype=torch.float64)
    t = torch.full((x0.shape[0],), tval, dtype=torch.float64)
    a, sg = float(s.alpha(torch.tensor(tval))), float(s.sigma(torch.tensor(tval)))
    var = c**2 * sg**2 / (a**2 * c**2 + sg**2)
    sig, sd = sg / a, 0.5
    want = {"x0": var, "eps": var * a**2 / sg**2, "edm": var * (sig**2 + sd**2) / (sig * sd) ** 2}[weighting]
    got = float(dsm_loss(exact, x0, weighting=weighting, t=t))
    assert abs(got - want) / want < 0.01, (got, want)


def test_dmd_gradient_matches_gaussian_closed_form():
    """Real N(0, I), fake N(m, s^2 I) with exact scores: grad = (mu_fake - mu_real) / mean|x - mu_real|."""
    torch.manual_seed(0)
    sched = make_schedule("vp_linear")
    m, sd = 0.5, 0.3
    real, fake = GMMDenoiser(gaussian(0.0, 1.0), sched), GMMDenoiser(gaussian(m, sd), sched)
    x = m + sd * torch.randn(64, 2, dtype=torch.float64)
    t = torch.full((64,), 0.4, dtype=torch.float64)
    torch.manual_seed(1)
    grad, _ = dmd_gradient(real, fake, x, t=t)
    torch.manual_seed(1)
    eps = torch.randn_like(x)  # the same noise dmd_gradient drew
    a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    xt = a * x + s * eps
    mu_real = a * xt / (a**2 + s**2)  # E[x0 | x_t] for N(0, I)
    mu_fake = m + a * sd**2 * (xt - a * m) / (a**2 * sd**2 + s**2)
    want = (mu_fake - mu_real) / (x - mu_real).abs().mean(1, keepdim=True)
    assert torch.allclose(grad, want, rtol=1e-10, atol=1e-12)
    # the surrogate loss back-propagates exactly grad / numel into the generator output
    xr = x.clone().requires_grad_(True)
    torch.manual_seed(1)
    loss, _ = dmd_loss(real, fake, xr, t=t)
    (g,) = torch.autograd.grad(loss, xr)
    assert torch.allclose(g.double(), want / x.numel(), rtol=1e-5, atol=1e-12)


def test_dmd_gradient_moves_generator_toward_real():
    """Descending the DMD gradient shrinks the mean gap and fixes the scale of a Gaussian generator."""
    torch.manual_seed(0)
    sched = make_schedule("vp_linear")
    real = GMMDenoiser(gaussian(0.0, 1.0), sched)
    m, sd = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    for _ in range(200):
        fake = GMMDenoiser(gaussian(float(m), float(sd)), sched)
        z = torch.randn(512, 2, dtype=torch.float64)
        grad, _ = dmd_gradient(real, fake, m + sd * z)
        m = m - 0.05 * grad.mean()
        sd = sd - 0.05 * (grad * z).mean()
    assert abs(float(m)) < 0.1 and abs(float(sd) - 1.0) < 0.1, (float(m), float(sd))


def test_sliced_w2_of_a_shift():
    """SW2(x, x + delta) = sqrt(mean_d (delta . d)^2) -> |delta| / sqrt(D) for many directions."""
    x = torch.randn(3000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    delta = torch.tensor([0.3, -0.4], dtype=torch.float64)
    got = sliced_w2(x, x + delta, num_projections=4096)
    assert abs(got - 0.5 / math.sqrt(2)) < 0.01
    assert sliced_w2(x, x) == 0.0


def test_mode_metrics():
    mix = ring()
    g = torch.Generator().manual_seed(0)
    x = mix.sample(8000, generator=g)
    m = gmm_metrics(mix, x)
    assert m["modes_covered"] == 8 and m["worst_mode_mass_err"] < 0.1 and m["mean_err"] < 0.03
    # drop one mode entirely: 7 covered and a 100% mass error on it
    ang = torch.atan2(x[:, 1], x[:, 0])
    kept = x[(ang.abs() > 0.3)]
    m2 = gmm_metrics(mix, kept)
    assert m2["modes_covered"] == 7 and m2["worst_mode_mass_err"] == pytest.approx(1.0)
    # collapse to a single point: covariance error equals the mixture's covariance norm
    m3 = gmm_metrics(mix, torch.zeros(1000, 2, dtype=torch.float64))
    assert m3["modes_covered"] <= 1 and m3["cov_err"] > 0.5
