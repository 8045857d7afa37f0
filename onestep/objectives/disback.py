"""DisBack: distribution backtracking (Zhang et al. 2024, "Distribution Backtracking Builds A Faster Convergence
Trajectory for Diffusion Distillation", arXiv 2408.15991; official code github.com/SYZhang0805/DisBack,
main/degradation.py and main/train_sd.py, built on DMD2's).

Score distillation pulls the generator toward the teacher's score from the first step, where the two distributions are
far apart (the paper's "score mismatch"). DisBack records the way from the teacher to the initial generator and has the
generator walk it back:

Stage 1, degradation recording (Sec. 3.2, Alg. 1): a copy of the teacher's score model is fine-tuned by denoising score
    matching on samples of the (frozen) initial generator for ``degrade_steps`` steps; ``path_points`` snapshots along
    the way, evenly spaced, are the degradation path s_1, ..., s_N (s_N fits the initial generator; s_0 is the teacher).
    The official code fine-tunes the fake-score network of its DMD2 guidance model, saving it every 100 iterations
    (degradation.py, --log_iters 100). Here the copy is the run's critic, the generator's updates are zero-gradient
    no-ops, and the snapshots are trainer-checkpointed modules (``path_1..path_N``), so a resumed run is exact.
Stage 2, distribution backtracking (Sec. 3.3, Alg. 2): score distillation (DMD's gradient, distribution_matching.py)
    whose real score is the path point s_{N-1}, then s_{N-2}, ..., s_0 = the teacher, while the critic keeps tracking
    the generator (it starts as s_N, the initial generator's score). The switch: a fixed number of generator steps per
    path point, ``backtrack_steps`` (train_sd.py's --interval, 1000 by default: the target checkpoint moves one node
    back every interval iterations); after s_1 the teacher stays the target to the end. Path points are evaluated with
    the teacher's CFG scale, as the official code loads them into its guided real-score network.
The GAN block (``discriminator=critic``, ``gan_weight``; adversarial.py) adds stage 2's adversarial term, as the
official SDXL run (--gen_cls_loss_weight 5e-3). With path_points=1 stage 2 is DMD2 with a critic pre-trained on the
initial generator. Not covered: LoRA critics (the path stores full copies of the critic network).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from onestep.core import sample_t
from onestep.denoisers.base import Denoiser, guided
from onestep.errors import ConfigError
from onestep.objectives.adversarial import GANConfig
from onestep.objectives.base import (Batch, CriticWeighting, Nets, ObjectiveConfig, TimeDraw, check_t_dist,
                                     check_t_range, register_objective)
from onestep.objectives.critic import CriticObjective
from onestep.objectives.distribution_matching import dmd_loss


@dataclass
class DisBackConfig(ObjectiveConfig, GANConfig, TimeDraw, CriticWeighting):
    name: str = "disback"
    #: critic updates per generator step in both stages (DMD2's TTUR; DisBack's scripts --dfake_gen_update_ratio 5)
    ttur: int = 5
    # t_lo / t_hi (TimeDraw) of the distribution matching gradient: DisBack's scripts --max_step_percent 0.98 and
    # DMD2's min 0.02
    #: stage 1 (degradation recording): generator steps (each with ``ttur`` critic updates) fine-tuning the teacher
    #: copy toward the frozen initial generator (the official SDXL degradation ran 25000 iterations)
    degrade_steps: int = 100
    #: snapshots of the degradation path, evenly spaced over stage 1, the last at its end (official: one per 100 of
    #: the 25000 iterations)
    path_points: int = 4
    #: stage 2: generator steps per path point before the target moves one point back toward the teacher
    #: (train_sd.py --interval, default 1000)
    backtrack_steps: int = 50


@register_objective
class DisBack(CriticObjective):
    name = "disback"
    Config = DisBackConfig

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        check_t_range(cfg)
        check_t_dist(cfg)
        for key in ("degrade_steps", "path_points", "backtrack_steps"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"objective.{key}={getattr(cfg, key)} must be >= 1")
        if cfg.degrade_steps % cfg.path_points:
            fit = cfg.path_points * max(1, round(cfg.degrade_steps / cfg.path_points))
            raise ConfigError(f"objective.degrade_steps={cfg.degrade_steps} must be a multiple of "
                              f"objective.path_points={cfg.path_points} (evenly spaced snapshots); e.g. "
                              f"objective.degrade_steps={fit}")
        self.every = cfg.degrade_steps // cfg.path_points

    def build_modules(self, setup):
        """path_1..path_N: copies of the critic network, written in stage 1, never optimized (no gradient reaches
        them: the critic update's optimizer skips them), checkpointed with the run."""
        net = copy.deepcopy(setup.student_init).to(torch.float32)
        path = {f"path_{j}": (copy.deepcopy(net), "critic") for j in range(1, self.cfg.path_points + 1)}
        return {**super().build_modules(setup), **path}

    # --- the path and its schedule ------------------------------------------------------------------------------

    def target_index(self, step: int) -> int:
        """Stage 2's path index at generator step ``step`` (>= degrade_steps): N-1, N-2, ..., 0 (the teacher), one
        point per backtrack_steps steps, then 0 to the end."""
        k = (step - self.cfg.degrade_steps) // self.cfg.backtrack_steps
        return max(self.cfg.path_points - 1 - k, 0)

    def target(self, nets: Nets, index: int) -> Denoiser:
        """The real score at path index ``index``: 0 = the teacher, N = the fully degraded copy, with the teacher's
        CFG scale."""
        if index == 0:
            return nets.teacher
        return guided(nets.modules[f"path_{index}"], nets.teacher.guidance_scale)

    @torch.no_grad()
    def record(self, nets: Nets, j: int) -> None:
        """Stage 1: path_j <- the critic's current weights."""
        dst = list(nets.modules[f"path_{j}"].parameters())
        src = list(nets.critic.parameters())
        if [p.shape for p in src] != [p.shape for p in dst]:
            raise ConfigError("objective=disback stores full copies of the critic network along the degradation path; "
                              "this critic is shaped differently (unset critic.lora.rank and generator.students)")
        for d, p in zip(dst, src):
            d.copy_(p.detach().to(d.dtype))

    # --- losses -------------------------------------------------------------------------------------------------

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        if step < self.cfg.degrade_steps:
            # stage 1: the generator stays the initial one (zero gradient: AdamW leaves it exactly as it is); the
            # critic has now had (step + 1) * ttur updates, a snapshot every ``every`` steps
            if (step + 1) % self.every == 0:
                self.record(nets, (step + 1) // self.every)
            zero = sum(p.sum() * 0 for p in nets.generator.parameters())
            return {"loss": zero, "path_index": torch.tensor(float(self.cfg.path_points))}
        index = self.target_index(step)
        x = self.generate(nets, batch)
        t = sample_t(nets.teacher.schedule, x.shape[0], self.cfg.t_lo, self.cfg.t_hi, like=x, dist=self.cfg.t_dist)
        loss, logs = dmd_loss(self.target(nets, index), nets.critic, x, batch.cond, t=t)
        out = {"dm": loss, **logs, "path_index": torch.tensor(float(index))}
        return self.with_gan(loss, out, nets, x, batch.cond)
