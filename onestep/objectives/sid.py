"""SiD, SiDA and SiD-LSG: score identity distillation (Zhou et al. 2024a, ICML), its adversarial variant
(Zhou et al. 2024c, "Adversarial Score identity Distillation") and long-and-short guidance (Zhou et al.
2024b, "Long and Short Guidance in Score identity Distillation").

Generator loss (SiD Sec. 4, the final alpha-weighted loss of Algorithm 1), x_g = G(z), x_t = a_t x_g + s_t eps,
f_phi = teacher's x0, f_psi = critic's x0, with gradients through x_t in *both* denoisers and through x_g
(the critic's parameters are held fixed):
    L_theta = [ (1 - alpha) ||f_phi(x_t) - f_psi(x_t)||^2 + (f_phi(x_t) - f_psi(x_t))^T (f_psi(x_t) - x_g) ] / w,
    w = sg(mean |x_g - f_phi(x_t)|)   (the per-sample normalizer of the official code, as DMD eq. (8)),
mean over elements. Critic: DSM on detached generator samples (critic.py). ``generator.sigma_init`` sets
the noise level the one-step generator starts from (SiD's sigma_init, 2.5 on EDM).
Scale: the official loss is the per-element loss summed over elements and the batch times loss_scaling_G / batch
(mingyuanzhou/SiD training/sid_training_loop.py:332, loss_scaling_G = 100 at :134; SiD-LSG: 1), i.e. 100 D times
the mean here: a constant factor, which Adam's update does not see (up to its eps); the mean is kept.
Noise level (``t_dist``): official SiD on EDM draws sigma on the Karras ramp at u ~ U[0, tmax / 1000), tmax = 800,
so sigma <= 24.4 (training/sid_loss.py:27-33): t_dist=karras, t_lo=0, t_hi=0.8; SiD-LSG on SD tables draws integer
timesteps in [20, 980) (mingyuanzhou/SiD-LSG training/sid_training_loop.py:172-173, :484): t_dist=grid, t_lo=0.02,
t_hi=0.979. The default (unit, 0.02..0.98) reaches sigma ~65 on EDM.

SiD-LSG: separate CFG scales, applied to the unguided teacher and to the critic:
    real_guidance    teacher in the generator loss (None = teacher.guidance, as the trainer applies it)
    fake_guidance    critic in the generator loss
    critic_guidance  critic while it is trained by DSM (its guided output is what regresses on x0)
Scale 1 is the plain conditional model, 0 the unconditional one ("zero guidance"), < 1 anti-guidance. The
critic's unconditional branch is trained by dropping labels with ``critic_label_dropout``.
PG-SB (SNOOPI, snoopi.py): ``guidance_range=[w_min, w_max]`` draws the real score's scale per sample instead.
SiDA (sida.py): the same loss plus lambda * L_G of a discriminator on the critic's features; its L_D joins the
critic update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from onestep.denoisers.base import Denoiser, guided
from onestep.errors import ConfigError
from onestep.objectives.adversarial import GANConfig
from onestep.objectives.base import (Batch, CriticWeighting, Nets, ObjectiveConfig, TimeDraw, check_t_dist,
                                     check_t_range, frozen, register_objective)
from onestep.objectives.critic import CriticObjective
from onestep.objectives.distribution_matching import dmd_normalizer
from onestep.objectives.snoopi import RandomGuidance, RandomGuidanceConfig
from onestep.core import noised, sample_t

#: the range of alpha SiD studies; beyond 1.5 the negative (1 - alpha) ||delta||^2 term dominates and diverges
ALPHA_RANGE = (0.0, 1.5)


def sid_terms(teacher: Denoiser, critic: Denoiser, x: torch.Tensor, cond, t, eps=None, *, alpha: float = 1.2):
    """SiD's per-sample term (mean over elements, differentiable w.r.t. x through both denoisers), its normalizer w
    (B,), no grad, and x_t (with grad): what SiDA's official balance reuses."""
    x_t, _ = noised(teacher.schedule, x, t, eps)
    with frozen(critic):
        f_phi, f_psi = teacher.x0(x_t, t, cond), critic.x0(x_t, t, cond)
    delta = f_phi - f_psi
    per = (delta * ((f_phi - x) - alpha * delta)).flatten(1).mean(1)  # = (1-alpha)|d|^2 + d.(f_psi - x)
    logs = {"sid_gap": delta.detach().flatten(1).norm(dim=1).mean()}
    return per, dmd_normalizer(x, f_phi.detach()).flatten(), x_t, logs


