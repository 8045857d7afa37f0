"""Consistency family (issue 5): exact TrigFlow conversion, the sCM tangent against closed forms and finite
differences, CD/iCT pieces, the boundary parametrization, the JVP through diffusers attention, and short
training runs on the GMMs."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from onestep.denoisers.base import Denoiser
from onestep.denoisers.consistency import ConsistencyBoundary
from onestep.denoisers.gmm import GMMDenoiser, grid, ring
from onestep.denoisers.nets import MLPDenoiser
from onestep.denoisers.trigflow import TrigFlowDenoiser, as_trigflow, trigflow_range, velocity
from onestep.errors import ConfigError
from onestep.objectives import consistency as C
from onestep.objectives.scm import scm_tangent
from onestep.schedules import RectifiedFlow, TrigFlow, make_schedule

SOURCES = [("vp_linear", "eps"), ("vp_cosine", "v"), ("vp_discrete", "eps"), ("edm", "x0"),
           ("rectified_flow", "flow"), ("trigflow", "v")]


class AsKind(Denoiser):
    """The exact GMM teacher re-expressed in another native parametrization (an eps-, v- or flow-teacher)."""

    def __init__(self, base: Denoiser, kind: str):
        super().__init__()
        self.base, self.prediction = base, kind
        self.schedule, self.data_shape = base.schedule, base.data_shape

    def forward(self, x_t, t, cond=None):
        return self.base.predict(self.prediction, x_t, t, cond)


def _points(n=48, seed=0, scale=0.8):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, 2, dtype=torch.float64, generator=g), g


def _times(n, lo, hi, g):
    return lo + (hi - lo) * torch.rand(n, dtype=torch.float64, generator=g)


def trig_closed_form(mix, x, t, sigma_data=0.5):
    """Closed-form TrigFlow (x0, velocity) of the mixture: u = -sin t x0* + cos t z*, z* = (x - cos t x0*) / sin t."""
    x0, _, _ = mix.posterior(x, t, TrigFlow(sigma_data))
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    z = (x - c * x0) / s
    return x0, -s * x0 + c * z


def total_dx0_dt(mix, x, t, u, sigma_data=0.5):
    """d/dt E[x0 | x_t] along (dx_t/dt = u, dt = 1) for an isotropic-component mixture under TrigFlow, by hand:
    C_k = c_k I, c_k = a^2 v_k + s^2; log N_k = -|x - a mu_k|^2 / (2 c_k) - D/2 log c_k; r = softmax(log w + log N);
    D_k = mu_k + (a v_k / c_k)(x - a mu_k); dD = sum_k dr_k D_k + r_k dD_k, dr_k = r_k (l_k - sum_j r_j l_j)."""
    a, s = torch.cos(t)[:, None], sigma_data * torch.sin(t)[:, None]  # (n, 1)
    da, ds = -torch.sin(t)[:, None], sigma_data * torch.cos(t)[:, None]
    mu, v = mix.means, mix.covs[:, 0, 0]  # (K, D), (K,)
    assert torch.allclose(mix.covs, v[:, None, None] * torch.eye(mix.dim, dtype=torch.float64))
    c = a**2 * v + s**2  # (n, K)
    dc = 2 * a * da * v + 2 * s * ds
    diff = x[:, None] - a[:, :, None] * mu  # (n, K, D)
    ddiff = u[:, None] - da[:, :, None] * mu
    sq = (diff**2).sum(-1)
    logn = -0.5 * sq / c - 0.5 * mix.dim * torch.log(c)
    ell = -(diff * ddiff).sum(-1) / c + 0.5 * sq * dc / c**2 - 0.5 * mix.dim * dc / c
    r = torch.softmax(logn + mix.weights.log(), 1)
    dr = r * (ell - (r * ell).sum(1, keepdim=True))
    gain = a * v / c
    dgain = (da * v * c - a * v * dc) / c**2
    d_k = mu + gain[..., None] * diff
    dd_k = dgain[..., None] * diff + gain[..., None] * ddiff
    return (dr[..., None] * d_k + r[..., None] * dd_k).sum(1)


# --- teacher -> TrigFlow conversion ---------------------------------------------------------------------

@pytest.mark.parametrize("schedule,kind", SOURCES)
def test_trigflow_conversion_is_exact(schedule, kind):
    mix = ring()
    teacher = AsKind(GMMDenoiser(mix, make_schedule(schedule)), kind)
    tf = as_trigflow(teacher, 0.5)
    x, g = _points()
    t = _times(x.shape[0], tf.schedule.t_min, tf.schedule.t_max, g)
    x0_ref, u_ref = trig_closed_form(mix, x, t)
    assert (tf.x0(x, t) - x0_ref).abs().max() <= 1e-6
    assert (velocity(tf, x, t) - u_ref).abs().max() <= 1e-6 * max(1.0, float(u_ref.abs().max()))
    assert (tf.flow(x, t) - u_ref).abs().max() <= 1e-6 * max(1.0, float(u_ref.abs().max()))  # Denoiser API (param.py)


def test_trigflow_range_and_identity():
    tf = TrigFlowDenoiser(GMMDenoiser(ring(), make_schedule("edm")), 0.5)
    # sigma_edm = sigma_d tan t  =>  t = arctan(sigma / sigma_d) at EDM's sigma_min / sigma_max
    assert tf.schedule.t_min == pytest.approx(math.atan(0.002 / 0.5), rel=1e-9)
    assert tf.schedule.t_max == pytest.approx(math.atan(80 / 0.5), rel=1e-9)
    native = GMMDenoiser(ring(), TrigFlow(0.5))
    assert as_trigflow(native, 0.5) is native
    assert isinstance(as_trigflow(native, 1.0), TrigFlowDenoiser)
    with pytest.raises(ConfigError, match="sigma_data"):
        TrigFlowDenoiser(native, 0.0)


# --- shifted rectified-flow teachers (SD3 / Sana, SANA-Sprint's conversion) ---------------------------------

SHIFTS = [3.0, 1.0, 0.5]


def _rf_to_trig(s, sigma_data):
    """Rectified flow's sigma/alpha = s / (1 - s) equals TrigFlow's sigma_d tan t at the same SNR."""
    return torch.arctan(s / (1 - s) / sigma_data)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("kind", ["flow", "x0"])
def test_trigflow_conversion_of_shifted_flow_teacher_is_exact(shift, sigma_data, kind):
    """shift moves only where a flow teacher is sampled, not alpha = 1 - t, sigma = t, so the converted teacher must
    equal the mixture's closed form under TrigFlow(sigma_d) for every shift, at random TrigFlow times, at both ends of
    the converted range and at the images of the teacher's own shifted sampling grid."""
    mix = grid(side=3)
    teacher = AsKind(GMMDenoiser(mix, RectifiedFlow(shift=shift)), kind)
    tf = TrigFlowDenoiser(teacher, sigma_data)
    x, g = _points(n=40)
    ends = torch.tensor([tf.schedule.t_min, tf.schedule.t_max], dtype=torch.float64)
    t = torch.cat([_times(30, tf.schedule.t_min, tf.schedule.t_max, g), ends,
                   _rf_to_trig(teacher.schedule.default_ts(8), sigma_data)])
    x0_ref, u_ref = trig_closed_form(mix, x, t, sigma_data)
    tol_u = 1e-6 * max(1.0, float(u_ref.abs().max()))
    assert (tf.x0(x, t) - x0_ref).abs().max() <= 1e-6
    assert (velocity(tf, x, t) - u_ref).abs().max() <= tol_u
    assert (tf.flow(x, t) - u_ref).abs().max() <= tol_u


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
@pytest.mark.parametrize("shift", SHIFTS)
def test_trigflow_time_map_of_shifted_flow_is_closed_form(shift, sigma_data):
    """SNR match for rectified flow, by hand: s / (1 - s) = sigma_d tan t  =>  s = sigma_d sin t / (cos t + sigma_d
    sin t), and x_s = x_t (1 - s) / cos t = x_t / (cos t + sigma_d sin t); at sigma_d = 1, t_FM = sin t / (sin t +
    cos t) and x_FM = x_Trig / (sin t + cos t) as in SANA-Sprint's conversion. None of it depends on the shift."""
    rf = RectifiedFlow(shift=shift)
    tf = TrigFlowDenoiser(GMMDenoiser(ring(), rf), sigma_data)
    x, g = _points(n=16)
    t = _times(16, tf.schedule.t_min, tf.schedule.t_max, g)
    x_s, s = tf.source_point(x, t)
    c, sn = torch.cos(t), torch.sin(t)
    s_ref = sigma_data * sn / (c + sigma_data * sn)
    assert torch.allclose(s, s_ref, rtol=1e-12, atol=0)
    assert torch.allclose(x_s, x / (c + sigma_data * sn)[:, None], rtol=1e-12, atol=0)
    assert torch.allclose(_rf_to_trig(s, sigma_data), t, rtol=1e-10, atol=0)
    lo, hi = trigflow_range(rf, sigma_data)
    assert lo == pytest.approx(math.atan(rf.t_min / (1 - rf.t_min) / sigma_data), rel=1e-12)
    assert hi == pytest.approx(math.atan(rf.t_max / (1 - rf.t_max) / sigma_data), rel=1e-12)


