"""TBCM: continuous-time consistency distillation without data, on points of the teacher's own generation trajectory
(Tang, Zhang, Zhu, Xiang, Yang, Yu, Liu & Wang 2025, "Image-Free Timestep Distillation via Continuous-Time
Consistency with Trajectory-Sampled Pairs", arXiv 2511.20410, the Trajectory-Backward Consistency Model; code
announced at hustvl/TBCM, not released when this was written).

The loss is sCD's (scm.py: TrigFlow, JVP tangent, tangent warm-up and normalization, adaptive weighting), with one
change, where its points come from: instead of a data sample noised to x_t = cos(t) x0 + sin(t) z, the batch's noise
is run backward in time through the (guided) teacher's probability-flow ODE from t_max over a grid of
K = ``trajectory_steps`` TrigFlow times (the teacher sampler ``solver``, one sampler signature: sampling.sample), and
every sample takes the state at one grid time,
    x_{t_k} = ODE_teacher(sigma_d sin(t_max) eps; t_max -> t_k),   k ~ U{1, ..., K}
so training sees exactly what the teacher (and a consistency model) meets at inference, and no data at all: the
"diffusion-generation space discrepancy" the paper removes. The grid is K stratified quantiles of sCM's time proposal,
shifted by one uniform draw per step (so t_k is distributed as sCD's t; a grid uniform in the angle put 1/K of the batch at every near-pi/2 time, where the
tangent vanishes, and left the 1-step student at 0.69 sliced-W2 on the ring); the paper's own trajectory sampling
schedule is not reproduced. dx_t/dt is the teacher's velocity at x_{t_k} (sCD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from onestep.errors import ConfigError
from onestep.objectives.base import register_objective
from onestep.objectives.scm import SCD, SCMConfig
from onestep.sampling import sample


@dataclass
class TBCMConfig(SCMConfig):
    name: str = "tbcm"
    #: K, the grid of TrigFlow times the teacher trajectory is recorded at (t_max down to t_min)
    trajectory_steps: int = 16
    #: the teacher's ODE sampler along the trajectory: heun | euler
    solver: str = "heun"


@torch.no_grad()
def trajectory(teacher, noise: torch.Tensor, ts: torch.Tensor, cond=None, solver: str = "heun") -> torch.Tensor:
    """(K, B, ...) the teacher's ODE states x_{ts[k]} from x_{ts[0]} = prior_std(ts[0]) noise (the sampler's start)."""
    states = []
    sample(teacher, noise, ts, cond, method=solver, callback=lambda i, x, x0: states.append(x))
    return torch.stack(states)


@register_objective
class TBCM(SCD):
    name = "tbcm"
    Config = TBCMConfig

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if cfg.trajectory_steps < 1 or cfg.solver not in ("heun", "euler"):
            raise ConfigError(f"objective.trajectory_steps={cfg.trajectory_steps} must be >= 1 and objective.solver="
                              f"'{cfg.solver}' one of heun, euler")

    def grid(self, sched, u: float = 0.5) -> torch.Tensor:
        """t_max, then K times at the (k - u) / K quantiles of sCM's proposal tau = log(sigma_d tan t) ~ N(P_mean,
        P_std^2), descending: with u ~ U(0, 1) per step, a stratified draw of sCD's times (every t reachable)."""
        c, k = self.cfg, self.cfg.trajectory_steps
        q = (torch.arange(k, 0, -1, dtype=torch.float64) - u) / k
        tau = c.p_mean + c.p_std * math.sqrt(2) * torch.erfinv(2 * q - 1)
        # below t_max: the top quantile of a small u would clamp onto the start time (a repeated time is no t-list)
        t = torch.arctan(torch.exp(tau) / c.sigma_data).clamp(sched.t_min, sched.t_max * (1 - 1e-6))
        return torch.cat([torch.tensor([sched.t_max], dtype=torch.float64), t])

    def training_points(self, batch, teacher, sched):
        ts = self.grid(sched, float(torch.rand((), dtype=torch.float64)))
        states = trajectory(teacher, batch.noise, ts, batch.cond, self.cfg.solver)
        k = torch.randint(1, len(ts), (batch.noise.shape[0],))
        x_t = states[k.to(states.device), torch.arange(batch.noise.shape[0], device=states.device)]
        return None, None, x_t, ts[k].to(batch.noise)
