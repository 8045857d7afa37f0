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
``normalization=ratio_bins`` is the official order instead (NVlabs/FastGen fastgen/methods/distribution_matching/
f_distill.py:59-111): r clipped to [ratio_lower, ratio_upper] (0.1, 20 there), r divided by its mean within bins of
equal width in the schedule's own time t (not the unit time u: on EDM, in sigma), then h applied, then h divided by
its batch mean (all processes). FastGen keeps an EMA of the bin means whose default rate 0 (configs/methods/
config_f_distill.py:34) makes them this batch's, as here.
``preset=fastgen`` is FastGen's objective end to end (FASTGEN below): that order with its clamp, bounds and no cap, the
discriminator on the frozen teacher's features, and L_G at the f-distill x_t, from the logits the ratio reads
(``gan_at_fdistill_t``; f_distill.py:139-169), with FastGen's gan_loss_weight_gen.
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

import copy
import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.distributed as dist

from onestep.core import noised
from onestep.denoisers.base import Denoiser
from onestep.errors import ConfigError
from onestep.objectives.adversarial import GANConfig
from onestep.objectives.base import (Batch, CriticWeighting, Nets, ObjectiveConfig, TimeRange, check_t_range, frozen,
                                     register_objective)
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


NORMALIZATIONS = ("h_bins", "ratio_bins")
PRESETS = ("none", "fastgen")
#: the keys objective.preset=fastgen sets: NVlabs/FastGen's f-distill (fastgen/methods/distribution_matching/
#: f_distill.py, fastgen/configs/methods/config_f_distill.py, its parent config_dmd2.py)
FASTGEN = {
    "log_ratio_clamp": 10.0,         # logits clamped to [-10, 10] before exp, f_distill.py:66-68
    "ratio_lower": 0.1,              # config_f_distill.py:28
    "ratio_upper": 20.0,             # config_f_distill.py:29
    "max_weight": math.inf,          # h / (h_mean + 1e-6) and nothing after it, f_distill.py:100-108
    "normalization": "ratio_bins",   # ratio_normalization=True, 10 bins, EMA rate 0: config_f_distill.py:32-34
    "discriminator": "teacher",      # D reads the frozen teacher's features, f_distill.py:146-153
    "gan_weight": 1e-3,              # gan_loss_weight_gen, configs/methods/config_dmd2.py:40
    "gan_at_fdistill_t": True,       # L_G from the logits at the f-distill x_t, f_distill.py:153-154, :169
}


def density_ratio(logits: torch.Tensor, log_ratio_clamp: float, lower: float = 0.0, upper: float = math.inf):
    """r = exp(clamp(logit, +-log_ratio_clamp)) clipped to [lower, upper], in fp32 (or fp64)."""
    wdtype = torch.promote_types(logits.dtype, torch.float32)
    return logits.detach().to(wdtype).clamp(-log_ratio_clamp, log_ratio_clamp).exp().clamp(lower, upper)


def f_weights(logits: torch.Tensor, divergence: str, log_ratio_clamp: float) -> torch.Tensor:
    """h(r) with r = exp(clamp(logit)), computed in fp32 (or fp64)."""
    if divergence not in H:
        raise ConfigError(f"objective.divergence='{divergence}' is unknown; choose one of {sorted(H)}")
    return H[divergence](density_ratio(logits, log_ratio_clamp))


