"""BOOT (onestep/objectives/boot.py) on a single-Gaussian teacher, whose PF-ODE map from the noise is known in closed form
(the z-score (x - a mu) / sqrt(a^2 var + s^2) is constant along it): the bootstrapping target is the teacher's DDIM step
of that exact map, the loss vanishes there at second order in the step and not at a perturbed map, and the training
never reads a data sample."""

from __future__ import annotations

import pytest
import torch

from onestep.core import Batch, Nets
from onestep.denoisers.gmm import GaussianMixture, GMMDenoiser
from onestep.denoisers.nets import MLPDenoiser
from onestep.errors import ConfigError
from onestep.generator import Student
from onestep.objectives.boot import Boot, BootConfig, boot_losses, start_signal
from onestep.schedules import make_schedule

MU, VAR = torch.tensor([0.3, -0.5], dtype=torch.float64), 0.2


def gaussian_teacher(name):
    return GMMDenoiser(GaussianMixture(MU[None], VAR * torch.eye(2, dtype=torch.float64)[None], [1.0]),
                       make_schedule(name))


def exact_signal(sched, eps, u):
    """y_t = (x_t - sigma_t eps) / alpha_t of the exact PF-ODE state x_t from x_T = prior_std(t_max) eps."""
    t_max = torch.tensor(sched.t_max, dtype=torch.float64)
    sd = lambda t: torch.sqrt(sched.alpha(t) ** 2 * VAR + sched.sigma(t) ** 2)  # noqa: E731
    zs = (sched.prior_std(t_max) * eps - sched.alpha(t_max) * MU) / sd(t_max)
    t = sched.t_from_unit(u)[:, None]
    return (sched.alpha(t) * MU + sd(t) * zs - sched.sigma(t) * eps) / sched.alpha(t)


@pytest.mark.parametrize("name", ["edm", "vp_cosine", "rectified_flow"])
def test_target_is_a_ddim_step_of_the_exact_map_and_loss_vanishes_there(name):
    teacher = gaussian_teacher(name)
    sched = teacher.schedule
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(512, 2, dtype=torch.float64, generator=g)
    u = 0.1 + 0.9 * torch.rand(512, dtype=torch.float64, generator=g)
    exact = lambda e, v: exact_signal(sched, e, v)  # noqa: E731
    # the target, in x: the DDIM step x_s = a_s D + s_s (x_t - a_t D) / s_t of the exact state x_t
    delta = 0.02
    t, s = sched.t_from_unit(u)[:, None], sched.t_from_unit(u - delta)[:, None]
    x_t = sched.alpha(t) * exact(eps, u) + sched.sigma(t) * eps
    d = teacher.x0(x_t, t[:, 0])
    ddim = sched.alpha(s) * d + sched.sigma(s) * (x_t - sched.alpha(t) * d) / sched.sigma(t)
    # the loss's target, read back from a student equal to the exact map but at s, where it returns 0: L_BS's per-sample
    # residual is then the target itself over delta
    at_s = lambda e, v: torch.zeros_like(e) if torch.equal(v, u - delta) else exact(e, v)  # noqa: E731
    ratio = (sched.sigma(s) / sched.alpha(s)) / (sched.sigma(t) / sched.alpha(t))
    y_t = exact(eps, u)
    target = y_t + (1 - ratio) * (d - y_t)
    assert float((sched.alpha(s) * target + sched.sigma(s) * eps - ddim).abs().max()) < 1e-10
    want = (target / (1 - ratio)).pow(2).mean(1).mean()
    assert abs(float(boot_losses(teacher, at_s, eps, u, delta)["bs"]) / float(want) - 1) < 1e-12
    out = boot_losses(teacher, exact, eps, u, delta)
    assert float(out["bc"]) < 1e-20  # the exact map starts where the Signal-ODE starts
    # at the exact map L_BS is the DDIM step's local error over delta, squared: O(delta^2)
    small = [float(boot_losses(teacher, exact, eps, u, dl)["bs"]) for dl in (0.02, 0.01)]
    assert 3.0 < small[0] / small[1] < 5.0, small
    bent = lambda e, v: exact(e, v) + 0.3 * (1 - v)[:, None] * e  # noqa: E731  (same boundary, another path)
    assert float(boot_losses(teacher, bent, eps, u, 0.01)["bs"]) > 100 * small[1]


def test_one_step_generator_is_boots_prediction_at_the_data_end():
    """y^(eps, u = 0) is G at t_max on the sampler's start state: the ordinary 1-step sample of the trainer's Student."""
    sched = make_schedule("edm")
    torch.manual_seed(0)
    gen = MLPDenoiser(sched, 2, hidden=32, depth=2).double()
    eps = torch.randn(16, 2, dtype=torch.float64)
    obj = Boot(BootConfig(), None)
    y0 = obj.signal(gen, eps, torch.zeros(16, dtype=torch.float64))
    assert torch.equal(y0, Student(sched).sample(gen, eps))
    ts = obj.net_time(sched, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert float(ts[0]) == sched.t_max and bool((ts[1:] < ts[:-1]).all())
    assert abs(float(ts[2]) - float(sched.t_from_unit(torch.tensor(0.75, dtype=torch.float64)))) < 1e-12
    assert torch.equal(start_signal(sched, eps), 0 * eps)  # EDM starts at x_T = sigma_max eps: the signal is 0


def test_training_reads_only_the_noise():
    """A batch whose real samples are NaN gives the same finite loss as one without: batch.real is never read."""
    sched = make_schedule("edm")
    torch.manual_seed(0)
    gen = MLPDenoiser(sched, 2, hidden=32, depth=2).double()
    nets = Nets(teacher=gaussian_teacher("edm"), generator=gen)
    noise = torch.randn(64, 2, dtype=torch.float64)
    obj = Boot(BootConfig(), None)
    torch.manual_seed(1)
    a = obj.generator_loss(nets, Batch(noise=noise), 0)
    torch.manual_seed(1)
    b = obj.generator_loss(nets, Batch(noise=noise, real=torch.full((64, 2), float("nan"), dtype=torch.float64)), 0)
    assert torch.isfinite(a["loss"]) and float(a["loss"]) == float(b["loss"])
    a["loss"].backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in gen.parameters())


def test_validation():
    for bad in (dict(delta=0.0), dict(delta=1.0), dict(span=0.0), dict(span=1.5), dict(boundary_weight=-1.0)):
        with pytest.raises(ConfigError):
            Boot(BootConfig(**bad), None)


@pytest.mark.slow
def test_boot_ring_beats_the_teachers_one_step_sampler(tmp_path):
    """experiment=gmm_boot shortened (250 steps, teacher net 400 steps): from noise alone the 1-step student covers all
    8 modes far below the teacher's own 1-step sampler (the mixture mean, ~0.70)."""
    from conftest import ring_run_beats_one_step_teacher

    ring_run_beats_one_step_teacher(["experiment=gmm_boot", "trainer.steps=250", "teacher.net_steps=400"], tmp_path, 3,
                                    "boot", spread="ring_boot")  # measured 0.147 vs 0.703
