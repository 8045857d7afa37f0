"""APEX: self-adversarial one-step generation by condition shifting (Liu et al. 2026, "Self-Adversarial One Step
Generation via Condition Shifting", arXiv 2604.12322; official code LINs-lab/APEX src/methodes/apex/apex.py, cited
below as "apex.py:<line>" at the mirrored commit 9209bf5).

One network, no critic and no discriminator. The flow model G answers two conditions: its own and a *shifted* one
(the fake branch: the official code feeds the transformer the negated time -t, apex.py:164, :287). The shifted branch
is trained by flow matching on G's own one-step samples, so its velocity estimates the velocity field of the
generator's current distribution (apex.py:164-178: the "adv" rows, x_fake = G(z) detached, target z - x_fake). Its
difference from the real velocity is the adversarial correction of the one-step output (apex.py:278-293, :359-365;
the paper's GAN-aligned gradient):
    F_grad = clamp(v_shift(x_t, t) - v_real(x_t, t), -clamp, clamp),   x_t = alpha_t sg(x) + sigma_t eps,
    L_dm = rho(F, sg(F - F_grad))  on the one-step velocity F,
and since the one-step sample is x = z - F at t = 1 (apex.py:381-384), the same gradient reaches G through
    L_dm = rho(x, sg(x + F_grad))
(x moves along v_shift - v_real = (mu_real - mu_fake) / t on rectified flow: DMD's direction, the fake score being G's
own shifted branch). v is the project's "flow" prediction (param.py: d x_t / dt on the schedule's own time), which is
the official velocity z - x on ``schedule=rectified_flow``.
Loss: L = L_fake + dm_weight * L_dm (+ real_weight * L_real with real_score=self), where
    L_fake = rho(v_shift(x_t, t), flow target of (sg(x), eps))            the shifted branch learns the fake flow
    L_real = rho(v(x_t, t), sg(v_teacher(x_t, t)))                        the unshifted branch stays the teacher's
rho: the official Barron-reweighted L2 (apex.py:90-104): per row mse, weight sg((mse / c^2 / |a - 2| + 1)^((a - 2) / 2)),
rho = mse * weight / c (a = 1: about sqrt(mse), each row's step normalised like DMD's), or plain per-row mse (l2).
The real velocity (``real_score``): the official reads the trained model's own unshifted branch and keeps it a flow
model by flow matching on real data (its "mul" rows, target z - x enhanced by CFG of a reference model,
apex.py:315-325). ``real_score=self`` is that, the data term replaced by L_real (regression onto the frozen teacher at
the same x_t: data-free, like the other objectives of this project); the default ``teacher`` reads the frozen
teacher's velocity directly, so the unshifted branch is only the one-step generator and only the fake score is
self-estimated (on the 2-D ring ``self`` collapsed to one mode: the regression near t_max pulls the one-step output
to the teacher's blurred mean). Each term reads every row (the official splits a batch into four row groups,
apex.py:132-145). Not covered: the official RCGM consistency rows (estimate_order >= 1, apex.py:236-259, :327-340),
its CFG-enhanced targets and its any-step sampler.

The shifted condition is an input of the network (denoisers/base.py ``with_shift``; ``add_shift_input`` of the MLP,
nets.py, and of the class-conditional UNet, diffusers.py: a learned vector added to the time embedding, zero at the
start), since this project's networks take t through the schedule's preconditioning and have no negative time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from onestep import param
from onestep.core import noised, sample_t
from onestep.denoisers.base import with_shift
from onestep.errors import ConfigError
from onestep.objectives.base import (Batch, Nets, Objective, ObjectiveConfig, TimeRange, check_t_range,
                                     register_objective)

LOSSES = ("barron", "l2")
REAL_SCORES = ("teacher", "self")
#: the official Barron loss's guard on c^2 (apex.py:96)
BARRON_EPS = 1e-8


@dataclass
class APEXConfig(ObjectiveConfig, TimeRange):
    name: str = "apex"
    #: the noise level of all three terms, u ~ U[t_lo, t_hi] through the schedule (the official t ~ Beta(1, 1) on
    #: [0, 1], apex.py:285)
    t_lo: float = 0.02
    t_hi: float = 0.98
    #: weight of the distribution-matching term L_dm (the official dist_match_cof 0.5, configs/sd_task/*.yaml)
    dm_weight: float = 0.5
    #: the real velocity of F_grad: teacher (the frozen teacher; the generator's unshifted branch is then only the
    #: one-step generator) | self (the official: the generator's own unshifted branch, kept the teacher's by L_real;
    #: on the ring it collapsed to one mode, see configs/experiment/gmm_apex.yaml)
    real_score: str = "teacher"
    #: real_score=self: weight of the real branch's regression onto the teacher L_real (this project's data-free
    #: stand-in for the official's flow matching on data)
    real_weight: float = 1.0
    #: |F_grad| bound, elementwise (apex.py:292)
    clamp: float = 1.0
    #: rho: barron (the official Barron-reweighted L2, apex.py:90-104) | l2 (per-row mse)
    loss: str = "barron"
    #: Barron's alpha and c (the official configs' alpha 1.0 and default c 1e-3)
    barron_alpha: float = 1.0
    barron_c: float = 1e-3


def barron(pred: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, c: float = 1e-3) -> torch.Tensor:
    """apex.py:90-104 per row (N,): mse * sg(weight) / c, weight = (mse / c^2 / |alpha - 2| + 1)^((alpha - 2) / 2)."""
    mse = (pred - target).pow(2).flatten(1).mean(1)
    if abs(alpha - 2.0) < 1e-5:
        return mse / c
    weight = (mse.detach() / (c**2 + BARRON_EPS) / abs(alpha - 2.0) + 1.0).pow((alpha - 2.0) / 2.0)
    return mse * weight / c


def shifted_direction(net, x_t: torch.Tensor, t: torch.Tensor, cond=None, clamp: float = 1.0,
                      real=None) -> torch.Tensor:
    """F_grad = clamp(v_shift(x_t, t) - v_real(x_t, t), -clamp, clamp) (apex.py:287-292), in fp32 or wider, no grad;
    v_real is ``net``'s own unshifted branch (the official) or ``real``'s velocity (a frozen teacher)."""
    wdtype = torch.promote_types(x_t.dtype, torch.float32)
    with torch.no_grad():
        fake = net.flow(x_t, t, with_shift(cond, x_t.shape[0], x_t.device)).to(wdtype)
        real = (net if real is None else real).flow(x_t, t, cond).to(wdtype)
    return (fake - real).clamp(-clamp, clamp)


@register_objective
class APEX(Objective):
    name = "apex"
    Config = APEXConfig
    networks = ("generator",)

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        check_t_range(cfg)
        if cfg.real_score not in REAL_SCORES:
            raise ConfigError(f"objective.real_score='{cfg.real_score}' is unknown; choose one of {REAL_SCORES}")
        if cfg.loss not in LOSSES:
            raise ConfigError(f"objective.loss='{cfg.loss}' is unknown; choose one of {LOSSES}")
        for key in ("dm_weight", "real_weight", "clamp", "barron_c"):
            if getattr(cfg, key) <= 0:
                raise ConfigError(f"objective.{key}={getattr(cfg, key)} must be > 0; pass e.g. "
                                  f"objective.{key}={getattr(APEXConfig, key)}")

    @classmethod
    def shape_generator(cls, gc, net):
        if not hasattr(net, "add_shift_input") or gc.lora.rank is not None:
            raise ConfigError(f"objective=apex reads the generator's shifted-condition branch, an input "
                              f"{type(net).__name__}{' with generator.lora' if gc.lora.rank is not None else ''} "
                              "cannot take (the project's MLP and class-conditional UNet have one: add_shift_input in "
                              "denoisers/nets.py, denoisers/diffusers.py); use teacher=gmm_ring, gmm_classes or "
                              "digits without generator.lora")
        net = copy.deepcopy(net)  # (the init may be the teacher itself)
        net.add_shift_input()
        return net

    def rho(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        wdtype = torch.promote_types(pred.dtype, torch.float32)
        pred, target = pred.to(wdtype), target.to(wdtype)
        if self.cfg.loss == "l2":
            return (pred - target).pow(2).flatten(1).mean(1)
        return barron(pred, target, self.cfg.barron_alpha, self.cfg.barron_c)

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        g, sched = nets.generator, nets.generator.schedule
        x = self.generate(nets, batch)
        t = sample_t(sched, x.shape[0], self.cfg.t_lo, self.cfg.t_hi, like=x)
        x_t, eps = noised(sched, x.detach(), t)
        real_net = g if self.cfg.real_score == "self" else nets.teacher
        grad = shifted_direction(g, x_t, t, batch.cond, self.cfg.clamp, real=real_net)
        dm = self.rho(x, (x.detach() + grad.to(x)).detach()).mean()  # apex.py:359-365, through x = z - F
        fake_target = param.from_x0_eps(x.detach(), eps, "flow", t, sched)
        fake = self.rho(g.flow(x_t, t, with_shift(batch.cond, x.shape[0], x.device)), fake_target).mean()
        loss = fake + self.cfg.dm_weight * dm
        logs = {"dm": dm, "fake_flow": fake, "shift_grad_norm": grad.flatten(1).norm(dim=1).mean()}
        if self.cfg.real_score == "self":
            with torch.no_grad():
                teacher = nets.teacher.flow(x_t, t, batch.cond)
            logs["real_flow"] = real = self.rho(g.flow(x_t, t, batch.cond), teacher).mean()
            loss = loss + self.cfg.real_weight * real
        return {"loss": loss, **logs}
