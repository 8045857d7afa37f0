"""Consistency distillation (Song et al. 2023, "Consistency Models", CM), with iCT's pieces as options.

On a discretization sig_1 < ... < sig_N of the noise level (consistency.py), pick an adjacent pair
(sig_n, sig_{n+1}) and, with x0 ~ data and eps ~ N(0, I),
    x_{n+1} = alpha x0 + sigma eps                          at t_{n+1}
    x^_n    = one teacher ODE step t_{n+1} -> t_n (Euler, or Heun = CM eq. (7)'s Phi with EDM's 2nd order)
    L       = lambda(sig_n) d( f_theta(x_{n+1}, t_{n+1}), f_theta-(x^_n, t_n) )          CM eq. (7) / Alg. 2
f_theta is the generator's x0 map; ``generator.consistency_boundary=true`` makes it satisfy f(x, t_min) = x
exactly (denoisers/consistency.py). The target f_theta- is the student itself under stop-gradient
(``target_ema=0``, iCT Sec. 3.2) or an EMA copy theta- <- mu theta- + (1 - mu) theta (CM eq. (8)), kept as an
extra trained module so the trainer checkpoints it and a resumed run is bit-identical.
Multi-step sampling is the student's ``renoise`` sampler (CM Alg. 1) on generator.ts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onestep.errors import ConfigError
from onestep.objectives import consistency as C
from onestep.objectives.base import Batch, Nets, Objective, ObjectiveConfig, register_objective
from onestep.core import noised
from onestep.schedules import bcast

SOLVERS = ("euler", "heun", "data")


@dataclass
class CDConfig(ObjectiveConfig):
    name: str = "cd"
    #: teacher ODE step between adjacent times: euler | heun; ``data`` = consistency training (no teacher)
    solver: str = "heun"
    #: fixed discretization: N noise levels on EDM's rho-grid between the schedule's sig_min and sig_max
    num_scales: int = 18
    rho: float = 7.0
    #: iCT curriculum N(k) = min(s0 2^floor(k/K'), s1) + 1 over ``curriculum_steps`` (0 = fixed num_scales)
    curriculum_steps: int = 0
    scales_min: int = 10
    scales_max: int = 1280
    #: pair sampling: uniform (CM) | lognormal (iCT, P_mean / P_std in log sigma)
    time_sampling: str = "uniform"
    p_mean: float = -1.1
    p_std: float = 2.0
    #: lambda(sig_n): uniform (CM) | inv_dsigma (iCT's 1 / (sig_{n+1} - sig_n))
    weighting: str = "uniform"
    #: l2 (CM) | pseudo_huber (iCT; c = 0.00054 sqrt(d) unless huber_c > 0) | huber_mean (LCM's, per element;
    #: c = huber_c, 0.001 unless set)
    distance: str = "l2"
    huber_c: float = 0.0
    #: target network: 0 = stop-gradient student (iCT); mu in (0, 1) = EMA target (CM eq. 8)
    target_ema: float = 0.0


@register_objective
class ConsistencyDistillation(Objective):
    name = "cd"
    Config = CDConfig
    networks = ("generator",)

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if cfg.solver not in SOLVERS:
            raise ConfigError(f"objective.solver '{cfg.solver}' is unknown; choose one of {SOLVERS}")
        if not 0 <= cfg.target_ema < 1:
            raise ConfigError(f"objective.target_ema={cfg.target_ema} must be in [0, 1) (0 = stop-gradient target)")
        if cfg.curriculum_steps < 0 or not 1 <= cfg.scales_min <= cfg.scales_max:
            raise ConfigError(f"objective.curriculum_steps={cfg.curriculum_steps}, scales_min={cfg.scales_min}, "
                              f"scales_max={cfg.scales_max} must satisfy curriculum_steps >= 0, 1 <= scales_min <= scales_max")
        C.index_probs(torch.tensor([1.0, 2.0], dtype=torch.float64), cfg.time_sampling)  # validates the names
        C.pair_weight(torch.ones(1), torch.full((1,), 2.0), cfg.weighting)
        C.distance(torch.zeros(1, 1), torch.zeros(1, 1), cfg.distance)

    def targets(self):
        # CM eq. (8): theta- <- mu theta- + (1 - mu) theta, applied by the trainer after each generator step
        return {} if self.cfg.target_ema == 0 else {"target": self.cfg.target_ema}

    def scales(self, step: int) -> int:
        c = self.cfg
        return C.curriculum_scales(step, c.curriculum_steps, c.scales_min, c.scales_max) if c.curriculum_steps \
            else c.num_scales

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        return self.consistency_loss(nets, batch, step)[0]

    def pair(self, sched, x0: torch.Tensor, step: int):
        """An adjacent pair of levels per sample and the data noised to the upper one:
        (sig_lo, sig_hi, t_lo, t_hi, x_hi, eps, number of levels)."""
        c = self.cfg
        n_scales = self.scales(step)
        sigmas = C.karras_sigmas(n_scales, *C.sigma_range(sched), c.rho)
        idx = torch.multinomial(C.index_probs(sigmas, c.time_sampling, c.p_mean, c.p_std), x0.shape[0], replacement=True)
        sig_lo, sig_hi = sigmas[idx], sigmas[idx + 1]
        t_lo, t_hi = (C.t_of_sigma(sched, s).to(x0) for s in (sig_lo, sig_hi))
        x_hi, eps = noised(sched, x0, t_hi)
        return sig_lo, sig_hi, t_lo, t_hi, x_hi, eps, n_scales

    def consistency_loss(self, nets: Nets, batch: Batch, step: int):
        """(the loss dict, f_theta(x_{n+1}, t_{n+1}) with its gradient)."""
        if batch.real is None:
            raise ConfigError(f"objective '{self.name}' needs data samples (x0) but the data source gives none; "
                              "use data with real samples (data=gmm)")
        c, student = self.cfg, nets.generator
        target = self._target(nets)
        x0 = batch.real
        sig_lo, sig_hi, t_lo, t_hi, x_hi, eps, n_scales = self.pair(student.schedule, x0, step)
        with torch.no_grad():
            x_lo = self._step(nets, x0, eps, x_hi, t_hi, t_lo, batch.cond)
            y = self.represent(nets, target.x0(x_lo, t_lo, batch.cond))
        f = student.x0(x_hi, t_hi, batch.cond)
        wdtype = torch.promote_types(x0.dtype, torch.float32)
        d = C.distance(self.represent(nets, f).to(wdtype), y.to(wdtype), c.distance, c.huber_c or None)
        lam = C.pair_weight(sig_lo, sig_hi, c.weighting).to(d)
        loss = (lam * d).mean()
        return {"loss": loss, "consistency": d.mean().detach(), "scales": torch.tensor(float(n_scales))}, f

    def represent(self, nets: Nets, x0: torch.Tensor) -> torch.Tensor:
        """What d compares of f_theta and its target: x0 itself (MCM compares a motion representation of it)."""
        return x0

    def _step(self, nets, x0, eps, x, t, s, cond):
        """x at time s < t: the teacher's probability-flow ODE step (CD), or the same eps at s (CT)."""
        if self.cfg.solver == "data":
            return noised(nets.generator.schedule, x0, s, eps)[0]
        dt = bcast(s - t, x)
        u = nets.teacher.flow(x, t, cond)
        x_next = x + dt * u
        if self.cfg.solver == "heun":
            x_next = x + dt * 0.5 * (u + nets.teacher.flow(x_next, s, cond))
        return x_next

    def _target(self, nets: Nets):
        return nets.generator if self.cfg.target_ema == 0 else nets.targets["target"]