@pytest.mark.parametrize("shift", SHIFTS)
def test_rectified_flow_shift_maps(shift):
    """t = shift u / (1 + (shift - 1) u) (SD3 / diffusers' FlowMatchEulerDiscreteScheduler) applied to the unshifted
    linear time, clamped into [t_min, t_max]; increasing in u, so the sampling grid still decreases."""
    rf = RectifiedFlow(shift=shift)

    def shifted(u):
        return (shift * u / (1 + (shift - 1) * u)).clamp(rf.t_min, rf.t_max)

    u = torch.linspace(0, 1, 201, dtype=torch.float64)
    t = rf.t_from_unit(u)
    assert torch.allclose(t, shifted(rf.t_min + u * (rf.t_max - rf.t_min)), rtol=1e-12, atol=0)
    assert (t.diff() >= 0).all() and (t[1:-1].diff() > 0).all()
    rf.check_t(t)
    for n in (1, 4, 16):
        ts = rf.default_ts(n)
        base = torch.linspace(rf.t_max, rf.t_min, n + 1, dtype=torch.float64)[:-1]
        assert torch.allclose(ts, shifted(base), rtol=1e-12, atol=0)
        assert (ts.diff() < 0).all()
        rf.check_t(ts)
    # alpha and sigma, and so the SNR every denoiser sees, ignore the shift
    assert torch.equal(rf.alpha(u), RectifiedFlow().alpha(u)) and torch.equal(rf.sigma(u), RectifiedFlow().sigma(u))


