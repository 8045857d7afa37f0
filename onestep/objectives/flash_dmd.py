"""Flash-DMD (Chen, Huang, Liu, Zhu, Qu, Chen, Cheng & Sun 2025, "Flash-DMD: Towards High-Fidelity Few-Step Image
Generation with Efficient Distillation and Joint Reinforcement Learning", arXiv 2511.20549; no official code was
released when this was written: the paper says "codes are coming soon").

Stage 1, timestep-aware distillation. DMD2 adds the distribution matching gradient and the adversarial gradient at
every noise level, and the paper traces DMD2's cost to the conflict between the two; Flash-DMD gives each term its own
noise levels: the DM loss at high noise (global structure), the GAN loss at low noise (realism, fine texture):

    L_G = L_DM(t ~ [t_lo, t_hi])  +  lambda_GAN L_AdvGen(t ~ [gan_t_lo, gan_t_hi]),   gan_t_hi <= t_lo

with DMD2's pieces as they are (distribution_matching.py's DMD gradient against the critic, adversarial.py's head on
the critic's features, the critic's DSM + L_D update with TTUR): the split is the two ranges, ``t_lo`` = ``gan_t_hi``
= 0.5 by default, and the objective refuses overlapping ones. The paper's discriminator is a SAM-feature pixel-space
GAN; here it is DMD2's head (objective.gan_head), which reads the critic's features of the noised latents.

Stage 2, joint RL. From generator step ``rl_start`` on, the reward term joins the distillation loss, which keeps
training and regularizes it against reward hacking:

    L = L_G  -  lambda_RL E_{z, c} [ r(G_theta(z, c), c) ]

with r the ``reward=`` reward of the decoded sample and its prompt (rewarded.SampleReward), back-propagated through the
decoder into the generator (the reward is differentiable). The paper's reward is a latent reward model trained on
preference data; any ``reward=`` reward (digits_class offline, clip / imagereward / hpsv2 from local weights, or
``reward.name=<module>:<factory>``) takes its place.
"""

from __future__ import annotations

from dataclasses import dataclass

from onestep.errors import ConfigError
from onestep.objectives.base import Batch, Nets, register_objective
from onestep.objectives.dmd2 import DistributionMatching, DMD2Config
from onestep.objectives.rewarded import SampleReward


@dataclass
class FlashDMDConfig(DMD2Config):
    name: str = "flash_dmd"
    #: the DM loss's noise levels: high noise only (the split: t_lo >= gan_t_hi)
    t_lo: float = 0.5
    #: the GAN loss's noise levels: low noise only, up to the split
    gan_t_hi: float = 0.5
    #: lambda_RL, the weight of -E[r(G(z, c), c)] in stage 2 (0 = stage 1 only: no reward= needed)
    rl_weight: float = 0.0
    #: the generator step stage 2 (joint RL) starts at; the distillation loss continues throughout
    rl_start: int = 0


@register_objective
class FlashDMD(DistributionMatching):
    name = "flash_dmd"
    Config = FlashDMDConfig

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if self.gan.active and cfg.gan_t_hi > cfg.t_lo:
            raise ConfigError(f"objective.gan_t_hi={cfg.gan_t_hi} > objective.t_lo={cfg.t_lo}: Flash-DMD gives the GAN "
                              "the low noise levels and the DM loss the high ones; pass gan_t_hi <= t_lo (e.g. both 0.5)")
        if cfg.rl_weight < 0 or cfg.rl_start < 0:
            raise ConfigError(f"objective.rl_weight={cfg.rl_weight}, objective.rl_start={cfg.rl_start} must be >= 0")
        self.reward = SampleReward(self.name)

    def build_modules(self, setup):
        if self.cfg.rl_weight > 0:
            self.reward.bind(setup)
        return super().build_modules(setup)

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        x = self.generate(nets, batch)
        out = self.matching_loss(nets, batch, x)
        if self.cfg.rl_weight > 0 and step >= self.cfg.rl_start:
            r = self.reward(x, batch.cond)
            out["loss"] = out["loss"] - self.cfg.rl_weight * r.mean()
            out["reward"] = r.mean().detach()
        return out
