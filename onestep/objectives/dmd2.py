"""DMD2 (Yin et al. 2024b, "Improved Distribution Matching Distillation").

Generator: the distribution matching gradient of DMD eq. (7)-(8) (see distribution_matching.py), with the
teacher as real score and the critic as fake score; DMD2 drops DMD's regression loss (Sec. 4.1) and
instead updates the critic ``ttur`` times per generator step (two time-scale update rule, Sec. 4.2), plus
the GAN term on the critic's features (Sec. 4.3, eq. (5)-(6); ``discriminator=critic``, ``gan_weight`` is
lambda, see adversarial.py). Multi-step students train with backward simulation (generator.py).
Critic: denoising score matching on (detached) generator samples, so it tracks the generator's score,
plus ``disc_weight`` times the discriminator loss when the head is on.
Optional: DMD's regression term (eq. 9) on noise -> teacher-ODE-sample pairs, weight ``regression_weight``.
PG-SB (SNOOPI, snoopi.py): ``guidance_range=[w_min, w_max]`` draws the real score's CFG scale per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from onestep.core import sample_t
from onestep.errors import ConfigError
from onestep.objectives.adversarial import GANConfig
from onestep.objectives.base import (Batch, CriticWeighting, Nets, ObjectiveConfig, TimeDraw, check_t_dist,
                                     check_t_range, register_objective)
from onestep.objectives.critic import CriticObjective
from onestep.objectives.distribution_matching import dmd_loss
from onestep.objectives.regression import TeacherPairs
from onestep.objectives.snoopi import RandomGuidance, RandomGuidanceConfig


@dataclass
class DMD2Config(ObjectiveConfig, GANConfig, RandomGuidanceConfig, TimeDraw, CriticWeighting):
    name: str = "dmd2"
    ttur: int = 5
    #: how t is drawn: unit (u ~ U[t_lo, t_hi] through the schedule: log-uniform sigma on EDM, median 0.40) | grid
    #: (DMD2's official draw: integer index uniform in [20, 980] of the 1000-point Karras grid on EDM, median sigma
    #: 2.53, or of SD's timestep table; tianweiy/DMD2 main/edm/edm_guidance.py:82-92, main/sd_guidance.py:179-185)
    #: | karras (continuous on the Karras ramp, SiD's); see onestep.core.sample_t
    t_dist: str = "unit"
    #: DMD eq. (9) regression on teacher pairs: weight, pair count and teacher ODE steps (0 = off)
    regression_weight: float = 0.0
    regression_pairs: int = 2048
    regression_steps: int = 32
    #: safetensors file of the pairs (tools/make_dmd_pairs.py); built and written there at first use if missing
    pairs_file: Optional[str] = None


class DistributionMatching(CriticObjective):
    """DMD gradient + optional regression + optional GAN head; DMD and DMD2 differ in their defaults."""

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        check_t_range(cfg)
        check_t_dist(cfg)
        if cfg.regression_weight < 0:
            raise ConfigError(f"objective.regression_weight={cfg.regression_weight} must be >= 0")
        self.pairs = TeacherPairs(cfg.regression_pairs, cfg.regression_steps, cfg.pairs_file)
        self.pgsb = RandomGuidance(cfg)

    def prepare(self, nets: Nets, weights=None) -> None:
        if self.cfg.regression_weight > 0:
            self.pairs.get(nets.teacher, next(nets.generator.parameters()).device)

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        return self.matching_loss(nets, batch, self.generate(nets, batch))

    def matching_loss(self, nets: Nets, batch: Batch, x):
        """The generator loss dict at generator samples ``x`` (what an objective adding a term to DMD2's reuses)."""
        t = sample_t(nets.teacher.schedule, x.shape[0], self.cfg.t_lo, self.cfg.t_hi, like=x, dist=self.cfg.t_dist)
        real, w = self.pgsb.draw(nets.teacher, x)
        loss, logs = dmd_loss(real, nets.critic, x, batch.cond, t=t)
        out = {"dm": loss, **logs, **self.pgsb.logs(w)}
        if self.cfg.regression_weight > 0:
            reg = self.pairs.loss(nets, batch, self.generate)
            out["regression"] = reg
            loss = loss + self.cfg.regression_weight * reg
        return self.with_gan(loss, out, nets, x, batch.cond)


@register_objective
class DMD2(DistributionMatching):
    name = "dmd2"
    Config = DMD2Config