@pytest.mark.parametrize("shift", [0.0, -1.0])
def test_rectified_flow_shift_must_be_positive(shift):
    with pytest.raises(ConfigError, match="shift"):
        RectifiedFlow(shift=shift)
    with pytest.raises(ConfigError, match="shift"):
        make_schedule("rectified_flow", shift=shift)


# --- the sCM tangent -------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule,kind", [("edm", "x0"), ("vp_linear", "eps"), ("rectified_flow", "flow")])
def test_velocity_time_derivative_matches_closed_form(schedule, kind):
    """torch.func.jvp of the converted teacher's velocity along its own ODE vs the hand-derived derivative."""
    mix = grid()
    tf = as_trigflow(AsKind(GMMDenoiser(mix, make_schedule(schedule)), kind), 0.5)
    x, g = _points(scale=1.0)
    t = _times(x.shape[0], 0.1, 1.45, g)
    _, u = trig_closed_form(mix, x, t)
    _, dv = torch.func.jvp(lambda a, b: velocity(tf, a, b), (x, t), (u, torch.ones_like(t)))
    dx0 = total_dx0_dt(mix, x, t, u)
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    # v = (cos x - x0) / sin  =>  dv/dt = (-sin x + cos u - dx0/dt - cos v) / sin
    dv_ref = (-s * x + c * u - dx0 - c * u) / s
    assert (dv - dv_ref).abs().max() <= 1e-6 * max(1.0, float(dv_ref.abs().max()))


def test_jvp_matches_central_differences():
    """The tangent through a converted (EDM -> TrigFlow) MLP student, float64, vs central finite differences."""
    torch.manual_seed(0)
    net = MLPDenoiser(make_schedule("edm"), 2, hidden=32, depth=2).double()
    tf = as_trigflow(net, 0.5)
    x, g = _points(16)
    t = _times(16, 0.2, 1.3, g)
    u = torch.randn(16, 2, dtype=torch.float64, generator=g)
    fn = lambda a, b: velocity(tf, a, b)  # noqa: E731
    _, jv = torch.func.jvp(fn, (x, t), (u, torch.ones_like(t)))
    h = 1e-5
    fd = (fn(x + h * u, t + h) - fn(x - h * u, t - h)) / (2 * h)
    assert (jv - fd).abs().max() <= 1e-6 * float(fd.abs().max())


