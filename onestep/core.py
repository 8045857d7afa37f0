"""Core types and the forward process, shared by the generator, the data sources and the objectives.

    Batch   what a data source yields: generator noise, the conditioning (onestep.conditioning.Cond) and
            optionally real samples
    Nets    what an objective sees: the frozen (guided) teacher, the trained generator / critic views, extra
            trained modules (heads) and non-optimized targets; built by train/networks.py
    sample_t, noised, dsm_loss   the forward process x_t = alpha(t) x0 + sigma(t) eps and denoising score matching
    dsm_t, lognormal_t           the noise levels of a critic's DSM update (``objective.critic_t_dist``)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from onestep import param
from onestep.denoisers.base import Denoiser
from onestep.errors import ConfigError
from onestep.schedules import EDM, Schedule, bcast

WEIGHTINGS = ("edm", "eps", "x0", "v", "alpha2_eps")
#: distributions of an objective's noise level t (``objective.t_dist``; see sample_t)
T_DISTS = ("unit", "grid", "karras")
#: distributions of a critic's DSM noise level (``objective.critic_t_dist``; see dsm_t)
CRITIC_T_DISTS = ("unit", "grid", "lognormal")
#: EDM's training draw sigma = exp(P_MEAN + P_STD N(0, 1)) (EDM Table 1), SiD's fake-score update
#: (mingyuanzhou/SiD training/sid_loss.py:18, :59-60)
P_MEAN, P_STD = -1.2, 1.2
#: points of the discrete training grid DMD2 and SiD-LSG index (their num_train_timesteps) on continuous schedules
GRID_STEPS = 1000


@dataclass
class Batch:
    noise: torch.Tensor  # standard normal, generator input
    cond: object = None  # onestep.conditioning.Cond (class labels, prompt embeddings) or None
    real: torch.Tensor | None = None  # real data samples (objectives that use data)


@dataclass
class Nets:
    """An objective's view of the run's networks. Trained views carry gradients to their own parameters only;
    ``targets`` (e.g. a consistency EMA target) are updated by the trainer after each generator step."""

    teacher: Denoiser
    generator: Denoiser
    critic: Denoiser | None = None
    modules: dict[str, nn.Module] = field(default_factory=dict)  # extra trained modules (heads), by name
    targets: dict[str, Denoiser] = field(default_factory=dict)  # non-optimized copies of the generator, by name



def sample_t(schedule: Schedule, n: int, lo: float = 0.0, hi: float = 1.0, like: torch.Tensor | None = None,
             dist: str = "unit"):
    """n noise levels t of ``schedule``; lo, hi are fractions of its range, read by ``dist``:

    unit    t = schedule.t_from_unit(u), u ~ U[lo, hi]: log-uniform sigma on EDM, uniform t on VP / flow tables
            (DMD's t ~ U[0.02, 0.98] T is lo=0.02, hi=0.98)
    grid    an integer k uniform in [round(lo N), round(hi N)] of the schedule's N-point training grid (N =
            GRID_STEPS, or a discrete table's size): EDM's Karras rho-grid ascending, sigma_k = ramp(k / (N - 1)),
            else t = t_from_unit(k / (N - 1)) (on SD's table: timestep k). DMD2's draw: tianweiy/DMD2
            main/edm/edm_guidance.py:61-70 (flipped get_sigmas_karras, min_step = int(0.02 N), max_step =
            int(0.98 N)) and :82-92 (randint(min_step, max_step + 1) -> karras_sigmas[k]); main/sd_guidance.py:84-85,
            :179-185 (the same indices into the SD table)
    karras  sigma = ramp(u), u ~ U[lo, hi] continuous: SiD's draw, mingyuanzhou/SiD training/sid_loss.py:27-33
            (rnd_t ~ U[0, tmax/1000), tmax = 800: sigma <= 24.4 on EDM's 0.002..80)
    ramp(u) = (s_min^(1/rho) + u (s_max^(1/rho) - s_min^(1/rho)))^rho on the schedule's sigma/alpha range (karras_t).
    """
    if dist not in T_DISTS:
        raise ConfigError(f"objective.t_dist='{dist}' is unknown; choose one of {T_DISTS}")
    if dist == "grid":
        size = getattr(schedule, "num_steps", GRID_STEPS)
        k = torch.randint(round(lo * size), min(round(hi * size), size - 1) + 1, (n,), dtype=torch.int64)
        u = k.to(torch.float64) / (size - 1)
        t = karras_t(schedule, u) if isinstance(schedule, EDM) else schedule.t_from_unit(u)
    else:
        u = lo + (hi - lo) * torch.rand(n, dtype=torch.float64)
        t = karras_t(schedule, u) if dist == "karras" else schedule.t_from_unit(u)
    return t if like is None else t.to(device=like.device, dtype=like.dtype)


def karras_t(schedule: Schedule, u: torch.Tensor) -> torch.Tensor:
    """The time of noise level sig = sigma/alpha = (s_min^(1/rho) + u (s_max^(1/rho) - s_min^(1/rho)))^rho, u in [0, 1]
    (EDM eq. (5)'s ramp; rho = the schedule's, else 7), s_min / s_max at the schedule's t_min / t_max, mapped back
    by SNR (on EDM t = sig)."""
    rho = getattr(schedule, "rho", 7.0)
    ends = torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64)
    a, b = (schedule.sigma(ends) / schedule.alpha(ends)) ** (1 / rho)
    sig = (a + u * (b - a)) ** rho
    return schedule.t_of_logsnr(-2 * torch.log(sig)).clamp(schedule.t_min, schedule.t_max)


def lognormal_t(schedule: Schedule, n: int, p_mean: float = P_MEAN, p_std: float = P_STD,
                like: torch.Tensor | None = None) -> torch.Tensor:
    """t whose noise level sigma / alpha is exp(p_mean + p_std N(0, 1)) (EDM's training draw), mapped by SNR on
    schedules that are not EDM (on EDM t = sigma) and clamped to the schedule's range."""
    sig = torch.exp(p_mean + p_std * torch.randn(n, dtype=torch.float64))
    t = schedule.t_of_logsnr(-2 * torch.log(sig)).clamp(schedule.t_min, schedule.t_max)
    return t if like is None else t.to(device=like.device, dtype=like.dtype)


def dsm_t(schedule: Schedule, n: int, dist: str = "unit", like: torch.Tensor | None = None, lo: float = 0.0,
          hi: float = 1.0, p_mean: float = P_MEAN, p_std: float = P_STD) -> torch.Tensor:
    """n noise levels of a critic's DSM update (the fake score trained on generator samples); unit and grid read the
    fractions [lo, hi] of the schedule's range as sample_t does (the whole range by default):

    unit       u ~ U[0, 1] through the schedule (sample_t): log-uniform sigma on EDM (median 0.40 on 0.002..80),
               uniform t on VP / flow tables; dsm_loss's own draw
    grid       an integer index uniform over the N points of the training grid (sample_t's grid): on EDM DMD2's
               fake-score draw karras_sigmas[randint(0, 1000)] (median sigma 2.53; tianweiy/DMD2
               main/edm/edm_guidance.py:138-145), on SD's table timesteps 0..999 (main/sd_guidance.py:271-277); SiD-LSG's
               randint(20, 980) is lo 0.02, hi 0.979 (mingyuanzhou/SiD-LSG training/sid_training_loop.py:172-173, :413)
    lognormal  sigma / alpha = exp(p_mean + p_std N(0, 1)) (lognormal_t): SiD's fake-score draw, P_mean -1.2, P_std 1.2
               (mingyuanzhou/SiD training/sid_loss.py:18, :59-60), mapped to t by SNR on schedules that are not EDM
    """
    if dist not in CRITIC_T_DISTS:
        raise ConfigError(f"objective.critic_t_dist='{dist}' is unknown; choose one of {CRITIC_T_DISTS}")
    if dist == "lognormal":
        return lognormal_t(schedule, n, p_mean, p_std, like=like)
    return sample_t(schedule, n, lo, hi, like=like, dist=dist)


def noised(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor | None = None):
    """x_t = alpha(t) x0 + sigma(t) eps; returns (x_t, eps)."""
    eps = torch.randn_like(x0) if eps is None else eps
    return bcast(schedule.alpha(t), x0) * x0 + bcast(schedule.sigma(t), x0) * eps, eps


def vp_frame(schedule: Schedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of the variance-preserving schedule with the same SNR as ``schedule`` at t: alpha / r, sigma / r,
    r = sqrt(alpha^2 + sigma^2). On VP schedules that is (alpha, sigma) itself (alpha^2 = alphabar_t, sigma^2 =
    1 - alphabar_t); x0 and eps predictions are the same in both frames, so weights written in VP terms by the
    official codes (SwiftBrush's sigma_t^2, alpha_t^2) carry over to EDM and flow schedules through it."""
    a, s = schedule.alpha(t), schedule.sigma(t)
    r = torch.sqrt(a**2 + s**2)
    return a / r, s / r


def dsm_loss(denoiser: Denoiser, x0: torch.Tensor, cond=None, *, weighting: str = "edm", sigma_data: float = 0.5,
             t: torch.Tensor | None = None, lo: float = 0.0, hi: float = 1.0,
             eps: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising score matching, mean over the batch (at given t and noise eps when passed).

    weighting "edm": lambda ||D - x0||^2 with lambda = (sig^2 + sd^2) / (sig sd)^2, sig = sigma/alpha
    (EDM eq. (8) with Table 1's lambda: unit weight on the raw network output); "eps"/"x0"/"v": plain MSE
    of that prediction against its exact target; "alpha2_eps": alpha_t^2 ||eps_hat - eps||^2 with alpha_t^2 =
    alphabar_t in VP terms (vp_frame), SwiftBrush's LoRA loss (VinAIResearch/SwiftBrush train_swiftbrush.py:817-822).
    """
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"critic weighting '{weighting}' is unknown; choose one of {WEIGHTINGS}")
    sched = denoiser.schedule
    t = sample_t(sched, x0.shape[0], lo, hi, like=x0) if t is None else t
    x_t, eps = noised(sched, x0, t, eps)
    if weighting == "edm":
        sig = bcast(sched.sigma(t) / sched.alpha(t), x0)
        lam = (sig**2 + sigma_data**2) / (sig * sigma_data) ** 2
        err = lam * (denoiser.x0(x_t, t, cond) - x0) ** 2
    elif weighting == "alpha2_eps":
        a_vp = bcast(vp_frame(sched, t)[0], x0)
        err = a_vp**2 * (denoiser.predict("eps", x_t, t, cond) - eps) ** 2
    else:
        target = param.from_x0_eps(x0, eps, weighting, t, sched)
        err = (denoiser.predict(weighting, x_t, t, cond) - target) ** 2
    return err.flatten(1).mean(1).mean()
