"""SIM: score implicit matching (Luo et al. 2024, "One-Step Diffusion Distillation through Score Implicit
Matching").

The score divergence D(theta) = E_t w(t) E_{x_t ~ pi_t} d(s_p(x_t) - s_q(x_t)), with the sampling law pi_t the
(stop-gradient) generator law q_t, has the gradient E[-d'(y)^T d s_q / d theta], y = s_p - s_q. SIM's
score-projection identity (their Theorem 3.1) trades the unknown d s_q / d theta for samples:
    L(theta) = E_{x0 = G(z), x_t | x0} [ d'(y(x_t))^T ( s_sg(q)(x_t) - grad_{x_t} log q_t(x_t | x0) ) ],
differentiated along the sample path x_t = a_t x0 + s_t eps (score networks frozen, d' not detached).
We measure the gap in x0 units, ytilde = (s_t^2 / a_t) y = mu_p - mu_q, with d applied to ytilde; since
s_q(x_t) - grad log q_t(x_t | x0) = a_t (mu_q(x_t) - x0) / s_t^2 the loss becomes
    L = E[ w * d'(ytilde)^T (mu_q(x_t) - x0) ],   w = sg(1 / mean|x0 - mu_p(x_t)|)   (DMD/SiD normalizer)
Distances d: "l2" ||ytilde||^2 (then L = 2 x SiD's loss at alpha = 1) and "pseudo_huber"
sqrt(||ytilde||^2 + c^2) - c with c = huber_c * sqrt(dim), the paper's robust choice.

No official training code is public (maple-research-lab/SIM ships inference only), so two choices are options:
  c_units    "x0": c is constant in x0 units (above). "score": c is constant in score units, as the paper writes d
             on y = s_p - s_q: d'(y) = y / sqrt(||y||^2 + c^2) is unit-free in direction, and y = (a_t / s_t^2) ytilde,
             so that equals the x0-unit form with c(t) = c s_t^2 / a_t. The time weighting is the same in both (only
             what c means changes); for "l2" the option has no effect.
  normalize  true: the per-sample DMD/SiD normalizer w above. false: w = 1, and the loss's gradient is exactly the
             gradient of the score divergence (Theorem 3.1) with d applied in x0 units; with the normalizer on, the
             weight depends on the sample through mu_p, so the loss is no longer the gradient of any divergence
             of this form (it is a per-sample-reweighted one, as DMD's and SiD's are).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from onestep.denoisers.base import Denoiser
from onestep.errors import ConfigError
from onestep.objectives.adversarial import GANConfig
from onestep.objectives.base import (Batch, CriticWeighting, Nets, ObjectiveConfig, TimeRange, check_t_range, frozen,
                                     register_objective)
from onestep.objectives.critic import CriticObjective
from onestep.objectives.distribution_matching import dmd_normalizer
from onestep.core import noised, sample_t

DISTANCES = ("l2", "pseudo_huber")
C_UNITS = ("x0", "score")


def distance_grad(y: torch.Tensor, distance: str, huber_c: float | torch.Tensor) -> torch.Tensor:
    """d'(y) per sample for d(y) = ||y||^2 or sqrt(||y||^2 + c^2) - c (norms over all non-batch dims); c = huber_c
    sqrt(dim), huber_c a number or a per-sample (B,) tensor."""
    if distance == "l2":
        return 2 * y
    c = huber_c * math.sqrt(y[0].numel())
    norm = torch.sqrt(y.pow(2).flatten(1).sum(1) + c**2)
    return y / norm.view(-1, *([1] * (y.ndim - 1)))


def sim_loss(teacher: Denoiser, critic: Denoiser, x: torch.Tensor, cond=None, *, distance: str = "pseudo_huber",
             huber_c: float = 0.05, c_units: str = "x0", normalize: bool = True, lo: float = 0.02, hi: float = 0.98,
             t=None, eps=None):
    sched = teacher.schedule
    t = sample_t(sched, x.shape[0], lo, hi, like=x) if t is None else t
    x_t, _ = noised(sched, x, t, eps)
    with frozen(critic):
        mu_p, mu_q = teacher.x0(x_t, t, cond), critic.x0(x_t, t, cond)
    y = mu_p - mu_q
    c = huber_c
    if c_units == "score":  # a constant c on s_p - s_q = (a / s^2) ytilde is c s^2 / a on ytilde
        c = huber_c * (sched.sigma(t) ** 2 / sched.alpha(t)).to(y)
    per = (distance_grad(y, distance, c) * (mu_q - x)).flatten(1).mean(1)
    if normalize:
        per = per / dmd_normalizer(x, mu_p.detach()).flatten()
    return per.mean(), {"sim_gap": y.detach().flatten(1).norm(dim=1).mean()}


@dataclass
class SIMConfig(ObjectiveConfig, GANConfig, TimeRange, CriticWeighting):
    name: str = "sim"
    ttur: int = 1
    #: l2 | pseudo_huber
    distance: str = "pseudo_huber"
    #: pseudo-Huber c per sqrt(dimension), in c_units
    huber_c: float = 0.05
    #: x0 (c constant on mu_p - mu_q: a t-dependent c a_t / s_t^2 on the score gap) | score (c constant on the score
    #: gap s_p - s_q, the paper's notation); no official training code exists (maple-research-lab/SIM: inference only)
    c_units: str = "x0"
    #: true: divide by the DMD/SiD per-sample normalizer mean|x - mu_p| (then the loss is not the exact gradient of a
    #: score divergence) | false: the exact Theorem 3.1 gradient
    normalize: bool = True


@register_objective
class SIM(CriticObjective):
    name = "sim"
    Config = SIMConfig

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if cfg.distance not in DISTANCES:
            raise ConfigError(f"objective.distance='{cfg.distance}' is unknown; choose one of {DISTANCES}")
        if cfg.huber_c <= 0:
            raise ConfigError(f"objective.huber_c={cfg.huber_c} must be > 0")
        if cfg.c_units not in C_UNITS:
            raise ConfigError(f"objective.c_units='{cfg.c_units}' is unknown; choose one of {C_UNITS}")
        check_t_range(cfg)

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        x = self.generate(nets, batch)
        loss, logs = sim_loss(nets.teacher, nets.critic, x, batch.cond, distance=self.cfg.distance,
                              huber_c=self.cfg.huber_c, c_units=self.cfg.c_units, normalize=self.cfg.normalize,
                              lo=self.cfg.t_lo, hi=self.cfg.t_hi)
        return self.with_gan(loss, {"sim": loss.detach(), **logs}, nets, x, batch.cond)