@pytest.mark.parametrize("direction", ["ode", "random"])
def test_scm_tangent_matches_closed_form(direction):
    """sCM eq. (8) with r = 1, c = 0 for the exact teacher as student: g = cos(t) * d/dt E[x0 | x_t] along
    (dx_t/dt, 1). 'ode' = sCD (dx_t/dt = teacher velocity, so the first term vanishes); 'random' exercises it."""
    mix = ring()
    student = GMMDenoiser(mix, TrigFlow(0.5))
    x, g = _points(scale=1.0, seed=3)
    t = _times(x.shape[0], 0.05, 1.5, g)
    _, u_ode = trig_closed_form(mix, x, t)
    u = u_ode if direction == "ode" else torch.randn(x.shape, dtype=torch.float64, generator=g)
    v, tangent, _ = scm_tangent(student, x, t, u, warmup=1.0, norm_c=0.0)
    ref = torch.cos(t)[:, None] * total_dx0_dt(mix, x, t, u)
    assert (v - u_ode).abs().max() <= 1e-8 * float(u_ode.abs().max())
    assert (tangent - ref).abs().max() <= 1e-6 * max(1.0, float(ref.abs().max()))
    # normalization g / (||g|| + c) and warm-up r = 0 (only the first term survives)
    _, gn, _ = scm_tangent(student, x, t, u, warmup=1.0, norm_c=0.1)
    assert torch.allclose(gn, ref / (ref.norm(dim=1, keepdim=True) + 0.1), atol=1e-8)
    _, g0, _ = scm_tangent(student, x, t, u, warmup=0.0, norm_c=0.0)
    assert torch.allclose(g0, -torch.cos(t)[:, None] ** 2 * (u_ode - u), atol=1e-10)


def test_scm_tangent_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    net = MLPDenoiser(TrigFlow(0.5), 2, hidden=16, depth=1)
    x, t, dx = torch.randn(8, 2), torch.full((8,), 0.7), torch.randn(8, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, g, _ = scm_tangent(net, x, t, dx)
    v_ref, g_ref, _ = scm_tangent(net, x, t, dx)
    assert v.dtype == torch.float32 and g.dtype == torch.float32
    assert torch.allclose(v, v_ref, atol=1e-6) and torch.allclose(g, g_ref, atol=1e-6)


# --- CD / iCT pieces -------------------------------------------------------------------------------------

def test_ict_pieces():
    # K = 800: K' = floor(800 / (log2 128 + 1)) = 100
    assert [C.curriculum_scales(k, 800) for k in (0, 99, 100, 250, 699, 700)] == [11, 11, 21, 41, 641, 1281]
    s = C.karras_sigmas(11, 0.002, 80.0)
    assert s[0] == pytest.approx(0.002) and s[-1] == pytest.approx(80.0) and bool((s[1:] > s[:-1]).all())
    p = C.index_probs(s, "lognormal", -1.1, 2.0)
    cdf = torch.distributions.Normal(-1.1, 2.0).cdf(s.log())  # log sigma ~ N(P_mean, P_std^2), binned
    assert torch.allclose(p, (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0]), atol=1e-12)
    x, y = torch.zeros(3, 4), torch.tensor([[0.0] * 4, [3.0, 4.0, 0, 0], [1e-4, 0, 0, 0]])
    c = 0.00054 * 2
    assert torch.allclose(C.distance(x, y, "pseudo_huber"), torch.tensor([0.0, math.sqrt(25 + c * c) - c,
                                                                          math.sqrt(1e-8 + c * c) - c]))
    assert torch.allclose(C.pair_weight(s[:-1], s[1:], "inv_dsigma"), 1 / (s[1:] - s[:-1]))
    with pytest.raises(ConfigError, match="objective.distance"):
        C.distance(x, y, "l1")