def _all_reduced(*tensors: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        for x in tensors:
            dist.all_reduce(x)


def bin_means(v: torch.Tensor, bins: torch.Tensor, num_bins: int) -> torch.Tensor:
    """The mean of v over the samples of each time bin (all processes), floored at BIN_MEAN_FLOOR: shape (num_bins,)."""
    sums = torch.zeros(num_bins, dtype=v.dtype, device=v.device).index_add_(0, bins, v)
    counts = torch.zeros(num_bins, dtype=v.dtype, device=v.device).index_add_(0, bins, torch.ones_like(v))
    _all_reduced(sums, counts)
    return (sums / counts.clamp_min(1)).clamp_min(BIN_MEAN_FLOOR)


def batch_mean(v: torch.Tensor) -> torch.Tensor:
    """The mean of v over the global batch (all processes), floored at BIN_MEAN_FLOOR."""
    total = torch.stack([v.sum(), torch.tensor(float(v.numel()), dtype=v.dtype, device=v.device)])
    _all_reduced(total)
    return (total[0] / total[1]).clamp_min(BIN_MEAN_FLOOR)


def normalize_per_bin(h: torch.Tensor, bins: torch.Tensor, num_bins: int, max_weight: float = math.inf) -> torch.Tensor:
    """min(h / mean(h over the samples of its time bin), max_weight), the means taken over all processes."""
    return (h / bin_means(h, bins, num_bins)[bins]).clamp_max(max_weight)


def official_weights(r: torch.Tensor, bins: torch.Tensor, num_bins: int, divergence: str,
                     max_weight: float = math.inf) -> torch.Tensor:
    """FastGen's order (f_distill.py:72-108): h(r / mean_bin(r)) / mean_batch(h), capped at max_weight."""
    h = H[divergence](r / bin_means(r, bins, num_bins)[bins])
    return (h / batch_mean(h)).clamp_max(max_weight)


def native_bins(schedule, t: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Bins of equal width in the schedule's own time over [t_min, t_max] (FastGen f_distill.py:74-77)."""
    width = (schedule.t_max - schedule.t_min) / num_bins
    return ((t.double() - schedule.t_min) / width).floor().long().clamp(0, num_bins - 1)


def fdistill_gradient(teacher: Denoiser, critic: Denoiser, x: torch.Tensor, logit_fn, cond=None, *,
                      divergence: str = "js", log_ratio_clamp: float = 5.0, time_bins: int = 10,
                      max_weight: float = math.inf, lo: float = 0.02, hi: float = 0.98,
                      u: torch.Tensor | None = None, eps=None, normalization: str = "h_bins",
                      ratio_lower: float = 0.0, ratio_upper: float = math.inf):
    """The f-distill direction at generator samples x. ``logit_fn(x_t, t) -> log r`` (no gradient needed);
    ``u`` in [lo, hi] are the unit times (t = schedule.t_from_unit(u)), drawn uniformly when not given."""
    sched = teacher.schedule
    if u is None:
        u = lo + (hi - lo) * torch.rand(x.shape[0], dtype=torch.float64)
    t = sched.t_from_unit(u).to(device=x.device, dtype=x.dtype)
    _, x_t, mu_real, mu_fake = denoised_pair(teacher, critic, x, cond, t=t, eps=eps)
    with torch.no_grad():
        r = density_ratio(logit_fn(x_t, t), log_ratio_clamp, ratio_lower, ratio_upper).to(mu_real.dtype)
        if normalization == "ratio_bins":
            bins = native_bins(sched, sched.t_from_unit(u), time_bins).to(r.device)
            h = official_weights(r, bins, time_bins, divergence, max_weight)
        else:
            bins = ((u - lo) / (hi - lo) * time_bins).long().clamp(0, time_bins - 1).to(r.device)
            h = normalize_per_bin(H[divergence](r), bins, time_bins, max_weight)
        grad = torch.nan_to_num(h.view(-1, *([1] * (x.ndim - 1))) * (mu_fake - mu_real) / dmd_normalizer(x, mu_real))
    return grad.to(x.dtype), {"h_mean": h.mean(), "h_max": h.max()}


@dataclass
class FDistillConfig(ObjectiveConfig, GANConfig, TimeRange, CriticWeighting):
    name: str = "fdistill"
    ttur: int = 5
    #: reverse_kl | forward_kl | js | hellinger | jeffreys | pearson | neyman
    divergence: str = "js"
    log_ratio_clamp: float = 5.0
    time_bins: int = 10
    #: cap of the normalized weight h / mean_bin(h): one sample that dominates its bin cannot take a huge step
    #: (ours; FastGen has none: objective.max_weight=inf)
    max_weight: float = 5.0
    #: h_bins (h(r) / its mean in bins of the unit time u; ours) | ratio_bins (the official order: h(r / mean of r in
    #: bins of equal width in the schedule's time) / batch mean; NVlabs/FastGen
    #: fastgen/methods/distribution_matching/f_distill.py:72-108)
    normalization: str = "h_bins"
    #: r clipped below at ratio_lower after the logit clamp (FastGen: 0.1, configs/methods/config_f_distill.py:28;
    #: its logit clamp is +-10, f_distill.py:67-69)
    ratio_lower: float = 0.0
    #: r clipped above at ratio_upper (FastGen: 20, config_f_distill.py:29)
    ratio_upper: float = math.inf
    #: the density ratio's discriminator: a head on the critic's features (or on frozen teacher features)
    discriminator: str = "critic"
    #: L_G (gan_weight > 0) at the f-distill x_t from the logits the ratio reads (FastGen, f_distill.py:139-169) |
    #: false: at the GAN's own t (gan_t_dist)
    gan_at_fdistill_t: bool = False
    #: none | fastgen: sets the keys of onestep.objectives.fdistill.FASTGEN (FastGen's log_ratio_clamp 10, ratio
    #: bounds 0.1 / 20, no max_weight, ratio_bins, discriminator=teacher, gan_weight 1e-3, gan_at_fdistill_t);
    #: NVlabs/FastGen fastgen/methods/distribution_matching/f_distill.py:59-169, configs/methods/config_f_distill.py:28-34
    preset: str = "none"


@register_objective
class FDistill(CriticObjective):
    name = "fdistill"
    Config = FDistillConfig

    def __init__(self, cfg, generate):
        cfg = with_preset(cfg)
        super().__init__(cfg, generate)
        if cfg.divergence not in H:
            raise ConfigError(f"objective.divergence='{cfg.divergence}' is unknown; choose one of {sorted(H)}")
        if cfg.discriminator == "none":
            raise ConfigError("objective=fdistill reads the density ratio from a discriminator; set "
                              "objective.discriminator=critic (or teacher)")
        if cfg.log_ratio_clamp <= 0 or cfg.time_bins < 1 or cfg.max_weight <= 0:
            raise ConfigError(f"objective.log_ratio_clamp={cfg.log_ratio_clamp} and max_weight={cfg.max_weight} "
                              f"must be > 0, time_bins={cfg.time_bins} >= 1")
        if cfg.normalization not in NORMALIZATIONS:
            raise ConfigError(f"objective.normalization='{cfg.normalization}' is unknown; choose one of {NORMALIZATIONS}")
        if not 0 <= cfg.ratio_lower < cfg.ratio_upper:
            raise ConfigError(f"objective.ratio_lower={cfg.ratio_lower}, ratio_upper={cfg.ratio_upper} must satisfy "
                              "0 <= ratio_lower < ratio_upper (FastGen: 0.1, 20)")
        check_t_range(cfg)

    def accumulation_refusal(self):
        return (f"objective.normalization={self.cfg.normalization} divides the density-ratio weights by their means "
                "over the batch")

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        x = self.generate(nets, batch)
        c = self.cfg

        u = eps = logits = None
        if c.gan_at_fdistill_t and c.gan_weight > 0:  # one D(x_t) for the ratio (detached) and for L_G (FastGen)
            sched = nets.teacher.schedule
            u = c.t_lo + (c.t_hi - c.t_lo) * torch.rand(x.shape[0], dtype=torch.float64)
            t = sched.t_from_unit(u).to(device=x.device, dtype=x.dtype)
            x_t, eps = noised(sched, x, t)
            logits = self.gan.generator_logits(nets, x_t, t, batch.cond)

        def logit_fn(x_t, t):
            if logits is not None:
                return logits  # D at this x_t: fdistill_gradient noises x with the same eps at the same u
            with frozen(nets.critic, nets.modules.get("disc")):
                return self.gan.logits(nets, x_t, t, batch.cond)

        grad, logs = fdistill_gradient(nets.teacher, nets.critic, x, logit_fn, batch.cond, divergence=c.divergence,
                                       log_ratio_clamp=c.log_ratio_clamp, time_bins=c.time_bins,
                                       max_weight=c.max_weight, lo=c.t_lo, hi=c.t_hi, u=u, eps=eps,
                                       normalization=c.normalization, ratio_lower=c.ratio_lower,
                                       ratio_upper=c.ratio_upper)
        loss = surrogate_loss(x, grad)
        return self.with_gan(loss, {"fdiv": loss.detach(), **logs}, nets, x, batch.cond, logits)


def with_preset(cfg):
    """cfg with its preset's keys set (a copy; ``preset=none`` returns cfg). A key the run set to another value than
    both its default and the preset's is a conflict, not silently overwritten."""
    if cfg.preset not in PRESETS:
        raise ConfigError(f"objective.preset='{cfg.preset}' is unknown; choose one of {PRESETS}")
    if cfg.preset == "none":
        return cfg
    defaults = {f.name: f.default for f in fields(FDistillConfig)}
    for key, value in FASTGEN.items():
        if getattr(cfg, key) not in (defaults[key], value):
            raise ConfigError(f"objective.preset=fastgen sets {key}={value}; drop objective.{key}={getattr(cfg, key)} "
                              "or objective.preset")
    cfg = copy.copy(cfg)
    for key, value in FASTGEN.items():
        setattr(cfg, key, value)
    return cfg