def sid_loss(teacher: Denoiser, critic: Denoiser, x: torch.Tensor, cond=None, *, alpha: float = 1.2,
             lo: float = 0.02, hi: float = 0.98, t=None, eps=None) -> tuple[torch.Tensor, dict]:
    """SiD's generator loss at generator samples x (differentiable w.r.t. x through both denoisers)."""
    t = sample_t(teacher.schedule, x.shape[0], lo, hi, like=x) if t is None else t
    per, w, _, logs = sid_terms(teacher, critic, x, cond, t, eps, alpha=alpha)
    return (per / w).mean(), logs


@dataclass
class SiDConfig(ObjectiveConfig, GANConfig, RandomGuidanceConfig, TimeDraw, CriticWeighting):
    name: str = "sid"
    ttur: int = 1
    #: SiD's alpha, in [0, 1.5]; 1.2 is the paper's default
    alpha: float = 1.2
    #: how the loss's noise level is drawn in [t_lo, t_hi]: unit | grid | karras (onestep.core.sample_t); SiD's
    #: official EDM draw is karras with t_lo=0, t_hi=0.8 (tmax 800: sigma <= 24.4; mingyuanzhou/SiD
    #: training/sid_loss.py:32-33), SiD-LSG's on SD tables grid with t_lo=0.02, t_hi=0.979
    t_dist: str = "unit"
    #: SiD-LSG guidance scales (see the module docstring); None = teacher.guidance
    real_guidance: Optional[float] = None
    fake_guidance: float = 1.0
    critic_guidance: float = 1.0
    #: label dropout of the critic's DSM (trains its unconditional branch) when fake/critic guidance != 1
    critic_label_dropout: float = 0.1


@register_objective
class SiD(CriticObjective):
    name = "sid"
    Config = SiDConfig

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        lo, hi = ALPHA_RANGE
        if not lo <= cfg.alpha <= hi:
            raise ConfigError(f"objective.alpha={cfg.alpha} is outside SiD's valid range [{lo}, {hi}]; "
                              "use the paper's 1.2 (or 1.0)")
        check_t_range(cfg)
        check_t_dist(cfg)
        if not 0 <= cfg.critic_label_dropout < 1:
            raise ConfigError(f"objective.critic_label_dropout={cfg.critic_label_dropout} must be in [0, 1)")
        self.pgsb = RandomGuidance(cfg)
        if self.pgsb.active and cfg.real_guidance is not None:
            raise ConfigError("objective.real_guidance and objective.guidance_range (PG-SB) both set the real score's "
                              "scale; unset one (objective.real_guidance=null)")

    def real_model(self, nets: Nets) -> Denoiser:
        if self.cfg.real_guidance is None:
            return nets.teacher
        return guided(nets.teacher.unguided(), self.cfg.real_guidance)

    def critic_model(self, nets: Nets) -> Denoiser:
        return guided(nets.critic, self.cfg.critic_guidance)

    def critic_cond(self, nets: Nets, batch: Batch):
        plain = self.cfg.fake_guidance == 1 and self.cfg.critic_guidance == 1  # no unconditional critic needed
        if batch.cond is None or plain:
            return batch.cond
        return batch.cond.drop(self.cfg.critic_label_dropout)

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        x = self.generate(nets, batch)
        fake = guided(nets.critic, self.cfg.fake_guidance)
        t = sample_t(nets.teacher.schedule, x.shape[0], self.cfg.t_lo, self.cfg.t_hi, like=x, dist=self.cfg.t_dist)
        real, w = self.pgsb.draw(self.real_model(nets), x)
        loss, logs = sid_loss(real, fake, x, batch.cond, alpha=self.cfg.alpha, t=t)
        return self.with_gan(loss, {"sid": loss.detach(), **logs, **self.pgsb.logs(w)}, nets, x, batch.cond)
