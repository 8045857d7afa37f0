"""The shared sampler: exact on Gaussian data, reproduces the mixture, rejects bad t-lists."""

import math

import pytest
import torch

from onestep.denoisers.gmm import GaussianMixture, GMMDenoiser, ring
from onestep.errors import ConfigError
from onestep.eval.gmm_metrics import gmm_metrics
from onestep.sampling import sample
from onestep.schedules import make_schedule

MU, C = 0.7, 0.4  # 1-D Gaussian data N(MU, C^2)


def gaussian_teacher(schedule):
    return GMMDenoiser(GaussianMixture([[MU]], [[[C**2]]], [1.0]), schedule)


def pf_ode_map(x_T, schedule, t_T, t):
    """Exact probability-flow ODE solution for Gaussian data: the z-score (x - a mu) / sqrt(a^2 c^2 + s^2)
    is constant along the flow."""
    sd = lambda tt: torch.sqrt(schedule.alpha(tt) ** 2 * C**2 + schedule.sigma(tt) ** 2)  # noqa: E731
    t_T, t = torch.as_tensor(t_T), torch.as_tensor(t)
    return schedule.alpha(t) * MU + sd(t) * (x_T - schedule.alpha(t_T) * MU) / sd(t_T)


def state_at_last_time(teacher, z, ts, method):
    """x at ts[-1], i.e. before sample()'s final jump to x0 (recorded by the callback)."""
    seen = {}
    sample(teacher, z, ts, method=method, callback=lambda i, x, x0: seen.update(x=x))
    return seen["x"]


@pytest.mark.parametrize("sched", ["vp_linear", "edm", "rectified_flow", "trigflow"])
def test_ode_samplers_converge_to_exact_flow_map(sched):
    s = make_schedule(sched)
    teacher = gaussian_teacher(s)
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    ts = s.default_ts(200)
    want = pf_ode_map(z * s.sigma(ts[0]), s, ts[0], ts[-1])
    scale = float(want.abs().max())
    for method, tol in [("heun", 1e-3), ("ddim", 2e-2), ("euler", 2e-2)]:
        got = state_at_last_time(teacher, z, ts, method)
        assert float((got - want).abs().max()) < tol * scale, (method, (got - want).abs().max())


def test_euler_is_first_order_heun_second_order():
    s = make_schedule("rectified_flow")
    teacher = gaussian_teacher(s)
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]

    def err(method, n):
        ts = torch.linspace(s.t_max, 0.2, n)
        want = pf_ode_map(z * s.sigma(ts[0]), s, ts[0], ts[-1])
        return float((state_at_last_time(teacher, z, ts, method) - want).abs().max())

    r_euler = err("euler", 20) / err("euler", 40)
    r_heun = err("heun", 20) / err("heun", 40)
    assert 1.6 < r_euler < 2.5 and 3.2 < r_heun < 5.0, (r_euler, r_heun)


@pytest.mark.parametrize("method,steps", [("ddim", 64), ("heun", 32), ("ancestral", 256)])
def test_teacher_sampler_reproduces_the_mixture(method, steps):
    mix = ring()
    s = make_schedule("vp_linear")
    teacher = GMMDenoiser(mix, s)
    n = 4000
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample(teacher, z, s.default_ts(steps), method=method, generator=torch.Generator().manual_seed(1))
    m = gmm_metrics(mix, x)
    floor = gmm_metrics(mix, mix.sample(n, generator=torch.Generator().manual_seed(5)))["sliced_w2"]
    assert m["modes_covered"] == 8 and m["worst_mode_mass_err"] < 0.15
    assert m["sliced_w2"] < 2.5 * floor + 0.01, (m["sliced_w2"], floor)
    assert m["cov_err"] < 0.05


def test_one_step_teacher_is_the_mean():
    """1 step from t_max returns E[x0 | x_T], which collapses toward the data mean: the reason to distill."""
    mix = ring()
    s = make_schedule("vp_linear")
    x = sample(GMMDenoiser(mix, s), torch.randn(2000, 2, dtype=torch.float64), [s.t_max])
    assert x.norm(dim=1).mean() < 0.1


def test_bad_t_lists_and_methods():
    s = make_schedule("vp_linear")
    teacher = GMMDenoiser(ring(), s)
    z = torch.randn(4, 2)
    with pytest.raises(ConfigError, match="strictly decreasing"):
        sample(teacher, z, [0.2, 0.5])
    with pytest.raises(ConfigError, match="outside"):
        sample(teacher, z, [3.0, 0.5])
    with pytest.raises(ConfigError, match="unknown"):
        sample(teacher, z, [0.9, 0.5], method="rk99")
    with pytest.raises(ConfigError, match="empty"):
        sample(teacher, z, [])


def test_stochastic_samplers_use_the_given_generator():
    s = make_schedule("vp_linear")
    teacher = GMMDenoiser(ring(), s)
    z = torch.randn(16, 2, dtype=torch.float64)
    run = lambda seed: sample(teacher, z, s.default_ts(8), method="renoise",  # noqa: E731
                              generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))
    assert math.isfinite(float(run(3).sum()))


class Recording(torch.nn.Module):
    """A denoiser wrapper that records the (x, t) of every x0 call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.schedule, self.calls = inner, inner.schedule, []

    def x0(self, x, t, cond=None):
        self.calls.append((x.clone(), float(t[0])))
        return self.inner.x0(x, t, cond)

    def randn_like(self, x, generator=None):
        return self.inner.randn_like(x, generator)


def test_hybrid_sampler_hands_the_teachers_state_to_the_student():
    """Teacher for the first k steps of the student's t-list, student from ts[k] on (Gandikota & Bau 2025): the
    student is called only at ts[k:], first on exactly the teacher's DDIM state at ts[k]; with the teacher as its own
    student and DDIM both ways, the hybrid is the teacher's DDIM sampler."""
    from onestep.sampling import hybrid_sample

    s = make_schedule("edm")
    exact = GMMDenoiser(ring(), s)
    ts = torch.tensor([80.0, 21.4, 4.2, 0.5], dtype=torch.float64)
    z = torch.randn(64, 2, dtype=torch.float64)
    ddim = sample(exact, z, ts, method="ddim")
    assert torch.allclose(hybrid_sample(exact, exact, z, ts, 1, student_method="ddim"), ddim, atol=1e-12)
    for k in (1, 2, 3):
        teacher, student = Recording(exact), Recording(exact)
        hybrid_sample(teacher, student, z, ts, k, generator=torch.Generator().manual_seed(0))
        assert [t for _, t in teacher.calls] == pytest.approx(ts[:k].tolist())
        assert [t for _, t in student.calls] == pytest.approx(ts[k:].tolist())
        handed = state_at_last_time(exact, z, ts[:k + 1], "ddim")
        assert torch.allclose(student.calls[0][0], handed, atol=1e-12)
    for bad in (0, 4):
        with pytest.raises(ConfigError, match="teacher_steps"):
            hybrid_sample(exact, exact, z, ts, bad)
