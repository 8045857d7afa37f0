"""SlimFlow: a one-step student smaller than its teacher, trained in two stages on the teacher's noise -> sample
coupling (Zhu, Liu & Liu 2024, "SlimFlow: Training Smaller One-Step Diffusion Models with Rectified Flow", ECCV,
arXiv 2407.12718: its two parts, Annealing Reflow and Flow-Guided Distillation; the equations are checked against the
official code, yuanzhi-zhu/SlimFlow, cited below as file:line, not against the paper's equation numbers, which this
file does not quote). The student's architecture is ``generator.arch`` (denoisers/slim.py); the teacher pairs, their
straight-path loss and the pool are reflow.py's.

The official code runs in the rectified-flow frame t: 0 = noise -> 1 = data, velocity v = x1 - x0. This file writes
everything in the project's frame (x_t = alpha(t) x + sigma(t) z: t_max = noise), where on the rectified-flow schedule
t_project = 1 - t_official and the flow prediction is -v; the translations are given at each step.

Stage 1, Annealing Reflow, the first ``reflow_steps`` generator steps. The 2-rectified flow is trained on the
teacher pairs (z, x), x = ODE_teacher(z), with the noise side of each pair replaced by
    z_k = sqrt(1 - beta_k^2) z + beta_k eps,   eps ~ N(0, I) fresh                    (reflow/reflow.py:115)
and reflow.py's loss || v(x_t, t) - (alpha' x + sigma' z_k) ||^2 on x_t = alpha(t) x + sigma(t) z_k. beta_k anneals from
1 (z_k independent of x: the random-pairing 1-rectified-flow objective on the teacher's samples, which a small
network can learn from any initialisation) to 0 (the teacher's coupling: reflow) over ``anneal_steps`` steps,
    linear  beta_k = 1 - min(1, k / K)       (reflow/reflow.py:86; the README's annealing run, x0_randomness warmup_K)
    cos     beta_k = (1 + cos(pi min(1, k / K))) / 2                                   (reflow/reflow.py:82)
    exp     beta_k = exp(-k / K)                                                       (reflow/reflow.py:79)
(``anneal_steps=0``: beta = 0, plain reflow into the small student.)

Stage 2, Flow-Guided Distillation, from step ``reflow_steps`` on. The stage-1 model is frozen as the
2-rectified flow R (the target ``rectified``: Objective.targets with decay 1, filled from the generator at the switch,
as tcm.py's in-run stage 1), and the one-step student G (initialised from it: the same network trains on) minimises
    L = || G(z) - x ||^2 + w || G(z) - sg[ R.x0(x_s, s) ] ||^2,   x_s = alpha(s) sg[G(z)] + sigma(s) z,  s ~ U[s_lo, s_hi]
The first term distils the teacher pairs at the noise end (flow_t_schedule t0 on the pair data, reflow/reflow.py:131
-132 and :170, no perturbation: x0_randomness fix_0, configs/default_cifar10_configs.py:33). The second is the
flow-guided term (``teacher_loss_new``, reflow/reflow.py:205-229): a point x_s on the straight line from z to the
student's own sample, one Euler step of R from there to the data end, and the student pulled towards where R lands.
In the official frame: predicted = v_theta(z, 0) = G(z) - z; x_t' = z + t' predicted, t' ~ U[0.2, 0.8]
(reflow/reflow.py:216-217); x_1 = x_t' + (1 - t') v_R(x_t', t') (:226); target = x_1 - z (:227); loss
d(predicted, target) (:229), added to the distillation loss unweighted (:252: w = 1). With t' = 1 - s and
R.x0(x_s, s) = x_s - s R.flow(x_s, s) on the rectified-flow schedule, predicted - target = G(z) - R.x0(x_s, s): the
two losses are the same number; on other schedules R.x0 is R's one DDIM step to the data end. d is the squared L2
mean here (the paper uses LPIPS on images; its weight_schedule 'uniform', cifar10_rf_gaussian.py:38).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from onestep.conditioning import Cond
from onestep.core import Batch, Nets, noised, sample_t
from onestep.errors import ConfigError
from onestep.objectives.base import Objective, ObjectiveConfig, TimeRange, register_objective
from onestep.objectives.reflow import reflow_loss, teacher_pairs
from onestep.objectives.tcm import freeze_into
from onestep.sampling import METHODS

ANNEALS = ("linear", "cos", "exp")
RECTIFIED = "rectified"  # the frozen 2-rectified flow's name in Nets.targets and in checkpoints


@dataclass
class SlimFlowConfig(ObjectiveConfig, TimeRange):
    name: str = "slimflow"
    #: generator steps of stage 1 (Annealing Reflow); stage 2 (Flow-Guided Distillation) follows
    reflow_steps: int = 400
    #: beta_k's schedule from 1 (random pairing) to 0 (the teacher's pairs): linear | cos | exp (official
    #: x0_randomness warmup_K, warmup_cos_K, warmup_exp_K), over ``anneal_steps`` steps (0: beta = 0, plain reflow)
    anneal: str = "linear"
    anneal_steps: int = 200
    #: size of the teacher's noise -> sample pool, and the teacher sampler that builds it (reflow.py's pool)
    num_pairs: int = 16384
    pair_solver: str = "heun"
    pair_steps: int = 32
    #: stage-1 reflow time t ~ U[t_lo, t_hi] (fractions of the schedule's range)
    t_lo: float = 0.0
    t_hi: float = 1.0
    #: w, the flow-guided term's weight (official: 1, added unweighted, reflow/reflow.py:252)
    guide_weight: float = 1.0
    #: the guided term's s ~ U[guide_t_lo, guide_t_hi] (official t' ~ U[0.2, 0.8], reflow/reflow.py:216)
    guide_t_lo: float = 0.2
    guide_t_hi: float = 0.8


def anneal_beta(step: int, steps: int, kind: str) -> float:
    """beta_k of Annealing Reflow at generator step k = ``step`` (see the module docstring)."""
    if steps == 0:
        return 0.0
    if kind == "exp":
        return math.exp(-step / steps)
    frac = min(1.0, step / steps)
    return (1 + math.cos(math.pi * frac)) / 2 if kind == "cos" else 1 - frac


def annealed_noise(z: torch.Tensor, eps: torch.Tensor, beta: float) -> torch.Tensor:
    """z_k = sqrt(1 - beta^2) z + beta eps: the pair's noise, partly replaced by fresh noise (reflow/reflow.py:115)."""
    return math.sqrt(1 - beta**2) * z + beta * eps


