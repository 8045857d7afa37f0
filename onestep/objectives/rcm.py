"""rCM: score-regularized continuous-time consistency (Zheng et al. 2025, "Large Scale Diffusion Distillation
via Score-Regularized Continuous-Time Consistency").

sCD (scm.py) supplies the "forward-divergence" consistency signal; a DMD-style reverse-divergence regularizer
on the student's own samples fixes its mode-covering blur:
    L_G = L_sCD + lambda * L_DMD(G(z)),    L_DMD as in DMD eq. (7)-(8) (distribution_matching.py)
with a fake-score critic trained by denoising score matching on generator samples (``ttur`` critic updates
per generator step). Multi-step students use backward simulation for the DMD term (generator.py).

The official code (NVlabs/rcm rcm/models/t2v_model_distill_rcm.py) differs from the defaults here in: sigma_d = 1.0
(:92); the tangent warm-up form (:548-552; objective.tangent_warmup=rcm, scm.py); no adaptive weighting; and the
scale of the two terms: 100 x the *sum* over elements of the sCM error (:573-574) + 1 x the sum of the DMD surrogate
(:667-670), one backward for both. Their gradients, per element, are 200 (F - F- - g) and 2 grad; here (adaptive
weighting off) 2 (F - F- - g) / D and dm_weight grad / D, so dm_weight = 2 / 100 = 0.02 is the official ratio (the
default 0.1 weighs DMD 5x more). The official DMD term starts after the tangent warm-up (:709;
``dm_after_warmup``). Not reproduced: the official critic does not train during the warm-up, and the student updates
once per student_update_freq (5) critic updates after it (:294-299); here the trainer runs ``ttur`` critic updates
per generator step throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onestep.errors import ConfigError
from onestep.objectives.base import (Batch, CriticWeighting, Nets, TimeRange, check_critic_t_dist, check_t_range,
                                     register_objective)
from onestep.objectives.distribution_matching import dmd_loss
from onestep.objectives.scm import SCD, SCMConfig
from onestep.core import dsm_loss, dsm_t


@dataclass
class RCMConfig(SCMConfig, TimeRange, CriticWeighting):
    name: str = "rcm"
    #: lambda, the weight of the DMD regularizer; 0.02 is the official code's ratio to the sCM term (100 x sum vs 1 x
    #: sum; with adaptive_weighting=false), NVlabs/rcm rcm/models/t2v_model_distill_rcm.py:573-574, :667-670
    dm_weight: float = 0.1
    #: the DMD term joins once step >= warmup_steps, after the tangent warm-up, as the official code's emit_dmd
    #: (NVlabs/rcm rcm/models/t2v_model_distill_rcm.py:709) | false: from step 0
    dm_after_warmup: bool = False
    # t_lo / t_hi (TimeRange): the DMD gradient's t ~ U[t_lo, t_hi]


@register_objective
class RCM(SCD):
    name = "rcm"
    Config = RCMConfig
    networks = ("generator", "critic")

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if cfg.dm_weight < 0:
            raise ConfigError(f"objective.dm_weight={cfg.dm_weight} must be >= 0 (0 = plain sCD)")
        if cfg.discriminator != "none" or cfg.gan_weight > 0:
            raise ConfigError("objective=rcm regularizes with DMD, not a GAN head; set objective.discriminator=none "
                              "(for sCD + LADD use objective=scd objective.discriminator=teacher)")
        check_t_range(cfg)
        check_critic_t_dist(cfg)

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        out = self.scm_loss(nets, batch, step)
        if self.cfg.dm_after_warmup and step < self.cfg.warmup_steps:
            return out
        dm, logs = dmd_loss(nets.teacher, nets.critic, self.generate(nets, batch), batch.cond,
                            lo=self.cfg.t_lo, hi=self.cfg.t_hi)
        out |= {"dm": dm.detach(), **logs, "loss": out["loss"] + self.cfg.dm_weight * dm}
        return out

    def critic_loss(self, nets: Nets, batch: Batch, step: int):
        with torch.no_grad():
            x = self.generate(nets, batch)
        c = self.cfg
        t = dsm_t(nets.critic.schedule, x.shape[0], c.critic_t_dist, like=x, lo=c.critic_t_lo, hi=c.critic_t_hi)
        return {"loss": dsm_loss(nets.critic, x, batch.cond, weighting=self.cfg.critic_weighting, t=t)}
