"""Flow map distillation without data (Tong, Ma, Xie & Jaakkola 2025, "Flow Map Distillation Without Data", arXiv
2511.19428; the authors' name for it: FreeFlow). Written from the paper's stated method (project page
data-free-flow-distill.github.io and abstract): the flow map is learned from prior samples alone, by a *prediction*
objective that aligns the map's generating velocity with the teacher's velocity at the map's own output, and a
*correction* objective that aligns the marginal noising distribution of the map's samples with the teacher's. The
equations below are this file's derivation of those two statements; the official code was not available to check
them against.

Notation: the teacher's probability-flow ODE dx/dtau = v(x, tau) in the schedule's own time, T = t_max, z ~ prior at T
(``batch.noise`` scaled to the prior's std; no data is read). The flow map from the prior to time r <= T is
    X_theta(z, r) = z - (T - r) u_theta(z, r, T)
with u_theta meanflow.py's average velocity (the generator's x0 at (z, T) plus the interval head, zero at r = 0), so
X_theta(z, 0) = G.x0(z, T) is the one-step generator and sampling, evaluation and export run it unchanged.

Prediction (Lagrangian condition along the teacher's trajectory from z): the true map satisfies d/dr X(z, r) =
v(X(z, r), r); with X = z - (T - r) u this is u = v(X, r) + (T - r) du/dr, regressed as
    L_pred = || u_theta(z, r, T) - sg( v(X_theta(z, r), r) + (T - r) d_r u_theta(z, r, T) ) ||^2          (mean)
d_r u by a JVP along (0, 1, 0) in (z, r, t): only the time derivative, z being a prior sample the map starts from. The
teacher is queried at the student's own state X_theta(z, r): the student follows the teacher's velocity field from where
its own map has put it, so its errors feed back into its targets (the paper's "compounding errors").

Correction (marginal noising distributions): the one-step samples x^ = X_theta(z, 0), noised to t, should have the
teacher's marginal at t; the direction between the teacher's and a fake score (a critic fitted to the noised samples by
DSM, as DMD's) is DMD eq. (7)-(8) in x0 form, distribution_matching.py:
    grad = (mu_fake(x_t) - mu_real(x_t)) / mean|x^ - mu_real(x_t)|,   L_corr = 0.5 || x^ - sg(x^ - grad) ||^2
and L = L_pred + correction_weight L_corr. r: u ~ U[0, 1) through the schedule, with a ``one_step_ratio`` share at u = 0
(r = t_min, where the schedule ends: the map that is evaluated). Time is the schedule's own; the paper's frame is
rectified flow (``teacher.schedule=rectified_flow``). The JVP runs in float32 or wider with autocast off, as
meanflow.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onestep.core import dsm_loss, dsm_t
from onestep.denoisers.attention import jvp_attention
from onestep.errors import ConfigError
from onestep.objectives.base import (Batch, CriticWeighting, Nets, Objective, ObjectiveConfig, TimeRange,
                                     check_critic_t_dist, check_t_range, register_objective)
from onestep.objectives.distribution_matching import dmd_gradient, surrogate_loss
from onestep.objectives.meanflow import IntervalHead, average_velocity
from onestep.schedules import bcast


@dataclass
class FlowMapConfig(ObjectiveConfig, TimeRange, CriticWeighting):
    name: str = "flow_map"
    #: share of the batch whose prediction term is at r = t_min (the one-step map); the rest draw r ~ U[0, 1) in the
    #: schedule's unit coordinate
    one_step_ratio: float = 0.25
    #: weight of the correction term (DMD's direction on the noised one-step samples); 0 = prediction alone
    correction_weight: float = 1.0
    #: the interval head H: hidden width and Fourier embedding of r / T (meanflow.py's IntervalHead)
    head_hidden: int = 128
    head_time_dim: int = 32


def flow_map(u: torch.Tensor, z: torch.Tensor, r: torch.Tensor, big_t: torch.Tensor) -> torch.Tensor:
    """X(z, r) = z - (T - r) u."""
    return z - bcast(big_t - r, z) * u


def prediction_target(u_fn, teacher, z: torch.Tensor, r: torch.Tensor, big_t: torch.Tensor,
                      cond=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u_tgt, u, X) without gradient: u_tgt = v(X, r) + (T - r) d_r u, X = z - (T - r) u, the JVP of u_fn(z, r, T)
    along (0, 1, 0)."""
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False), jvp_attention():
        tangent = (torch.zeros_like(z), torch.ones_like(r), torch.zeros_like(big_t))
        u, dudr = torch.func.jvp(u_fn, (z, r, big_t), tangent)
        x = flow_map(u, z, r, big_t)
        v = teacher.flow(x, r, cond).to(u.dtype)
    return v + bcast(big_t - r, u) * dudr, u, x


