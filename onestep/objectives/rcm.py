"""rCM: score-regularized continuous-time consistency (Zheng et al. 2025, "Large Scale Diffusion Distillation
via Score-Regularized Continuous-Time Consistency").

sCD (scm.py) supplies the "forward-divergence" consistency signal; a DMD-style reverse-divergence regularizer
on the student's own samples fixes its mode-covering blur:
    L_G = L_sCD + lambda * L_DMD(G(z)),    L_DMD as in DMD eq. (7)-(8) (distribution_matching.py)
with a fake-score critic trained by denoising score matching on generator samples (``ttur`` critic updates
per generator step). Multi-step students use backward simulation for the DMD term (generator.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onestep.errors import ConfigError
from onestep.objectives.base import Batch, Nets, check_t_range, register_objective
from onestep.objectives.distribution_matching import dmd_loss
from onestep.objectives.scm import SCD, SCMConfig
from onestep.core import dsm_loss


@dataclass
class RCMConfig(SCMConfig):
    name: str = "rcm"
    #: lambda, the weight of the DMD regularizer
    dm_weight: float = 0.1
    #: t ~ U[t_lo, t_hi] (fractions of the teacher schedule's range) for the DMD gradient
    t_lo: float = 0.02
    t_hi: float = 0.98
    critic_weighting: str = "edm"


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

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        out = self.scm_loss(nets, batch, step)
        dm, logs = dmd_loss(nets.teacher, nets.critic, self.generate(nets, batch), batch.cond,
                            lo=self.cfg.t_lo, hi=self.cfg.t_hi)
        out |= {"dm": dm.detach(), **logs, "loss": out["loss"] + self.cfg.dm_weight * dm}
        return out

    def critic_loss(self, nets: Nets, batch: Batch, step: int):
        with torch.no_grad():
            x = self.generate(nets, batch)
        return {"loss": dsm_loss(nets.critic, x, batch.cond, weighting=self.cfg.critic_weighting)}