def flow_guided_loss(sample: torch.Tensor, z: torch.Tensor, s: torch.Tensor, rectified, cond=None) -> torch.Tensor:
    """The flow-guided term: mean || G(z) - sg[R.x0(alpha(s) sg[G(z)] + sigma(s) z, s)] ||^2 (``sample`` = G(z))."""
    with torch.no_grad():
        x_s, _ = noised(rectified.schedule, sample.detach(), s, z)
        target = rectified.x0(x_s, s, cond)
    return (sample - target).flatten(1).pow(2).mean(1).mean()


@register_objective
class SlimFlow(Objective):
    name = "slimflow"
    Config = SlimFlowConfig
    networks = ("generator",)

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if cfg.anneal not in ANNEALS or cfg.pair_solver not in METHODS:
            raise ConfigError(f"objective.anneal='{cfg.anneal}' / pair_solver='{cfg.pair_solver}': choose anneal from "
                              f"{ANNEALS} and pair_solver from {METHODS}")
        if cfg.reflow_steps < 1 or cfg.anneal_steps < 0 or cfg.num_pairs < 1 or cfg.pair_steps < 1:
            raise ConfigError(f"objective.reflow_steps={cfg.reflow_steps}, num_pairs={cfg.num_pairs}, pair_steps="
                              f"{cfg.pair_steps} must be >= 1 and anneal_steps={cfg.anneal_steps} >= 0 (stage 1 makes "
                              "the 2-rectified flow that stage 2 reads)")
        for lo, hi in (("t_lo", "t_hi"), ("guide_t_lo", "guide_t_hi")):
            if not 0 <= getattr(cfg, lo) < getattr(cfg, hi) <= 1:
                raise ConfigError(f"objective.{lo}={getattr(cfg, lo)}, {hi}={getattr(cfg, hi)} must satisfy "
                                  f"0 <= {lo} < {hi} <= 1 (fractions of the schedule's range)")
        if cfg.guide_weight < 0:
            raise ConfigError(f"objective.guide_weight={cfg.guide_weight} must be >= 0 (official: 1)")
        self.pairs: dict[str, torch.Tensor] | None = None

    def targets(self):
        # decay 1: the trainer checkpoints the 2-rectified flow and leaves it where stage 2's first step puts it
        return {RECTIFIED: 1.0}

    def prepare(self, nets: Nets, weights=None) -> None:
        self.pairs = teacher_pairs(nets, self.cfg, "slimflow")

    def stage(self, step: int) -> int:
        return 1 if step < self.cfg.reflow_steps else 2

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        if self.pairs is None:
            self.prepare(nets)
        c, g = self.cfg, nets.generator
        n = batch.noise.shape[0]
        idx = torch.randint(0, self.pairs["noise"].shape[0], (n,), device=batch.noise.device)
        z, x = self.pairs["noise"][idx].to(batch.noise), self.pairs["sample"][idx].to(batch.noise)
        cond = Cond.of_classes(self.pairs["cond"][idx] if "cond" in self.pairs else None, nets.teacher.num_classes)
        if self.stage(step) == 1:
            beta = anneal_beta(step, c.anneal_steps, c.anneal)
            z_k = annealed_noise(z, torch.randn_like(z), beta)
            t = sample_t(g.schedule, n, c.t_lo, c.t_hi, like=z)
            loss = reflow_loss(g, z_k, x, t, cond)
            return {"loss": loss, "reflow": loss.detach(), "beta": torch.tensor(beta), "stage": torch.tensor(1.0)}
        rectified = nets.targets[RECTIFIED]
        if step == c.reflow_steps:
            freeze_into(rectified, g)
        sample = self.generate(nets, Batch(noise=z, cond=cond))
        distill = (sample - x).flatten(1).pow(2).mean(1).mean()
        s = sample_t(g.schedule, n, c.guide_t_lo, c.guide_t_hi, like=z)
        guided = flow_guided_loss(sample, z, s, rectified, cond)
        return {"loss": distill + c.guide_weight * guided, "distill": distill.detach(), "guided": guided.detach(),
                "stage": torch.tensor(2.0)}
