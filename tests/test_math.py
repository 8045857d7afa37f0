"""Exact-math tests: schedules, conversions and the Gaussian-mixture teacher, in float64."""

import math

import pytest
import torch

from onestep import param
from onestep.denoisers.base import Guided
from onestep.denoisers.gmm import GMMDenoiser, class_mixture, grid, ring
from onestep.errors import ConfigError
from onestep.schedules import EDM, SCHEDULES, VPDiscrete, make_schedule, match_time


@pytest.fixture(autouse=True)
def _float64():
    """Every tensor these tests create is float64 (restored afterwards: other test files run in float32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


ALL = [make_schedule(n) for n in SCHEDULES] + [VPDiscrete("linear", beta_start=1e-4, beta_end=0.02)]
IDS = [s.name + ("_lin" if getattr(s, "beta_schedule", "") == "linear" else "") for s in ALL]


def interior_ts(s, n=7):
    lo, hi = s.t_min, s.t_max
    if isinstance(s, EDM):
        return torch.exp(torch.linspace(math.log(0.01), math.log(50), n))
    return torch.linspace(lo + 0.05 * (hi - lo), hi - 0.05 * (hi - lo), n)


@pytest.mark.parametrize("s", ALL, ids=IDS)
def test_logsnr_inverse(s):
    t = interior_ts(s)
    assert torch.allclose(s.t_of_logsnr(s.logsnr(t)), t, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("s", ALL, ids=IDS)
def test_derivatives_match_finite_differences(s):
    t = interior_ts(s)
    h = 1e-6 * (s.t_max - s.t_min) if not isinstance(s, VPDiscrete) else 1e-4 / s.num_steps
    da, ds = s.derivatives(t)
    fd_a = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    fd_s = (s.sigma(t + h) - s.sigma(t - h)) / (2 * h)
    assert torch.allclose(da, fd_a, rtol=1e-6, atol=1e-8)
    assert torch.allclose(ds, fd_s, rtol=1e-6, atol=1e-8)


def test_closed_forms():
    t = torch.tensor([0.1, 0.5, 0.9])
    vp = make_schedule("vp_linear")
    la = -0.25 * t**2 * (20 - 0.1) - 0.5 * t * 0.1
    assert torch.allclose(vp.alpha(t), la.exp(), rtol=1e-12)
    assert torch.allclose(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones(3), rtol=1e-12)
    tf = make_schedule("trigflow", sigma_data=0.5)
    assert torch.allclose(tf.sigma(t), 0.5 * torch.sin(t))
    rf = make_schedule("rectified_flow")
    assert torch.allclose(rf.logsnr(t), 2 * torch.log((1 - t) / t))
    # SD table entries are reproduced exactly at integer timesteps
    sd = VPDiscrete("scaled_linear")
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ac = torch.cumprod(1 - betas, 0)
    idx = torch.tensor([0, 1, 499, 999])
    assert torch.allclose(sd.alpha(idx / 999.0) ** 2, ac[idx], rtol=1e-10)


@pytest.mark.parametrize("s", ALL, ids=IDS)
def test_conversions_roundtrip_and_closed_form(s):
    g = torch.Generator().manual_seed(0)
    t = interior_ts(s, 5)
    x0, eps = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    a, sg = s.alpha(t)[:, None], s.sigma(t)[:, None]
    xt = a * x0 + sg * eps
    da, dsg = (d[:, None] for d in s.derivatives(t))
    truth = {"x0": x0, "eps": eps, "v": a * eps - sg * x0, "flow": da * x0 + dsg * eps, "score": -eps / sg}
    for src, pred in truth.items():
        for dst, want in truth.items():
            got = param.convert(pred, src, dst, xt, t, s)
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * want.abs().max()), (src, dst)


def test_flow_is_time_derivative_of_path():
    # u = d/dt (a(t) x0 + s(t) eps) for fixed (x0, eps)
    s = make_schedule("vp_cosine")
    t = torch.tensor([0.3])
    x0, eps = torch.tensor([[0.7, -1.2]]), torch.tensor([[0.2, 0.5]])
    u = param.from_x0_eps(x0, eps, "flow", t, s)
    h = 1e-6
    path = lambda tt: s.alpha(tt)[:, None] * x0 + s.sigma(tt)[:, None] * eps  # noqa: E731
    assert torch.allclose(u, (path(t + h) - path(t - h)) / (2 * h), rtol=1e-7)


@pytest.mark.parametrize("src,dst", [("vp_linear", "edm"), ("vp_cosine", "rectified_flow"),
                                     ("rectified_flow", "trigflow"), ("vp_discrete", "vp_linear")])
def test_match_time_preserves_exact_denoiser(src, dst):
    """The GMM posterior mean is the same at SNR-matched points of two schedules."""
    mix = ring()
    s1, s2 = make_schedule(src), make_schedule(dst)
    d1, d2 = GMMDenoiser(mix, s1), GMMDenoiser(mix, s2)
    t = torch.full((6,), 0.4 if not isinstance(s1, EDM) else 0.8)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    x2, t2 = match_time(x, t, s1, s2)
    assert torch.allclose(s2.logsnr(t2), s1.logsnr(t), atol=1e-8)
    assert torch.allclose(d1.x0(x, t), d2.x0(x2, t2), atol=1e-8)


@pytest.mark.parametrize("sched", ["vp_linear", "edm", "rectified_flow", "trigflow", "vp_discrete"])
@pytest.mark.parametrize("mix", [ring(), grid(side=3), class_mixture(dim=4, num_classes=3)],
                         ids=["ring", "grid", "classes"])
def test_gmm_score_is_gradient_of_log_density(sched, mix):
    s = make_schedule(sched)
    teacher = GMMDenoiser(mix, s)
    g = torch.Generator().manual_seed(2)
    n = 8
    t = interior_ts(s, n)
    x = mix.sample(n, generator=g) * s.alpha(t)[:, None] + s.sigma(t)[:, None] * torch.randn(n, mix.dim, generator=g)
    cond = None if mix.num_classes == 0 else torch.randint(0, mix.num_classes + 1, (n,), generator=g)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob(xr, t, s, cond).sum(), xr)
    assert torch.allclose(teacher.score(x, t, cond), grad, rtol=1e-6, atol=1e-8)
    # the native x0 prediction converted to a score agrees with the direct formula (Tweedie)
    assert torch.allclose(teacher.predict("score", x, t, cond), grad, rtol=1e-6, atol=1e-8)


def test_cfg_wrapper_on_exact_teacher():
    mix = class_mixture(dim=4, num_classes=3)
    s = make_schedule("vp_linear")
    teacher = GMMDenoiser(mix, s)
    x, t = torch.randn(4, 4), torch.full((4,), 0.5)
    c = torch.tensor([0, 1, 2, 1])
    w = 3.0
    want = teacher.score(x, t, torch.full_like(c, 3)) + w * (teacher.score(x, t, c) - teacher.score(x, t, torch.full_like(c, 3)))
    assert torch.allclose(Guided(teacher, w).score(x, t, c), want, atol=1e-8)
    with pytest.raises(ConfigError, match="needs a conditional teacher"):
        Guided(GMMDenoiser(ring(), s), 2.0)


def test_wrong_dimension_is_a_clear_error():
    teacher = GMMDenoiser(ring(), make_schedule("vp_linear"))
    with pytest.raises(ConfigError, match=r"expects \(2,\)"):
        teacher.x0(torch.zeros(3, 5), torch.full((3,), 0.5))


def test_unknown_schedule_and_kind():
    with pytest.raises(ConfigError, match="unknown"):
        make_schedule("nope")
    with pytest.raises(ConfigError, match="unknown"):
        param.convert(torch.zeros(1, 1), "x0", "banana", torch.zeros(1, 1), torch.ones(1) * 0.5, ALL[0])
