"""Reflow / InstaFlow (onestep/objectives/reflow.py) on Gaussian data, where everything is affine: the teacher's ODE
coupling is the closed-form PF-ODE map, and an affine coupling z -> mu + k z has an exactly straight rectified flow
(x_t determines z), so the reflow loss vanishes there and the reflowed model's Euler pairs are the coupling itself."""

from __future__ import annotations

import pytest
import torch

from onestep.core import Batch, Nets
from onestep.denoisers.base import Denoiser
from onestep.denoisers.gmm import GaussianMixture, GMMDenoiser
from onestep.errors import ConfigError
from onestep.objectives.reflow import PairBank, Reflow, ReflowConfig, ode_pairs, reflow_loss
from onestep.schedules import bcast, make_schedule

MU, VAR = torch.tensor([0.3, -0.5], dtype=torch.float64), 0.2


def gaussian_teacher(sched):
    return GMMDenoiser(GaussianMixture(MU[None], VAR * torch.eye(2, dtype=torch.float64)[None], [1.0]), sched)


class StraightFlow(Denoiser):
    """The exact rectified flow of the coupling x = mu + k z: x_t = a x + s z = a mu + (a k + s) z, so
    z = (x_t - a mu) / (a k + s) and the x0 prediction is mu + k z."""

    prediction = "x0"

    def __init__(self, sched, k: float):
        super().__init__()
        self.schedule, self.k, self.data_shape = sched, k, (2,)
        self.w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))  # a device for prepare()

    def forward(self, x_t, t, cond=None):
        a, s = bcast(self.schedule.alpha(t), x_t), bcast(self.schedule.sigma(t), x_t)
        return MU + self.k * (x_t - a * MU) / (a * self.k + s)


@pytest.mark.parametrize("name", ["rectified_flow", "edm"])
def test_teacher_pairs_are_the_exact_ode_map(name):
    """The pair pool is the teacher's coupling: the PF-ODE map of N(mu, var) from prior_std(t_max) z to data keeps the
    z-score (x - a mu) / sqrt(a^2 var + s^2) constant. Heun pairs converge to it at second order (error / 4 per
    doubling of the steps) and are within 2e-3 at 128 steps."""
    sched = make_schedule(name)
    errs = []
    for steps in (32, 64, 128):
        ts = sched.default_ts(steps)
        pairs = ode_pairs(gaussian_teacher(sched), 256, ts, "heun", 0, torch.device("cpu"))
        z, t_max = pairs["noise"].double(), ts[0]
        sd_max = torch.sqrt(sched.alpha(t_max) ** 2 * VAR + sched.sigma(t_max) ** 2)
        exact = MU + VAR**0.5 * (sched.prior_std(t_max) * z - sched.alpha(t_max) * MU) / sd_max
        errs.append(float((pairs["sample"].double() - exact).abs().max()))
    assert errs[2] < 2e-3 and errs[1] < 0.3 * errs[0] and errs[2] < 0.3 * errs[1], errs


@pytest.mark.parametrize("name", ["rectified_flow", "edm"])
def test_reflow_loss_vanishes_on_a_straight_coupling(name):
    """Rectified Flow eq. (1) is zero for the exact flow of an affine coupling (its paths are the straight lines), and
    clearly not for the teacher of the same marginal, whose paths are curved."""
    sched = make_schedule(name)
    k = 0.4
    g = torch.Generator().manual_seed(0)
    z = torch.randn(512, 2, generator=g, dtype=torch.float64)
    x = MU + k * z
    t = sched.t_from_unit(torch.rand(512, generator=g, dtype=torch.float64))
    straight = float(reflow_loss(StraightFlow(sched, k), z, x, t))
    curved = float(reflow_loss(gaussian_teacher(make_schedule(name)), z, x, t))
    assert straight < 1e-20, straight
    assert curved > 1e-3, curved


def test_instaflow_switches_to_the_reflowed_models_pairs():
    """mode=instaflow: reflow on the teacher's pairs before reflow_steps, then distillation on pairs from the generator's
    own ODE; for an exactly straight generator those pairs are its coupling mu + k z, sampled once into the buffer."""
    sched = make_schedule("rectified_flow")
    k = 0.4
    cfg = ReflowConfig(mode="instaflow", reflow_steps=2, num_pairs=64, pair_steps=8, distill_steps=4)
    gen = StraightFlow(sched, k)

    def generate(nets, batch):
        t = torch.full((batch.noise.shape[0],), sched.t_max, dtype=batch.noise.dtype)
        return nets.generator.x0(batch.noise * sched.prior_std(t)[:, None], t, batch.cond)

    obj = Reflow(cfg, generate)
    bank = PairBank(cfg.num_pairs, (2,)).double()
    nets = Nets(teacher=gaussian_teacher(sched), generator=gen, modules={"reflowed_pairs": bank})
    obj.prepare(nets)
    batch = Batch(noise=torch.zeros(32, 2, dtype=torch.float64))
    out = obj.generator_loss(nets, batch, 0)
    assert "reflow" in out and not int(bank.filled)
    out = obj.generator_loss(nets, batch, 2)
    assert "distill" in out and int(bank.filled)
    straight = MU + k * (bank.noise - sched.alpha(torch.tensor(sched.t_max)) * MU) / (
        sched.alpha(torch.tensor(sched.t_max)) * k + sched.sigma(torch.tensor(sched.t_max)))
    assert float((bank.sample - straight).abs().max()) < 1e-6
    assert float(out["loss"]) < 1e-12
    kept = bank.sample.clone()
    gen.k = 0.5  # the generator moves on
    obj.generator_loss(nets, batch, 3)
    assert torch.equal(bank.sample, kept)  # sampled once, not re-sampled from a moving generator


def test_modes_and_validation():
    cfg = ReflowConfig(mode="reflow")
    assert Reflow(cfg, None).stage(10**6) == "reflow"
    assert Reflow(ReflowConfig(mode="distill"), None).stage(0) == "distill"
    for bad in (dict(mode="rectify"), dict(pair_solver="rk4"), dict(num_pairs=0), dict(t_lo=0.5, t_hi=0.5)):
        with pytest.raises(ConfigError):
            Reflow(ReflowConfig(**bad), None)


@pytest.mark.slow
def test_instaflow_ring_beats_the_teachers_one_step_sampler(tmp_path):
    """experiment=gmm_reflow (400 reflow + 400 distillation steps): the 1-step student covers all 8 modes with a
    sliced-W2 far below the teacher's own 1-step sampler (the mixture mean, ~0.71)."""
    from conftest import ring_run_beats_one_step_teacher

    ring_run_beats_one_step_teacher(["experiment=gmm_reflow"], tmp_path, 4, "instaflow", samples=5000,
                                    spread="ring_reflow")