def test_consistency_boundary():
    torch.manual_seed(0)
    sched = make_schedule("edm")
    net = MLPDenoiser(sched, 2, hidden=16, depth=1).double()
    f = ConsistencyBoundary(net)
    x = torch.randn(32, 2, dtype=torch.float64)
    assert torch.equal(f.x0(x, torch.full((32,), sched.t_min, dtype=torch.float64)), x)  # f(x, t_min) = x
    # away from t_min, f = D up to O(sig_min / sig)
    t = torch.full((32,), 5.0, dtype=torch.float64)
    assert (f.x0(x, t) - net.x0(x, t)).abs().max() <= 1e-3
    # for an EDM-preconditioned net it is CM's c_skip x + c_out F, exactly
    raw = (net(x, t) - 0.25 / (25 + 0.25) * x) / (5 * 0.5 / math.sqrt(25 + 0.25))
    cm = 0.25 / ((5 - 0.002) ** 2 + 0.25) * x + 0.5 * (5 - 0.002) / math.sqrt(0.25 + 25) * raw
    assert torch.allclose(f.x0(x, t), cm, atol=1e-12)


def test_consistency_boundary_on_a_diffusers_table_is_lcms():
    """vp_discrete (SD-family teachers): LCM's boundary on the table index, equal to diffusers' LCMScheduler."""
    from diffusers import LCMScheduler

    torch.manual_seed(0)
    sched = make_schedule("vp_discrete")
    net = MLPDenoiser(sched, 2, hidden=16, depth=1).double()
    f = ConsistencyBoundary(net)
    x = torch.randn(4, 2, dtype=torch.float64)
    assert torch.equal(f.x0(x, torch.zeros(4, dtype=torch.float64)), x)  # f(x, tau = 0) = x
    lcm = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for k in (1, 259, 999):
        t = torch.full((4,), k / 999, dtype=torch.float64)
        c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(torch.tensor(float(k), dtype=torch.float64))
        assert torch.allclose(f.x0(x, t), c_skip * x + c_out * net.x0(x, t), rtol=0, atol=1e-12)


class GaussianConsistency(Denoiser):
    """Exact consistency function of N(mu, v I) data: the PF-ODE is linear, x0 = mu + sqrt(v / (a^2 v + s^2)) (x - a mu)."""

    prediction = "x0"

    def __init__(self, schedule, mu, var):
        super().__init__()
        self.schedule, self.mu, self.var, self.data_shape = schedule, mu, var, (2,)
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, cond=None):
        a, s = self.schedule.alpha(t)[:, None], self.schedule.sigma(t)[:, None]
        return self.mu + (1 + self.w) * torch.sqrt(self.var / (a * a * self.var + s * s)) * (x_t - a * self.mu)


def _cd_loss(solver, student, teacher, sched, num_scales=40):
    from onestep.core import Batch, Nets
    from onestep.objectives.cd import CDConfig, ConsistencyDistillation

    obj = ConsistencyDistillation(CDConfig(solver=solver, num_scales=num_scales), generate=None)
    torch.manual_seed(0)
    x0 = 0.3 + 0.5 * torch.randn(256, 2, dtype=torch.float64)
    return obj.generator_loss(Nets(teacher=teacher, generator=student), Batch(noise=x0, real=x0), 0)["loss"]


def test_cd_loss_vanishes_for_the_exact_consistency_function():
    """Gaussian data: the exact consistency function is a fixed point of CD with a Heun teacher step (error
    O(dt^3)), not of CD with an Euler step that goes the wrong way, and a denoiser is not one."""
    sched = make_schedule("edm")
    mu = torch.tensor([0.3, 0.3], dtype=torch.float64)
    from onestep.denoisers.gmm import GaussianMixture

    teacher = GMMDenoiser(GaussianMixture(mu[None], 0.25 * torch.eye(2, dtype=torch.float64)[None], [1.0]), sched)
    exact = GaussianConsistency(sched, mu, 0.25)
    heun = float(_cd_loss("heun", exact, teacher, sched))
    euler = float(_cd_loss("euler", exact, teacher, sched))
    assert heun <= 1e-6 and euler <= 1e-3 and heun < euler / 10
    assert float(_cd_loss("heun", teacher, teacher, sched)) > 100 * heun


# --- JVP through diffusers attention (generator.attention) ----------------------------------------------

