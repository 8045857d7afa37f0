"""BOOT: data-free distillation by bootstrapping along the Signal-ODE (Gu, Zhai, Zhang, Liu & Susskind 2023, "BOOT:
Data-free Distillation of Denoising Diffusion Models with Bootstrapping", arXiv 2306.05544; no official code released).

A time-conditioned student predicts, from the noise eps alone, the teacher's ODE state at any time t of the trajectory
started at eps. BOOT writes that state through its low-frequency *signal*
    x_t = alpha_t y_t + sigma_t eps,        y_t = (x_t - sigma_t eps) / alpha_t              (Sec. 3.1, Signal-ODE)
which moves by dy_t/dt = -lambda'_t (f_phi(x_t, t) - y_t), lambda_t = log(sigma_t / alpha_t), f_phi the teacher's x0.
The teacher's DDIM step t -> s < t in this variable is
    y_s = y_t + delta (f_phi(x_t, t) - y_t),   delta = 1 - e^(lambda_s - lambda_t) = 1 - sig_s / sig_t
(sig = sigma / alpha), and the bootstrapping loss (Sec. 3.2) regresses the student at s on that step taken from its
own stop-gradient prediction at t:
    L_BS = E_{eps, t} 1 / delta^2 || y^_s - SG[y^_t + delta (f_phi(x^_t, t) - y^_t)] ||^2,   x^_t = alpha_t y^_t + sigma_t eps
    L_BC = E_eps || y^_T - y_T ||^2                                                  (the boundary at t = T)
    L    = L_BS + boundary_weight L_BC
1 / delta^2 makes L_BS a finite-difference match of dy/dt (the form of OFTSR's re-implementation, distil_loss='boot').
No data sample is read: every input is the batch's noise (batch.real is never touched).

Boundary. BOOT's VP teacher starts from x_T = eps with alpha_T -> 0, where the signal jumps to f_phi(eps, T) at once; on
a schedule with finite SNR at t_max every sampler of this project starts from x_T = prior_std(T) eps, so the Signal-ODE
starts from the exact y_T = (prior_std(T) - sigma_T) / alpha_T eps (0 on EDM and VP, eps on rectified flow's
t_max = 1 - 1e-4), which is L_BC's target here.

Time. t runs over the schedule's unit coordinate: u ~ U[delta_u, 1], t = t_from_unit(u), s = t_from_unit(u - delta_u)
(BOOT: t ~ U[delta, 1], s = t - delta); on EDM that is log-uniform sigma.

Student. The generator stays a plain Denoiser (sampling, evaluation and export run it unchanged); BOOT's
y^(eps, u) is its x0 at the start state x_T with the trajectory time *reflected* into its time input,
    y^(eps, u) = G.x0(x_T, t_from_unit(1 - span u)),   x_T = prior_std(t_max) eps
so the data end u = 0 is G at t_max, i.e. the ordinary 1-step generator G.x0(x_T, t_max), and the noise end u = 1 reads
G at t_from_unit(1 - span), a level still high enough (sigma 5.7 on EDM for span = 0.25) that G's preconditioned
output is a free function of its input (at low sigma G.x0(x, t) is pinned near x). BOOT is a 1-step method: a
multi-step student (renoise) would feed G inputs BOOT never trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from onestep.errors import ConfigError
from onestep.objectives.base import Batch, Nets, Objective, ObjectiveConfig, register_objective
from onestep.schedules import bcast


@dataclass
class BootConfig(ObjectiveConfig):
    name: str = "boot"
    #: delta_u, the bootstrapping step s = t - delta in the schedule's unit coordinate (BOOT's fixed time step delta)
    delta: float = 0.05
    #: the fraction of G's time range the reflected trajectory time reads: u in [0, 1] -> t_from_unit(1 - span u)
    span: float = 0.25
    #: weight of the boundary loss L_BC
    boundary_weight: float = 1.0


def start_signal(sched, eps: torch.Tensor) -> torch.Tensor:
    """y_T = (x_T - sigma_T eps) / alpha_T at x_T = prior_std(t_max) eps: where the Signal-ODE starts."""
    t = torch.tensor(sched.t_max, dtype=torch.float64)
    return float((sched.prior_std(t) - sched.sigma(t)) / sched.alpha(t)) * eps


def boot_losses(teacher, signal: Callable, eps: torch.Tensor, u: torch.Tensor, delta: float, cond=None) -> dict:
    """BOOT's L_BS at the per-sample unit times u (and u - delta) and L_BC, for the student y^ = signal(eps, u)."""
    sched = teacher.schedule
    t, s = sched.t_from_unit(u), sched.t_from_unit(u - delta)
    with torch.no_grad():
        y_t = signal(eps, u)
        a_t, s_t = bcast(sched.alpha(t), eps), bcast(sched.sigma(t), eps)
        x_t = a_t * y_t + s_t * eps
        f = teacher.x0(x_t, t.to(eps), cond)
        ratio = (sched.sigma(s) / sched.alpha(s)) / (sched.sigma(t) / sched.alpha(t))
        d = bcast(1 - ratio, eps)                  # delta = 1 - e^(lambda_s - lambda_t)
        target = y_t + d * (f - y_t)               # the teacher's DDIM step t -> s in the signal
    y_s = signal(eps, u - delta)
    bs = ((y_s - target) / d).flatten(1).pow(2).mean(1)
    y_end = signal(eps, torch.ones_like(u))
    bc = (y_end - start_signal(sched, eps)).flatten(1).pow(2).mean(1)
    return {"bs": bs.mean(), "bc": bc.mean()}


@register_objective
class Boot(Objective):
    name = "boot"
    Config = BootConfig
    networks = ("generator",)

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if not 0 < cfg.delta < 1:
            raise ConfigError(f"objective.delta={cfg.delta} must be in (0, 1) (a step in the schedule's unit time)")
        if not 0 < cfg.span <= 1:
            raise ConfigError(f"objective.span={cfg.span} must be in (0, 1] (the share of the generator's time range "
                              "the reflected trajectory time reads; 0.25 keeps it at high noise)")
        if cfg.boundary_weight < 0:
            raise ConfigError(f"objective.boundary_weight={cfg.boundary_weight} must be >= 0")

    def net_time(self, sched, u: torch.Tensor) -> torch.Tensor:
        """G's time for the trajectory time u: t_from_unit(1 - span u), exactly t_max at u = 0."""
        t = sched.t_from_unit(1 - self.cfg.span * u)
        return torch.where(u <= 0, torch.full_like(t, sched.t_max), t)

    def signal(self, generator, eps: torch.Tensor, u: torch.Tensor, cond=None) -> torch.Tensor:
        """y^(eps, u) = G.x0(prior_std(t_max) eps, t_from_unit(1 - span u))."""
        sched = generator.schedule
        t_max = torch.tensor(sched.t_max, dtype=torch.float64)
        x_start = eps * sched.prior_std(t_max).to(eps)
        return generator.x0(x_start, self.net_time(sched, u).to(eps), cond)

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        eps, c = batch.noise, self.cfg
        u = c.delta + (1 - c.delta) * torch.rand(eps.shape[0], dtype=torch.float64)
        out = boot_losses(nets.teacher, lambda e, v: self.signal(nets.generator, e, v, batch.cond), eps, u, c.delta,
                          batch.cond)
        return {"loss": out["bs"] + c.boundary_weight * out["bc"], **{k: v.detach() for k, v in out.items()}}
