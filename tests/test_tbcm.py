"""TBCM (onestep/objectives/tbcm.py): its training inputs are the teacher's own ODE states. On Gaussian data the
PF-ODE keeps the z-score (x - a mu) / sqrt(a^2 var + s^2) constant, so every recorded state is known in closed form;
a short ring run beats the teacher's 1-step sampler by a wide margin without reading any data sample."""

from __future__ import annotations

import pytest
import torch

from onestep.core import Batch
from onestep.denoisers.gmm import GaussianMixture, GMMDenoiser
from onestep.denoisers.trigflow import as_trigflow
from onestep.errors import ConfigError
from onestep.objectives.tbcm import TBCM, TBCMConfig
from onestep.schedules import make_schedule

MU, VAR = torch.tensor([0.3, -0.5], dtype=torch.float64), 0.2


def exact_states(sched, noise, ts):
    """(K, B, 2): the PF-ODE map from prior_std(ts[0]) noise at ts[0] to every ts[k]."""
    sd = lambda t: torch.sqrt(sched.alpha(t) ** 2 * VAR + sched.sigma(t) ** 2)  # noqa: E731
    zs = (sched.prior_std(ts[0]) * noise - sched.alpha(ts[0]) * MU) / sd(ts[0])
    return torch.stack([sched.alpha(t) * MU + sd(t) * zs for t in ts])


@pytest.mark.parametrize("solver, tol", [("heun", 2e-3), ("euler", 5e-2)])
def test_training_points_are_the_teachers_ode_states(solver, tol):
    """Every (x_t, t) TBCM trains on is a state of the teacher's trajectory from the batch's own noise: the exact
    PF-ODE map of the Gaussian teacher (seen in TrigFlow, as the sCD loss sees it) at a grid time, within the
    solver's error; no data sample is read (batch.real is None)."""
    teacher = as_trigflow(GMMDenoiser(GaussianMixture(MU[None], VAR * torch.eye(2, dtype=torch.float64)[None], [1.0]),
                                      make_schedule("edm")), 0.5)
    sched = teacher.schedule
    obj = TBCM(TBCMConfig(trajectory_steps=64, solver=solver), generate=None)
    noise = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    x0, z, x_t, t = obj.training_points(Batch(noise=noise), teacher, sched)
    assert x0 is None and z is None
    torch.manual_seed(1)
    ts = obj.grid(sched, float(torch.rand((), dtype=torch.float64)))
    k = torch.randint(1, len(ts), (256,))
    assert torch.equal(t, ts[k])
    want = exact_states(sched, noise, ts)[k, torch.arange(256)]
    err = float((x_t - want).abs().max())
    assert err < tol, err
    neighbour = exact_states(sched, noise, ts)[torch.clamp(k - 1, min=1), torch.arange(256)]
    assert float((x_t - neighbour).abs().max()) > 3 * err  # the state of the time drawn, not of the next one


def test_grid_is_stratified_on_the_scm_proposal_and_validation():
    obj = TBCM(TBCMConfig(trajectory_steps=8), generate=None)
    sched = make_schedule("trigflow")
    ts = obj.grid(sched, 0.5)
    assert len(ts) == 9 and float(ts[0]) == sched.t_max and bool((ts[1:] < ts[:-1]).all())
    tau = torch.log(0.5 * torch.tan(ts[1:]))
    assert abs(float(tau.mean()) - obj.cfg.p_mean) < 0.05  # the mid-quantiles of N(P_mean, P_std^2) centre on P_mean
    for u in (0.0, 1e-9, 1.0):  # the extreme draws: the top quantile clamps below t_max, never onto it
        ts = obj.grid(sched, u)
        assert bool((ts[1:] < ts[:-1]).all()), (u, ts.tolist())
    for bad in (dict(trajectory_steps=0), dict(solver="ddim")):
        with pytest.raises(ConfigError):
            TBCM(TBCMConfig(**bad), generate=None)


@pytest.mark.slow
def test_tbcm_ring_beats_the_teachers_one_step_sampler(tmp_path):
    """experiment=gmm_tbcm as shipped (800 steps, ~90 s on one thread): the 1-step student covers all 8 modes with a sliced-W2 far below the teacher's
    own 1-step sampler (the mixture mean, ~0.70)."""
    from conftest import ring_run_beats_one_step_teacher

    ring_run_beats_one_step_teacher(["experiment=gmm_tbcm"], tmp_path, 3, "tbcm", samples=5000,
                                    spread="ring_tbcm")
