"""f-distill (Xu et al. 2025, "One-step Diffusion Models with f-Divergence Distribution Matching").

The gradient of D_f(p || q_theta) = E_q f(p/q) at noise level t is a DMD gradient reweighted by the density
ratio r = p_t / q_t (their Theorem 1 / eq. (7)):
    grad_theta D_f = E_{t, x_t} [ -h(r(x_t)) (s_p(x_t) - s_q(x_t)) dx_t/dtheta ],   h(r) = r^2 f''(r),
so h = 1 (reverse KL) is DMD. r comes from a discriminator trained by the non-saturating GAN loss on noised
real vs generator samples (at its optimum logit = log r; adversarial.py), read off the critic's features.
Numerics (Sec. 4.2): log r is clamped to [-log_ratio_clamp, log_ratio_clamp] and h is divided by its mean
within each of ``time_bins`` bins of t (summed over processes with an all-reduce when torch.distributed is
initialized), so the ratio reweights samples at one noise level without changing the step size across t; the
normalized weight is capped at ``max_weight`` (ours: without it a 1000-step grid run diverged).
In x0 form, with DMD's normalizer (distribution_matching.py):  grad = h_norm(r) (mu_fake - mu_real) / mean|x - mu_real|.

The h table (f with f(1) = 0; D_f(p||q) = E_q f(p/q)):
    reverse_kl  f = -log r                          h = 1
    forward_kl  f = r log r                         h = r
    js          f = r log r - (r+1) log((r+1)/2)     h = r / (r + 1)
    hellinger   f = (sqrt(r) - 1)^2  (squared)      h = sqrt(r) / 2
    jeffreys    f = (r - 1) log r                   h = r + 1
    pearson     f = (r - 1)^2                       h = 2 r^2
    neyman      f = (1 - r)^2 / r                   h = 2 / r
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from onestep.denoisers.base import Denoiser
from onestep.errors import ConfigError
from onestep.objectives.adversarial import GANConfig
from onestep.objectives.base import Batch, Nets, ObjectiveConfig, check_t_range, frozen, register_objective
from onestep.objectives.critic import CriticObjective
from onestep.objectives.distribution_matching import denoised_pair, dmd_normalizer, surrogate_loss

H: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "reverse_kl": torch.ones_like,
    "forward_kl": lambda r: r,
    "js": lambda r: r / (r + 1),
    "hellinger": lambda r: r.sqrt() / 2,
    "jeffreys": lambda r: r + 1,
    "pearson": lambda r: 2 * r**2,
    "neyman": lambda r: 2 / r,
}
#: the f of each divergence (the table above); tests check h = r^2 f''(r) against it
F_OF: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "reverse_kl": lambda r: -r.log(),
    "forward_kl": lambda r: r * r.log(),
    "js": lambda r: r * r.log() - (r + 1) * ((r + 1) / 2).log(),
    "hellinger": lambda r: (r.sqrt() - 1) ** 2,
    "jeffreys": lambda r: (r - 1) * r.log(),
    "pearson": lambda r: (r - 1) ** 2,
    "neyman": lambda r: (1 - r) ** 2 / r,
}
#: floor of a bin's mean weight, so a bin of near-zero weights is not blown up
BIN_MEAN_FLOOR = 1e-8


def f_weights(logits: torch.Tensor, divergence: str, log_ratio_clamp: float) -> torch.Tensor:
    """h(r) with r = exp(clamp(logit)), computed in fp32 (or fp64)."""
    if divergence not in H:
        raise ConfigError(f"objective.divergence='{divergence}' is unknown; choose one of {sorted(H)}")
    wdtype = torch.promote_types(logits.dtype, torch.float32)
    r = logits.detach().to(wdtype).clamp(-log_ratio_clamp, log_ratio_clamp).exp()
    return H[divergence](r)


def normalize_per_bin(h: torch.Tensor, bins: torch.Tensor, num_bins: int, max_weight: float = math.inf) -> torch.Tensor:
    """min(h / mean(h over the samples of its time bin), max_weight), the means taken over all processes."""
    sums = torch.zeros(num_bins, dtype=h.dtype, device=h.device).index_add_(0, bins, h)
    counts = torch.zeros(num_bins, dtype=h.dtype, device=h.device).index_add_(0, bins, torch.ones_like(h))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    means = (sums / counts.clamp_min(1)).clamp_min(BIN_MEAN_FLOOR)
    return (h / means[bins]).clamp_max(max_weight)


def fdistill_gradient(teacher: Denoiser, critic: Denoiser, x: torch.Tensor, logit_fn, cond=None, *,
                      divergence: str = "js", log_ratio_clamp: float = 5.0, time_bins: int = 10,
                      max_weight: float = math.inf, lo: float = 0.02, hi: float = 0.98,
                      u: torch.Tensor | None = None, eps=None):
    """The f-distill direction at generator samples x. ``logit_fn(x_t, t) -> log r`` (no gradient needed);
    ``u`` in [lo, hi] are the unit times (t = schedule.t_from_unit(u)), drawn uniformly when not given."""
    sched = teacher.schedule
    if u is None:
        u = lo + (hi - lo) * torch.rand(x.shape[0], dtype=torch.float64)
    t = sched.t_from_unit(u).to(device=x.device, dtype=x.dtype)
    _, x_t, mu_real, mu_fake = denoised_pair(teacher, critic, x, cond, t=t, eps=eps)
    with torch.no_grad():
        h = f_weights(logit_fn(x_t, t), divergence, log_ratio_clamp).to(mu_real.dtype)
        bins = ((u - lo) / (hi - lo) * time_bins).long().clamp(0, time_bins - 1).to(h.device)
        h = normalize_per_bin(h, bins, time_bins, max_weight)
        grad = torch.nan_to_num(h.view(-1, *([1] * (x.ndim - 1))) * (mu_fake - mu_real) / dmd_normalizer(x, mu_real))
    return grad.to(x.dtype), {"h_mean": h.mean(), "h_max": h.max()}


@dataclass
class FDistillConfig(ObjectiveConfig, GANConfig):
    name: str = "fdistill"
    ttur: int = 5
    #: reverse_kl | forward_kl | js | hellinger | jeffreys | pearson | neyman
    divergence: str = "js"
    log_ratio_clamp: float = 5.0
    time_bins: int = 10
    #: cap of the normalized weight h / mean_bin(h): one sample that dominates its bin cannot take a huge step
    max_weight: float = 5.0
    t_lo: float = 0.02
    t_hi: float = 0.98
    critic_weighting: str = "edm"
    #: the density ratio's discriminator: a head on the critic's features (or on frozen teacher features)
    discriminator: str = "critic"


@register_objective
class FDistill(CriticObjective):
    name = "fdistill"
    Config = FDistillConfig

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if cfg.divergence not in H:
            raise ConfigError(f"objective.divergence='{cfg.divergence}' is unknown; choose one of {sorted(H)}")
        if cfg.discriminator == "none":
            raise ConfigError("objective=fdistill reads the density ratio from a discriminator; set "
                              "objective.discriminator=critic (or teacher)")
        if cfg.log_ratio_clamp <= 0 or cfg.time_bins < 1 or cfg.max_weight <= 0:
            raise ConfigError(f"objective.log_ratio_clamp={cfg.log_ratio_clamp} and max_weight={cfg.max_weight} "
                              f"must be > 0, time_bins={cfg.time_bins} >= 1")
        check_t_range(cfg)

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        x = self.generate(nets, batch)
        c = self.cfg

        def logit_fn(x_t, t):
            with frozen(nets.critic, nets.modules.get("disc")):
                return self.gan.logits(nets, x_t, t, batch.cond)

        grad, logs = fdistill_gradient(nets.teacher, nets.critic, x, logit_fn, batch.cond, divergence=c.divergence,
                                       log_ratio_clamp=c.log_ratio_clamp, time_bins=c.time_bins,
                                       max_weight=c.max_weight, lo=c.t_lo, hi=c.t_hi)
        loss = surrogate_loss(x, grad)
        return self.with_gan(loss, {"fdiv": loss.detach(), **logs}, nets, x, batch.cond)
