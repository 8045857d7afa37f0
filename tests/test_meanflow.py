"""MeanFlow (onestep/objectives/meanflow.py): on Gaussian data the probability-flow ODE is affine, so the average
velocity u(z, r, t) = (z - z_r) / (t - r) is known in closed form. It must satisfy the MeanFlow identity through the
objective's own JVP (the loss vanishes at the exact flow map, and not at a wrong one), the JVP must be the total
derivative along the ODE, and a short ring run must beat the teacher's 1-step sampler by a wide margin."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onestep.core import Batch, Nets
from onestep.denoisers.base import Denoiser
from onestep.denoisers.gmm import GaussianMixture, GMMDenoiser
from onestep.errors import ConfigError
from onestep.objectives.meanflow import MeanFlow, MeanFlowConfig, average_velocity, meanflow_target
from onestep.schedules import make_schedule

MU, VAR = torch.tensor([0.3, -0.5], dtype=torch.float64), 0.2
SCHED = make_schedule("rectified_flow")


def sd(t):
    """Std of the noised Gaussian at t: sqrt(a^2 var + s^2)."""
    return torch.sqrt(SCHED.alpha(t) ** 2 * VAR + SCHED.sigma(t) ** 2)


def flow_map(z, t, r):
    """The exact PF-ODE map z_t -> z_r: the z-score (z - a mu) / sd is constant along the flow."""
    a_t, a_r = SCHED.alpha(t)[:, None], SCHED.alpha(r)[:, None]
    return a_r * MU + (sd(r) / sd(t))[:, None] * (z - a_t * MU)


def exact_u(z, r, t):
    """(z - z_r) / (t - r), and the instantaneous velocity where r = t (its limit)."""
    teacher = GMMDenoiser(GaussianMixture(MU[None], VAR * torch.eye(2, dtype=torch.float64)[None], [1.0]), SCHED)
    same = (t - r).abs() < 1e-12
    gap = torch.where(same, torch.ones_like(t), t - r)
    u = (z - flow_map(z, t, r)) / gap[:, None]
    return torch.where(same[:, None], teacher.flow(z, t), u)


class ExactFlowMap(Denoiser):
    """The exact r = 0 map as a Denoiser (x0 = z_0 = the ODE's end point, not the posterior mean); its features
    (z, t) let :class:`ExactHead` complete u for every r. ``error`` != 0 makes it wrong on purpose, by a factor
    1 + error t: a time-independent factor would not do, since on the r = 0 slice the identity fixes t u only up to a
    function constant along trajectories (the boundary x0(z, t -> 0) = z, which the generator's preconditioning holds)."""

    prediction = "x0"

    def __init__(self, error: float = 0.0):
        super().__init__()
        self.schedule, self.data_shape, self.error = SCHED, (2,), error

    def forward(self, x_t, t, cond=None):
        return (1 + self.error * t[:, None]) * flow_map(x_t, t, torch.zeros_like(t))

    def features(self, x_t, t, cond=None):
        return torch.cat([x_t, t[:, None]], 1)


class ExactHead(nn.Module):
    """H(h, q) with (r / t) H = u(z, r, t) - u(z, 0, t): the exact interval part, r = q t."""

    def forward(self, h, q):
        z, t = h[:, :2], h[:, 2]
        r = q * t
        safe = torch.where(q > 0, q, torch.ones_like(q))
        return (exact_u(z, r, t) - exact_u(z, torch.zeros_like(t), t)) / safe[:, None]


def _points(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    z = sd(t)[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64) + SCHED.alpha(t)[:, None] * MU
    return z, r, t


def test_average_velocity_is_the_exact_flow_map_at_r_zero():
    """u(z, 0, t) = (z - G.x0) / t, so one step z - t u(z, 0, t) = G.x0 (MeanFlow Alg. 2), whatever the head says."""
    z, _, t = _points()
    g = ExactFlowMap()
    u0 = average_velocity(g, ExactHead(), z, torch.zeros_like(t), t)
    assert torch.allclose(z - t[:, None] * u0, flow_map(z, t, torch.zeros_like(t)), atol=1e-12)
    z, r, t = _points(seed=1)
    assert torch.allclose(average_velocity(g, ExactHead(), z, r, t), exact_u(z, r, t), atol=1e-10)


def test_jvp_is_the_total_derivative_along_the_ode():
    """du/dt of meanflow_target = d/dh u(z_{t+h}, r, t + h) with z moving on the exact ODE (central differences)."""
    z, r, t = _points()
    g, head = ExactFlowMap(), ExactHead()
    v = exact_u(z, t, t)
    _, dudt = meanflow_target(lambda a, b, c: average_velocity(g, head, a, b, c), z, r, t, v)
    h = 1e-5
    up = exact_u(flow_map(z, t, t + h), r, t + h)
    dn = exact_u(flow_map(z, t, t - h), r, t - h)
    assert torch.allclose(dudt, (up - dn) / (2 * h), atol=1e-5), (dudt - (up - dn) / (2 * h)).abs().max()


def test_identity_target_equals_the_exact_average_velocity():
    """MeanFlow eq. (6): u = v - (t - r) du/dt holds for the exact u (target - u ~ 1e-12), and the sign matters."""
    z, r, t = _points()
    g, head = ExactFlowMap(), ExactHead()
    u_fn = lambda a, b, c: average_velocity(g, head, a, b, c)  # noqa: E731
    v = exact_u(z, t, t)
    tgt, dudt = meanflow_target(u_fn, z, r, t, v)
    u = exact_u(z, r, t)
    assert float((tgt - u).abs().max()) < 1e-9
    wrong = v + (t - r)[:, None] * dudt
    assert float((wrong - u).abs().max()) > 0.1


def _loss(generator, velocity="teacher", head=None, **kw):
    teacher = GMMDenoiser(GaussianMixture(MU[None], VAR * torch.eye(2, dtype=torch.float64)[None], [1.0]), SCHED)
    obj = MeanFlow(MeanFlowConfig(velocity=velocity, loss="l2", **kw), generate=None)
    torch.manual_seed(0)
    x0 = MU + VAR**0.5 * torch.randn(512, 2, dtype=torch.float64)
    nets = Nets(teacher=teacher, generator=generator, modules={"interval": head or ExactHead()})
    return float(obj.generator_loss(nets, Batch(noise=x0, real=x0), 0)["loss"])


@pytest.mark.parametrize("buckets", [dict(), dict(flow_matching_ratio=0.0, consistency_ratio=1.0),
                                     dict(flow_matching_ratio=0.0, consistency_ratio=0.0)])
def test_distillation_loss_vanishes_at_the_exact_flow_map(buckets):
    """CD variant with the exact Gaussian teacher: loss ~0 for the exact u in every (t, r) bucket; a generator off by
    10% t, or a head that ignores r, is far from it."""
    exact = _loss(ExactFlowMap(), **buckets)
    assert exact < 1e-12, exact
    assert _loss(ExactFlowMap(error=0.1), **buckets) > 1e6 * max(exact, 1e-18)
    if buckets.get("consistency_ratio", 0.0) < 1.0:
        zero_head = nn.Module()
        zero_head.forward = lambda h, q: torch.zeros(h.shape[0], 2, dtype=h.dtype)
        assert _loss(ExactFlowMap(), head=zero_head, **buckets) > 1e-3


def test_data_velocity_target_is_unbiased_at_the_exact_flow_map():
    """CT variant: v is the conditional velocity eps - x0, so the loss at the exact u is the target's variance,
    not 0; but the mean target over many eps equals u (the identity is linear in v)."""
    z, r, t = _points(n=1, seed=3)
    z, r, t = z.expand(20000, 2).clone(), r.expand(20000).clone(), t.expand(20000).clone()
    # posterior samples of (x0, eps) given z_t for Gaussian data
    a, s = SCHED.alpha(t)[:, None], SCHED.sigma(t)[:, None]
    mean = MU + a * VAR / (a * a * VAR + s * s) * (z - a * MU)
    var = VAR * s * s / (a * a * VAR + s * s)
    g = torch.Generator().manual_seed(0)
    x0 = mean + var.sqrt() * torch.randn(z.shape, generator=g, dtype=torch.float64)
    eps = (z - a * x0) / s
    v = eps - x0
    g_, head = ExactFlowMap(), ExactHead()
    tgt, _ = meanflow_target(lambda p, q, w: average_velocity(g_, head, p, q, w), z, r, t, v)
    assert torch.allclose(tgt.mean(0), exact_u(z[:1], r[:1], t[:1])[0], atol=0.02)


def test_buckets_and_validation():
    obj = MeanFlow(MeanFlowConfig(flow_matching_ratio=0.5, consistency_ratio=0.25), generate=None)
    torch.manual_seed(0)
    t, r = obj.sample_tr(SCHED, 40000, torch.zeros(1, dtype=torch.float64))
    assert bool((r <= t).all()) and bool((t >= SCHED.t_min).all()) and bool((t <= SCHED.t_max).all())
    assert abs(float((r == t).double().mean()) - 0.5) < 0.02
    assert abs(float((r == 0).double().mean()) - 0.25) < 0.02
    for bad in (dict(velocity="ode"), dict(loss="l1"), dict(flow_matching_ratio=0.8, consistency_ratio=0.3),
                dict(norm_c=0.0)):
        with pytest.raises(ConfigError):
            MeanFlow(MeanFlowConfig(**bad), generate=None)


@pytest.mark.slow
def test_meanflow_ring_beats_the_teachers_one_step_sampler(tmp_path):
    """experiment=gmm_meanflow, shortened: the 1-step student covers all 8 modes at a sliced-W2 far below the teacher's
    own 1-step sampler (the mixture mean, ~0.71)."""
    from conftest import ring_run_beats_one_step_teacher

    ring_run_beats_one_step_teacher(["experiment=gmm_meanflow", "trainer.steps=400"], tmp_path, 4, "meanflow",
                                    samples=5000)
