"""VSD / SwiftBrush: variational score distillation (Wang et al. 2023, ProlificDreamer; Nguyen & Tran 2024,
SwiftBrush) with a critic trained on generator samples.

ProlificDreamer eq. (9): grad_theta = E_{t, eps} [ w(t) (eps_real(x_t, t) - eps_fake(x_t, t)) dx/dtheta ],
x_t = alpha_t x + sigma_t eps. In x0 form eps_real - eps_fake = (alpha_t / sigma_t) (mu_fake - mu_real), so
  weighting "x0":     w(t) = sigma_t / alpha_t  ->  grad = mu_fake - mu_real (no per-sample normalizer: that is DMD)
  weighting "eps":    w(t) = 1                 ->  grad = (alpha_t / sigma_t) (mu_fake - mu_real)
  weighting "sigma2": w(t) = sigma_t^2 in VP terms (1 - alphabar_t, core.vp_frame)
                                               ->  grad = alpha_t sigma_t (mu_fake - mu_real)   (VP alpha, sigma)
applied through the surrogate 0.5 ||x - sg(x - grad)||^2. "sigma2" is the official code's: SwiftBrush
train_swiftbrush.py:781-786 (score_gradient = (1 - alphabar_t) (eps_teacher - eps_lora), 0.5 MSE), as
ProlificDreamer's; on EDM / flow schedules it is the VP schedule's sigma_t^2 at the same SNR, sig / (1 + sig^2) times
the x0 difference (sig = sigma / alpha): "x0" is heavier by 1 / (alpha_t sigma_t), "eps" by 1 / sigma_t^2.
CFG: the teacher carries teacher.guidance; SwiftBrush guides its LoRA critic with the same scale in the generator
gradient (:770-778): ``fake_guidance`` (1 = unguided critic, None = the teacher's scale).
Critic (SwiftBrush's LoRA teacher copy, or a full copy): DSM on detached generator samples, ``ttur`` updates per
generator step; SwiftBrush's is alpha_t^2-weighted eps-MSE (``critic_weighting=alpha2_eps``) on integer timesteps
0..999 (``critic_t_dist=grid``, t_lo 0, t_hi 1 of the critic's draw) with 10% null prompts (``critic_label_dropout``;
train_swiftbrush.py:803-822, which drops the whole batch's prompts with probability 0.1, here each row's).
PG-SB (SNOOPI, snoopi.py): ``guidance_range=[w_min, w_max]`` draws the real score's CFG scale per sample; a critic
guided with the teacher's scale (fake_guidance=None) takes the same per-sample scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from onestep.core import sample_t, vp_frame
from onestep.denoisers.base import Denoiser, guided
from onestep.errors import ConfigError
from onestep.objectives.adversarial import GANConfig
from onestep.objectives.base import (Batch, CriticWeighting, Nets, ObjectiveConfig, TimeDraw, check_t_dist,
                                     check_t_range, register_objective)
from onestep.objectives.critic import CriticObjective
from onestep.objectives.distribution_matching import denoised_pair, surrogate_loss
from onestep.objectives.snoopi import RandomGuidance, RandomGuidanceConfig
from onestep.schedules import bcast

VSD_WEIGHTINGS = ("x0", "eps", "sigma2")


def vsd_weight(schedule, t: torch.Tensor, weighting: str) -> torch.Tensor | None:
    """The factor on mu_fake - mu_real per sample (None for "x0": 1)."""
    if weighting == "eps":
        return schedule.alpha(t) / schedule.sigma(t)
    if weighting == "sigma2":
        a_vp, s_vp = vp_frame(schedule, t)
        return a_vp * s_vp  # = s_vp^2 * (a_vp / s_vp): sigma_t^2 on the eps difference
    return None


def vsd_gradient(teacher: Denoiser, critic: Denoiser, x, cond=None, *, weighting: str = "x0", lo: float = 0.02,
                 hi: float = 0.98, t=None, eps=None) -> torch.Tensor:
    t, _, mu_real, mu_fake = denoised_pair(teacher, critic, x, cond, lo=lo, hi=hi, t=t, eps=eps)
    grad = mu_fake - mu_real
    w = vsd_weight(teacher.schedule, t, weighting)
    if w is not None:
        grad = bcast(w, grad).to(grad) * grad
    return torch.nan_to_num(grad).to(x.dtype)


@dataclass
class VSDConfig(ObjectiveConfig, GANConfig, RandomGuidanceConfig, TimeDraw, CriticWeighting):
    name: str = "vsd"
    ttur: int = 1
    #: how the gradient's t is drawn in [t_lo, t_hi]: unit | grid | karras (onestep.core.sample_t); SwiftBrush's is
    #: grid, integer timesteps 20..980 of SD's table (VinAIResearch/SwiftBrush train_swiftbrush.py:757-758)
    t_dist: str = "unit"
    #: w(t) of ProlificDreamer eq. (9): x0 (w = sigma/alpha) | eps (w = 1) | sigma2 (w = sigma_t^2 in VP terms, the
    #: official code's: VinAIResearch/SwiftBrush train_swiftbrush.py:781-782)
    weighting: str = "x0"
    #: the critic's CFG scale in the generator gradient: 1 = unguided | None = the teacher's (SwiftBrush
    #: train_swiftbrush.py:770-778 guides the LoRA critic with the teacher's scale)
    fake_guidance: Optional[float] = 1.0
    #: critic's DSM weighting: edm | eps | x0 | v | alpha2_eps (SwiftBrush's alpha_t^2-weighted eps-MSE,
    #: train_swiftbrush.py:817-822)
    critic_weighting: str = "edm"
    #: the critic's DSM t: unit (u ~ U[0, 1] through the schedule) | grid (SwiftBrush: integer timesteps 0..999,
    #: train_swiftbrush.py:806-807) | lognormal (SiD's); see onestep.core.dsm_t
    critic_t_dist: str = "unit"
    #: null-prompt dropout of the critic's DSM (SwiftBrush 0.1, train_swiftbrush.py:814); trains the unconditional
    #: branch a guided critic (fake_guidance != 1) reads
    critic_label_dropout: float = 0.0


@register_objective
class VSD(CriticObjective):
    name = "vsd"
    Config = VSDConfig

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if cfg.weighting not in VSD_WEIGHTINGS:
            raise ConfigError(f"objective.weighting='{cfg.weighting}' is unknown; choose one of {VSD_WEIGHTINGS}")
        check_t_range(cfg)
        check_t_dist(cfg)
        if not 0 <= cfg.critic_label_dropout < 1:
            raise ConfigError(f"objective.critic_label_dropout={cfg.critic_label_dropout} must be in [0, 1)")
        self.pgsb = RandomGuidance(cfg)

    def fake_model(self, nets: Nets, w: torch.Tensor | None = None) -> Denoiser:
        """The critic in the generator gradient; ``w``: PG-SB's per-sample scales of the real score."""
        scale = self.cfg.fake_guidance
        if scale is None:
            scale = w if w is not None else nets.teacher.guidance_scale
        return guided(nets.critic, scale)

    def critic_cond(self, nets: Nets, batch: Batch):
        if batch.cond is None:
            return None
        return batch.cond.drop(self.cfg.critic_label_dropout)

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        x = self.generate(nets, batch)
        t = sample_t(nets.teacher.schedule, x.shape[0], self.cfg.t_lo, self.cfg.t_hi, like=x, dist=self.cfg.t_dist)
        real, w = self.pgsb.draw(nets.teacher, x)
        grad = vsd_gradient(real, self.fake_model(nets, w), x, batch.cond, weighting=self.cfg.weighting, t=t)
        loss = surrogate_loss(x, grad)
        out = {"vsd": loss, "vsd_grad_norm": grad.flatten(1).norm(dim=1).mean(), **self.pgsb.logs(w)}
        return self.with_gan(loss, out, nets, x, batch.cond)
