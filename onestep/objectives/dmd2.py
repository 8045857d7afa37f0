"""DMD2 (Yin et al. 2024b, "Improved Distribution Matching Distillation"), without the GAN term here.

Generator: the distribution matching gradient of DMD eq. (7)-(8) (see distribution_matching.py), with the
teacher as real score and the critic as fake score; DMD2 drops DMD's regression loss (Sec. 4.1) and
instead updates the critic ``ttur`` times per generator step (two time-scale update rule, Sec. 4.2).
Critic: denoising score matching on (detached) generator samples, so it tracks the generator's score.
Optional: DMD's regression term (eq. 9) on noise -> teacher-ODE-sample pairs, weight ``regression_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onestep.errors import ConfigError
from onestep.objectives.base import Batch, Nets, Objective, ObjectiveConfig, register_objective
from onestep.objectives.distribution_matching import dmd_loss
from onestep.objectives.score_matching import dsm_loss
from onestep.sampling import sample


@dataclass
class DMD2Config(ObjectiveConfig):
    name: str = "dmd2"
    ttur: int = 5
    #: t ~ U[t_lo, t_hi] (as fractions of the schedule's range) for the distribution matching gradient
    t_lo: float = 0.02
    t_hi: float = 0.98
    #: critic's DSM weighting: edm | eps | x0 | v
    critic_weighting: str = "edm"
    #: DMD eq. (9) regression on teacher pairs: weight, pair count and teacher ODE steps (0 = off)
    regression_weight: float = 0.0
    regression_pairs: int = 2048
    regression_steps: int = 32


@register_objective
class DMD2(Objective):
    name = "dmd2"
    Config = DMD2Config
    networks = ("generator", "critic")

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if not 0 <= cfg.t_lo < cfg.t_hi <= 1:
            raise ConfigError(f"objective.t_lo={cfg.t_lo}, t_hi={cfg.t_hi} must satisfy 0 <= t_lo < t_hi <= 1")
        if cfg.regression_weight < 0:
            raise ConfigError(f"objective.regression_weight={cfg.regression_weight} must be >= 0")
        self.pairs: tuple[torch.Tensor, torch.Tensor] | None = None

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        x = self.generate(nets, batch)
        loss, logs = dmd_loss(nets.teacher, nets.critic, x, batch.cond, lo=self.cfg.t_lo, hi=self.cfg.t_hi)
        out = {"dm": loss, **logs}
        if self.cfg.regression_weight > 0:
            reg = self._regression(nets, batch)
            out["regression"] = reg
            loss = loss + self.cfg.regression_weight * reg
        out["loss"] = loss
        return out

    def critic_loss(self, nets: Nets, batch: Batch, step: int):
        with torch.no_grad():
            x = self.generate(nets, batch)
        loss = dsm_loss(nets.critic, x, batch.cond, weighting=self.cfg.critic_weighting)
        return {"loss": loss}

    def _regression(self, nets: Nets, batch: Batch):
        """DMD eq. (9): || G(z) - ODE_teacher(z) ||^2 on a fixed pool of pairs built at first use."""
        if self.pairs is None:
            g = torch.Generator().manual_seed(1234)
            z = torch.randn(self.cfg.regression_pairs, *batch.noise.shape[1:], generator=g).to(batch.noise)
            cond = None
            if batch.cond is not None:
                cond = torch.randint(0, nets.teacher.num_classes, (z.shape[0],), generator=g).to(batch.cond.device)
            ts = nets.teacher.schedule.default_ts(self.cfg.regression_steps)
            self.pairs = (z, cond, sample(nets.teacher, z, ts, cond, method="ddim"))
        z, cond, y = self.pairs
        idx = torch.randint(0, z.shape[0], (batch.noise.shape[0],), device=z.device)
        pair_batch = Batch(noise=z[idx], cond=None if cond is None else cond[idx])
        return torch.nn.functional.mse_loss(self.generate(nets, pair_batch), y[idx])