class TinyUNetTrig(Denoiser):
    """A diffusers UNet2DModel in sCM's parametrization: x0 = cos t x - sin t sigma_d F(x / sigma_d, t)."""

    prediction = "x0"

    def __init__(self, dtype):
        super().__init__()
        from diffusers import UNet2DModel

        torch.manual_seed(0)
        self.unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                attention_head_dim=8).to(dtype)
        self.schedule, self.data_shape = TrigFlow(0.5), (3, 8, 8)

    def forward(self, x_t, t, cond=None):
        c, s = torch.cos(t)[:, None, None, None], torch.sin(t)[:, None, None, None]
        return c * x_t - s * 0.5 * self.unet(x_t / 0.5, t * 100).sample


def _scd_step(model, attention, dtype):
    from onestep.denoisers.attention import set_attention
    from onestep.core import Batch, Nets
    from onestep.objectives.scm import SCD, SCDConfig, LogVarHead

    student = set_attention(copy.deepcopy(model), attention)
    teacher = copy.deepcopy(model).requires_grad_(False)
    torch.manual_seed(1)
    x0 = torch.randn(2, 3, 8, 8, dtype=dtype)
    obj = SCD(SCDConfig(warmup_steps=0), generate=None)
    out = obj.generator_loss(Nets(teacher=teacher, generator=student, modules={"logvar": LogVarHead()}),
                             Batch(noise=x0, real=x0), 0)
    out["loss"].backward()
    return out["loss"].detach(), torch.cat([p.grad.flatten() for p in student.parameters()])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scd_loss_through_jvp_flash_attention_matches_math(dtype):
    from onestep.kernels import JVPFlashAttnProcessor

    model = TinyUNetTrig(dtype)
    ref_loss, ref_grad = _scd_step(model, "default", dtype)  # stock SDPA processors, JVP under SDPBackend.MATH
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for option in ("math", "jvp_flash"):
        loss, grad = _scd_step(model, option, dtype)
        assert abs(float(loss - ref_loss)) <= tol * abs(float(ref_loss)), option
        assert (grad - ref_grad).norm() <= tol * ref_grad.norm(), option
    flash = TinyUNetTrig(dtype)
    from onestep.denoisers.attention import set_attention

    set_attention(flash, "jvp_flash")
    procs = [m.processor for m in flash.modules() if hasattr(m, "set_processor")]
    assert procs and all(isinstance(p, JVPFlashAttnProcessor) and p.backend == "auto" for p in procs)


def test_attention_option_is_validated():
    from onestep.denoisers.attention import set_attention

    net = MLPDenoiser(TrigFlow(0.5), 2, hidden=8, depth=1)
    assert set_attention(net, "jvp_flash") is net  # no attention: a no-op
    with pytest.raises(ConfigError, match="generator.attention 'flash'"):
        set_attention(net, "flash")


# --- short training runs ---------------------------------------------------------------------------------

def _train(tmp_path, name, overrides, net_from=None):
    import shutil

    from conftest import compose
    from onestep.train.trainer import train

    run = tmp_path / name
    run.mkdir()
    if net_from is not None:  # same DSM-pretrained init for both arms of a comparison
        shutil.copy(net_from / "teacher_net.safetensors", run / "teacher_net.safetensors")
    common = ["teacher.net_steps=400", "trainer.batch_size=128", "trainer.progress=false", "trainer.checkpoint_every=1000",
              "objective.warmup_steps=100", "eval.num_samples=2000", "eval.teacher_steps=[64]", "eval.plot=false"]
    rows = train(compose(common + overrides), run)["rows"]
    return run, {(r["model"], r["steps"]): r for r in rows}


@pytest.mark.slow
def test_scd_ring_one_and_two_steps(tmp_path):
    """sCD on the 8-mode ring: the 1- and 2-step students cover every mode and move far from the
    DSM-pretrained init (sliced-W2 ~0.6 at 1 step)."""
    _, rows = _train(tmp_path, "scd", ["experiment=gmm_scd", "trainer.steps=400", "generator.steps=2",
                                       "generator.ts=[80.0,0.8]", "eval.student_steps=[1,2]"])
    for k in (1, 2):
        r = rows[("student", k)]
        assert r["modes_covered"] == 8, r
        assert r["sliced_w2"] <= 0.25, r
    assert rows[("student", 2)]["sliced_w2"] <= rows[("student", 1)]["sliced_w2"] * 1.1