@register_objective
class FlowMap(Objective):
    name = "flow_map"
    Config = FlowMapConfig
    networks = ("generator", "critic")
    jvp_networks = ("generator",)  # prediction_target's torch.func.jvp through the generator (trainer.compile: eager)

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        check_t_range(cfg)
        check_critic_t_dist(cfg)
        if not 0 <= cfg.one_step_ratio <= 1 or cfg.correction_weight < 0:
            raise ConfigError(f"objective.one_step_ratio={cfg.one_step_ratio}, correction_weight="
                              f"{cfg.correction_weight} must satisfy 0 <= one_step_ratio <= 1, correction_weight >= 0")

    @classmethod
    def shape_generator(cls, gc, net):
        if gc.sigma_init is not None:
            raise ConfigError(f"generator.sigma_init={gc.sigma_init}: objective=flow_map learns the map from the prior at "
                              "the schedule's t_max, where the student must start; pass generator.sigma_init=null")
        return net

    def build_modules(self, setup):
        net = setup.generator_start  # the head reads the generator's features (generator.arch may resize them)
        if not hasattr(net, "features") or not hasattr(net, "feature_dim"):
            raise ConfigError(f"objective=flow_map reads the generator's features(x_t, t, cond) for its interval head; "
                              f"{type(net).__name__} has none")
        c = self.cfg
        head = IntervalHead(net.feature_dim, net.data_shape, c.head_hidden, c.head_time_dim)
        return {"interval": (head, "generator")}

    def sample_r(self, schedule, n: int, like: torch.Tensor) -> torch.Tensor:
        """r ~ U[0, 1) through the schedule, a one_step_ratio share set to its lowest time t_min (the teacher's
        velocity is read at r, and the schedule ends there: X(z, t_min) is the one-step sample up to (t_min / T) H)."""
        u = torch.rand(2 * n, dtype=torch.float64).view(2, n)  # (row draw, bucket draw): one block per rank's rows
        r = torch.where(u[1] < self.cfg.one_step_ratio, torch.zeros(n, dtype=torch.float64), u[0])
        r = schedule.t_from_unit(r)
        return r.to(like)

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        c, g = self.cfg, nets.generator
        head, sched, cond = nets.modules.get("interval"), g.schedule, batch.cond
        wdtype = torch.promote_types(batch.noise.dtype, torch.float32)
        big_t = torch.full((batch.noise.shape[0],), float(sched.t_max), dtype=wdtype, device=batch.noise.device)
        z = batch.noise.to(wdtype) * sched.prior_std(big_t[:1]).to(wdtype)
        r = self.sample_r(sched, z.shape[0], big_t)
        u_fn = lambda zz, rr, tt: average_velocity(g, head, zz, rr, tt, cond).to(wdtype)  # noqa: E731
        u_tgt, _, _ = prediction_target(u_fn, nets.teacher, z, r, big_t, cond)
        pred = (u_fn(z, r, big_t) - u_tgt).pow(2).flatten(1).mean(1).mean()
        out = {"prediction": pred.detach()}
        loss = pred
        if c.correction_weight > 0:
            x_hat = g.x0(z, big_t, cond)  # X_theta(z, 0)
            grad, logs = dmd_gradient(nets.teacher, nets.critic, x_hat, cond, lo=c.t_lo, hi=c.t_hi)
            corr = surrogate_loss(x_hat, grad)
            loss = loss + c.correction_weight * corr
            out.update(correction=corr.detach(), **logs)
        return {"loss": loss, **out}

    def critic_loss(self, nets: Nets, batch: Batch, step: int):
        """DSM of the fake score on the (detached) one-step samples (DMD eq. (6))."""
        c = self.cfg
        with torch.no_grad():
            x = self.generate(nets, batch)
        t = None if (c.critic_t_dist, c.critic_t_lo, c.critic_t_hi) == ("unit", 0.0, 1.0) else \
            dsm_t(nets.critic.schedule, x.shape[0], c.critic_t_dist, like=x, lo=c.critic_t_lo, hi=c.critic_t_hi)
        loss = dsm_loss(nets.critic, x, batch.cond, weighting=c.critic_weighting, t=t)
        return {"loss": loss, "dsm": loss}
