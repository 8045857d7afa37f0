"""Pieces shared by the discrete consistency objectives (cd.py, ict.py): the noise-level discretization and
its curriculum, time sampling, loss weighting and distances (Song et al. 2023 "Consistency Models", CM;
Song & Dhariwal 2023 "Improved Techniques for Training Consistency Models", iCT).

Everything is written in the schedule-free noise level sig = sigma / alpha (EDM's sigma) and mapped to a
schedule's own time by SNR, so the same discretization serves VP, EDM, rectified-flow and TrigFlow teachers.
"""

from __future__ import annotations

import math

import torch

from onestep.errors import ConfigError
from onestep.schedules import Schedule

DISTANCES = ("l2", "pseudo_huber", "huber_mean")
#: c of the per-element pseudo-Huber LCM and MCM use (yhZhai/mcm args.py:367-370, ``--huber_c`` default 0.001)
LCM_HUBER_C = 0.001
TIME_SAMPLING = ("uniform", "lognormal")
WEIGHTINGS = ("uniform", "inv_dsigma")


def sigma_range(schedule: Schedule) -> tuple[float, float]:
    """(sig_min, sig_max) = sigma/alpha at the schedule's t_min and t_max."""
    t = torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64)
    sig = schedule.sigma(t) / schedule.alpha(t)
    return float(sig[0]), float(sig[1])


def t_of_sigma(schedule: Schedule, sig: torch.Tensor) -> torch.Tensor:
    """The schedule's time at noise level sig (logsnr = -2 log sig), clamped into its range."""
    return schedule.t_of_logsnr(-2 * torch.log(sig)).clamp(schedule.t_min, schedule.t_max)


def karras_sigmas(n: int, sig_min: float, sig_max: float, rho: float = 7.0) -> torch.Tensor:
    """CM eq. (after 5) / EDM eq. (5): n increasing levels sig_i = (sig_min^(1/rho) + (i-1)/(n-1) (sig_max^(1/rho)
    - sig_min^(1/rho)))^rho, i = 1..n (float64)."""
    if n < 2:
        raise ConfigError(f"the consistency discretization needs >= 2 noise levels, got {n}; raise objective.num_scales")
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    a, b = sig_min ** (1 / rho), sig_max ** (1 / rho)
    return (a + i * (b - a)) ** rho


def curriculum_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT eq. (5)-(6): N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1))."""
    k_prime = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def index_probs(sigmas: torch.Tensor, how: str, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """Probabilities of the N-1 adjacent pairs (sig_i, sig_{i+1}).

    uniform:   CM's n ~ U{1, N-1}.
    lognormal: iCT eq. (7), p(sig_i) ∝ erf((log sig_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((log sig_i - P_mean) / (sqrt 2 P_std)).
    """
    if how == "uniform":
        return torch.full((len(sigmas) - 1,), 1.0 / (len(sigmas) - 1), dtype=torch.float64)
    if how == "lognormal":
        cdf = torch.erf((torch.log(sigmas) - p_mean) / (math.sqrt(2) * p_std))
        p = (cdf[1:] - cdf[:-1]).clamp_min(0)
        return p / p.sum()
    raise ConfigError(f"objective.time_sampling '{how}' is unknown; choose one of {TIME_SAMPLING}")


def pair_weight(sig_lo: torch.Tensor, sig_hi: torch.Tensor, how: str) -> torch.Tensor:
    """lambda(sig_i): CM's uniform 1, or iCT Sec. 3.4's 1 / (sig_{i+1} - sig_i)."""
    if how == "uniform":
        return torch.ones_like(sig_lo)
    if how == "inv_dsigma":
        return 1 / (sig_hi - sig_lo)
    raise ConfigError(f"objective.weighting '{how}' is unknown; choose one of {WEIGHTINGS}")


def huber_c(data_shape) -> float:
    """iCT Sec. 3.3: c = 0.00054 sqrt(d), d the data dimension."""
    return 0.00054 * math.sqrt(math.prod(data_shape))


def distance(x: torch.Tensor, y: torch.Tensor, how: str, c: float | None = None) -> torch.Tensor:
    """Per-sample d(x, y): squared L2 (CM, mean over elements), pseudo-Huber sqrt(||x - y||^2 + c^2) - c (iCT eq. 8),
    or huber_mean: the mean over elements of sqrt((x - y)^2 + c^2) - c (LCM's and MCM's loss_type=huber, per element:
    yhZhai/mcm main.py:1537-1544)."""
    sq = (x - y).flatten(1).pow(2)
    if how == "l2":
        return sq.mean(1)
    if how == "pseudo_huber":
        c = huber_c(x.shape[1:]) if c is None else c
        return torch.sqrt(sq.sum(1) + c * c) - c
    if how == "huber_mean":
        c = LCM_HUBER_C if c is None else c
        return (torch.sqrt(sq + c * c) - c).mean(1)
    raise ConfigError(f"objective.distance '{how}' is unknown; choose one of {DISTANCES}")