#: gmm_scd's 1-step sliced-W2 across seeds 0..5 (conftest.SEED_SPREADS), measured on this code with
#: `onestep train experiment=gmm_scd seed=S eval.num_samples=5000 "eval.teacher_steps=[1]" eval.plot=false`:
#: mean 0.1006, std 0.0059 -> bound mean + 3 std. (The figure once
#: recorded as 0.0842 / 0.0848 for seed 0 was one draw of the log-variance head's init, made after the teacher's
#: training draws; the same code gave 0.1020 and 0.0960 for seeds 1 and 2, and 0.0886 for seed 0 with a cached
#: teacher net.)


@pytest.mark.slow
def test_gmm_scd_shipped_figure_within_its_seed_spread(tmp_path):
    """The shipped gmm_scd (seed 0) keeps its 1-step figure (0.1051) within the seed spread, so a real regression
    of the sCD objective or the trainer fails here instead of in a results table."""
    from conftest import compose, seed_bound
    from onestep.train.trainer import train

    rows = train(compose(["experiment=gmm_scd", "trainer.progress=false", "eval.num_samples=5000",
                          "eval.teacher_steps=[1]", "eval.plot=false"]), tmp_path)["rows"]
    r = next(r for r in rows if r["model"] == "student" and r["steps"] == 1)
    assert r["modes_covered"] == 8, r
    assert r["sliced_w2"] <= seed_bound("gmm_scd"), r


@pytest.mark.slow
def test_rcm_vs_scd_grid(tmp_path):
    """The 25-mode grid, same init and budget: rCM's DMD regularizer helps sCD (measured with these settings,
    300 steps: rCM sliced-W2 0.128 with 25/25 modes vs sCD 0.314 with 10/25)."""
    run, rcm = _train(tmp_path, "rcm", ["experiment=gmm_rcm", "trainer.steps=300"])
    _, scd = _train(tmp_path, "scd", ["experiment=gmm_scd", "teacher=gmm_grid", "trainer.steps=300"], net_from=run)
    r, s = rcm[("student", 1)], scd[("student", 1)]
    print(f"\nrCM sliced-W2 {r['sliced_w2']:.4f} modes {r['modes_covered']}/25 | "
          f"sCD sliced-W2 {s['sliced_w2']:.4f} modes {s['modes_covered']}/25")
    assert r["modes_covered"] >= s["modes_covered"] and r["modes_covered"] >= 24
    assert r["sliced_w2"] < s["sliced_w2"]


TINY_CD = ["experiment=gmm_cd", "teacher.net_steps=40", "teacher.net_hidden=32", "trainer.batch_size=64",
           "trainer.checkpoint_every=3", "trainer.progress=false", "eval.num_samples=256", "eval.teacher_steps=[2]",
           "eval.plot=false"]


def test_cd_ema_target_resumes_bit_identically(tmp_path):
    """The EMA target is an extra module: checkpointed by the trainer, so 3 + 3 steps == 6 steps."""
    from safetensors.torch import load_file

    from conftest import compose
    from onestep.train.trainer import train

    ov = TINY_CD + ["objective.target_ema=0.9"]
    train(compose(ov + ["trainer.steps=6"]), tmp_path / "a")
    train(compose(ov + ["trainer.steps=3"]), tmp_path / "b")
    train(compose(ov + ["trainer.steps=6"]), tmp_path / "b")
    for name in ("generator", "target"):
        a = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000006" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000006" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    init = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000003" / "target.safetensors"))
    assert any(not torch.equal(init[k], a[k]) for k in a)  # the target moved


@pytest.mark.parametrize("objective", ["ict", "sct"])
def test_data_driven_consistency_objectives_train(tmp_path, objective):
    from conftest import compose
    from onestep.train.trainer import train

    cfg = compose([f"experiment=gmm_{'ict' if objective == 'ict' else 'scd'}"] + TINY_CD[1:] + [f"objective={objective}",
                                                                                             "trainer.steps=4"])
    assert cfg.objective.name == objective and (objective != "ict" or cfg.objective.curriculum_steps == 4)
    out = train(cfg, tmp_path / objective)
    assert all(math.isfinite(r["sliced_w2"]) for r in out["rows"])
