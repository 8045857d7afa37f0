"""TDM: Trajectory Distribution Matching (Luo et al. 2025, "Learning Few-Step Diffusion Models by Trajectory
Distribution Matching", ICCV 2025, arXiv 2503.06674; official code Luo-Yihong/TDM train_tdm_demo.py, cited below as
"demo:<line>" at commit 81b019f).

A K-step student on the deterministic sampler (``generator.method=ddim``, the demo's ``generate_new``, demo:59-100:
x_{t_{i+1}} = alpha x0_i + sigma eps_i with the student's own eps) is matched to the teacher *along its trajectory*,
at the distribution level: for each row a step i of its trajectory is drawn (demo:1141-1145), the student's x0_i at
x_{t_i} carries the gradient, and its DDIM step to s = t_{i+1} (the clean sample at the last step) gives the
intermediate sample x_s, whose distribution is compared with the teacher's marginal at s through their diffusions to
t > s (demo:1161-1163):
    x_t = alpha_{t|s} x_s + sigma_{t|s} n,
    alpha_{t|s} = alpha_t / alpha_s,   sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2.
Generator (the data-free score distillation objective, demo:1165-1187): the DMD direction in x0 form at x_t,
    grad = (mu_fake(x_t) - mu_real(x_t)) / mean|x0_i - mu_real(x_t)|
(DMD eq. (7)-(8), distribution_matching.py; the demo's loss ||x0_i - sg(x0_i + mu_real - mu_fake)||^2 / w has twice
this gradient), applied to x0_i through the surrogate: x_s = c x0_i + const with c = alpha_s - sigma_s alpha_{t_i} /
sigma_{t_i} > 0 at fixed x_{t_i}, so per row this is the gradient of the distribution-matching KL at x_s up to a positive
factor. The real score is the (guided) teacher: the demo's cfg term (demo:1174-1176) is the CFG teacher's x0.
Fake score (demo:1121-1137): regression of the fake x0 prediction at x_t onto the student's x0_i (detached) with
weight min(SNR_t, snr_clamp) and the importance weight that corrects for x_t's noise not being a fresh Gaussian draw:
x_t = alpha_t x0_i + sigma_t m, m = (alpha_{t|s} sigma_s eps_i + sigma_{t|s} n) / sigma_t (the demo's "mixed noise",
demo:1047-1057), and
    w_IS = exp(-mean(m^2) / 2) / exp(-mean(n^2) / 2)                                        (demo:1129)
(the Gaussian density ratio of m against n, tempered by the element count: means, not sums, as the demo writes it).
At the last step (s = 0) m = n and w_IS = 1: plain x0 regression, DMD's fake-score DSM.
Sampling-steps-aware draw of t (``t_within_step``, the demo's --use_separate, demo:1115-1119): t lies in the step's
own segment [s, t_i) instead of [s, T], so each step's target is the teacher's marginal over its own part of the
trajectory, decoupled from the other steps'. Without it t is drawn from [s, t_hi] (demo's default). t is drawn uniform
in the schedule's unit coordinate, u ~ U[max(u_s, t_lo), hi] (the demo: integer timesteps in [max(20, s), 790)).
One model serves several step counts: the student samples any ``steps`` on its evenly spaced t-list (generator.py).
Not covered: the demo's random intermediate point s in [t_{i+1}, t_i) (--use_randmid) and its Huber variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onestep.errors import ConfigError
from onestep.generator import Student
from onestep.objectives.base import (Batch, Nets, Objective, ObjectiveConfig, TimeRange, check_t_range,
                                     register_objective)
from onestep.objectives.distribution_matching import dmd_normalizer, surrogate_loss
from onestep.objectives.phased_dmd import SUBINTERVAL_VAR_FLOOR, unit_of
from onestep.sampling import sample
from onestep.schedules import bcast


@dataclass
class TDMConfig(ObjectiveConfig, TimeRange):
    name: str = "tdm"
    #: fake-score updates per generator update (the demo: one each, demo:1135-1137 and :1194-1199)
    ttur: int = 1
    #: the diffusion time t of both losses: u ~ U[max(u_s, t_lo), t_hi] in the schedule's unit coordinate, u_s the
    #: unit coordinate of the step's end s (the demo's timesteps in [max(20, s), 790) of 1000: 0.02, 0.99)
    t_lo: float = 0.02
    t_hi: float = 0.99
    #: sampling-steps-aware draw: t inside the step's own segment [s, t_i) (the demo's --use_separate flag, off by
    #: default there); false: t in [s, t_hi], the demo's default
    t_within_step: bool = True
    #: the fake-score loss weight min(SNR_t, snr_clamp), SNR_t = alpha_t^2 / sigma_t^2 (the demo's 5, demo:1131-1132)
    snr_clamp: float = 5.0


@dataclass
class TrajectoryPoint:
    """One row-wise draw of TDM: the student's x0_i at x_{t_i} (with gradient), its DDIM step to x_s, the diffused x_t,
    and the frames the losses read (all broadcast to x's shape)."""

    x0: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    mixed: torch.Tensor  # x_t = alpha_t x0 + sigma_t mixed (the demo's mixed noise)
    fresh: torch.Tensor  # n, the fresh noise of the s -> t diffusion
    alpha_t: torch.Tensor
    sigma_t: torch.Tensor
    step: torch.Tensor | None = None  # (N,) the trajectory step i of each row


def diffuse_step(schedule, x_ti: torch.Tensor, x0: torch.Tensor, t_i: torch.Tensor, s: torch.Tensor,
                 clean: torch.Tensor, t: torch.Tensor, n: torch.Tensor) -> TrajectoryPoint:
    """The student's DDIM step from x_{t_i} (x0 prediction x0) to s, then the forward diffusion s -> t with noise n.
    Rows where ``clean`` is true end the trajectory (x_s = x0, s ignored). t, t_i, s: (N,)."""
    a_i, s_i = bcast(schedule.alpha(t_i), x0).to(x0), bcast(schedule.sigma(t_i), x0).to(x0)
    keep = bcast(~clean, x0)
    a_s = torch.where(keep, bcast(schedule.alpha(s), x0).to(x0), torch.ones_like(a_i))
    s_s = torch.where(keep, bcast(schedule.sigma(s), x0).to(x0), torch.zeros_like(s_i))
    eps = (x_ti - a_i * x0) / s_i  # the student's eps at x_{t_i} (DDIM, eta = 0)
    x_s = a_s * x0 + s_s * eps
    a_t, s_t = bcast(schedule.alpha(t), x0).to(x0), bcast(schedule.sigma(t), x0).to(x0)
    a_ts = a_t / a_s
    s_ts = (s_t**2 - a_ts**2 * s_s**2).clamp_min(SUBINTERVAL_VAR_FLOOR).sqrt()
    x_t = a_ts * x_s + s_ts * n
    mixed = (a_ts * s_s * eps.detach() + s_ts * n) / s_t
    return TrajectoryPoint(x0, x_t, t, mixed, n, a_t, s_t)


def importance_weight(mixed: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """demo:1129: exp(-mean(m^2) / 2) / exp(-mean(n^2) / 2) per row, (N,), computed as one exp in fp32 or wider."""
    wdtype = torch.promote_types(mixed.dtype, torch.float32)
    m2, n2 = mixed.to(wdtype).pow(2).flatten(1).mean(1), fresh.to(wdtype).pow(2).flatten(1).mean(1)
    return torch.exp(-0.5 * (m2 - n2))


def fake_score_loss(critic, p: TrajectoryPoint, cond=None, snr_clamp: float = 5.0) -> torch.Tensor:
    """demo:1130-1134: mean over rows of min(SNR_t, snr_clamp) * w_IS * mean|critic.x0(x_t) - sg(x0)|^2."""
    wdtype = torch.promote_types(p.x0.dtype, torch.float32)
    err = (critic.x0(p.x_t.detach(), p.t, cond).to(wdtype) - p.x0.detach().to(wdtype)).pow(2).flatten(1).mean(1)
    snr = (p.alpha_t / p.sigma_t).flatten(1)[:, 0].to(wdtype) ** 2
    return (err * snr.clamp_max(snr_clamp) * importance_weight(p.mixed, p.fresh)).mean()


@torch.no_grad()
def tdm_direction(teacher, critic, p: TrajectoryPoint, cond=None) -> tuple[torch.Tensor, dict]:
    """(mu_fake(x_t) - mu_real(x_t)) / mean|x0 - mu_real(x_t)| (DMD eq. (7)-(8) at the trajectory point; no grad)."""
    wdtype = torch.promote_types(p.x0.dtype, torch.float32)
    mu_real, mu_fake = teacher.x0(p.x_t, p.t, cond).to(wdtype), critic.x0(p.x_t, p.t, cond).to(wdtype)
    grad = torch.nan_to_num((mu_fake - mu_real) / dmd_normalizer(p.x0, mu_real))
    return grad.to(p.x0.dtype), {"dm_grad_norm": grad.flatten(1).norm(dim=1).mean()}


@register_objective
class TDM(Objective):
    name = "tdm"
    Config = TDMConfig
    networks = ("generator", "critic")

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        check_t_range(cfg)
        if cfg.snr_clamp <= 0:
            raise ConfigError(f"objective.snr_clamp={cfg.snr_clamp} must be > 0 (the fake-score weight min(SNR, "
                              "snr_clamp); the official code's 5)")
        self._units: dict[float, float] = {}

    @classmethod
    def shape_generator(cls, gc, net):
        if gc.steps > 1 and gc.method != "ddim":
            raise ConfigError(f"generator.method={gc.method}: objective=tdm matches the student's deterministic "
                              "trajectory (each step reuses its own eps); pass generator.method=ddim")
        return net

    @property
    def student(self) -> Student:
        """The sampler whose trajectory TDM matches: the one behind ``generate`` (Student.train_sample)."""
        student = getattr(self.generate, "__self__", None)
        if not isinstance(student, Student):
            raise ConfigError("objective=tdm rolls out the student's own sampler: build it with "
                              "onestep.generator.Student(...).train_sample as its generate function")
        return student

    def _unit(self, schedule, t: float) -> float:
        if t not in self._units:
            self._units[t] = unit_of(schedule, t)
        return self._units[t]

    def draw_t(self, schedule, i: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Row-wise t: u ~ U[max(u_s, t_lo), hi], s = t_{i+1} (0 at the last step), hi = u_{t_i} when t_within_step
        (the step's own segment) else t_hi."""
        ts = self.student.ts.tolist()
        lo_of = [max(self.cfg.t_lo, self._unit(schedule, ts[j + 1]) if j + 1 < len(ts) else 0.0)
                 for j in range(len(ts))]
        hi_of = [min(self.cfg.t_hi, self._unit(schedule, ts[j])) if self.cfg.t_within_step else self.cfg.t_hi
                 for j in range(len(ts))]
        for j, (lo, hi) in enumerate(zip(lo_of, hi_of)):
            if lo >= hi:
                raise ConfigError(f"student step {j} (t {ts[j]:.4g}) leaves no diffusion time: unit range "
                                  f"[{lo:.3f}, {hi:.3f}) is empty; raise objective.t_hi, lower objective.t_lo or "
                                  "pass objective.t_within_step=false")
        lo, hi = torch.tensor(lo_of, dtype=torch.float64)[i], torch.tensor(hi_of, dtype=torch.float64)[i]
        u = lo + (hi - lo) * torch.rand(i.shape[0], dtype=torch.float64)
        return schedule.t_from_unit(u).to(device=like.device, dtype=like.dtype)

    def trajectory_point(self, nets: Nets, batch: Batch) -> TrajectoryPoint:
        """The student's deterministic trajectory without gradient up to a step i drawn per row (demo:1141-1145), then
        x0_i = G(x_{t_i}, t_i) with gradient and its TDM point."""
        g, noise = nets.generator, batch.noise
        t_all = self.student.ts.to(device=noise.device, dtype=noise.dtype)
        k = len(t_all)
        i = torch.randint(0, k, (noise.shape[0],))
        states = [noise * g.schedule.prior_std(t_all[0])]  # x_{t_0}, ..., x_{t_max(i)}
        if int(i.max()) > 0:  # (the sampler's own last x0 jump is not read)
            states = []
            sample(g, noise, self.student.ts[:int(i.max()) + 1], batch.cond, method="ddim",
                   callback=lambda j, x, x0: states.append(x))
        rows = torch.arange(noise.shape[0])
        x_ti = torch.stack(states)[i.to(noise.device), rows.to(noise.device)]
        i = i.to(noise.device)
        t_i = t_all[i]
        x0 = g.x0(x_ti, t_i, batch.cond)
        s = t_all[(i + 1).clamp_max(k - 1)]
        t = self.draw_t(g.schedule, i.cpu(), x0)
        p = diffuse_step(g.schedule, x_ti, x0, t_i, s, i == k - 1, t, torch.randn_like(x0))
        p.step = i
        return p

    def critic_loss(self, nets: Nets, batch: Batch, step: int):
        with torch.no_grad():
            p = self.trajectory_point(nets, batch)
        loss = fake_score_loss(nets.critic, p, batch.cond, self.cfg.snr_clamp)
        return {"loss": loss, "fake_score": loss}

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        p = self.trajectory_point(nets, batch)
        grad, logs = tdm_direction(nets.teacher, nets.critic, p, batch.cond)
        loss = surrogate_loss(p.x0, grad)
        return {"loss": loss, "dm": loss, **logs}
