"""Core types and the forward process, shared by the generator, the data sources and the objectives.

    Batch   what a data source yields: generator noise, the conditioning (onestep.conditioning.Cond) and
            optionally real samples
    Nets    what an objective sees: the frozen (guided) teacher, the trained generator / critic views, extra
            trained modules (heads) and non-optimized targets; built by train/networks.py
    sample_t, noised, dsm_loss   the forward process x_t = alpha(t) x0 + sigma(t) eps and denoising score matching
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from onestep import param
from onestep.denoisers.base import Denoiser
from onestep.errors import ConfigError
from onestep.schedules import Schedule, bcast

WEIGHTINGS = ("edm", "eps", "x0", "v")


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



def sample_t(schedule: Schedule, n: int, lo: float = 0.0, hi: float = 1.0, like: torch.Tensor | None = None):
    """t = schedule.t_from_unit(u), u ~ U[lo, hi] (DMD's t ~ U[0.02, 0.98] T is lo=0.02, hi=0.98)."""
    u = lo + (hi - lo) * torch.rand(n, dtype=torch.float64)
    t = schedule.t_from_unit(u)
    return t if like is None else t.to(device=like.device, dtype=like.dtype)


def noised(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor | None = None):
    """x_t = alpha(t) x0 + sigma(t) eps; returns (x_t, eps)."""
    eps = torch.randn_like(x0) if eps is None else eps
    return bcast(schedule.alpha(t), x0) * x0 + bcast(schedule.sigma(t), x0) * eps, eps


def dsm_loss(denoiser: Denoiser, x0: torch.Tensor, cond=None, *, weighting: str = "edm", sigma_data: float = 0.5,
             t: torch.Tensor | None = None, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Denoising score matching, mean over the batch.

    weighting "edm": lambda ||D - x0||^2 with lambda = (sig^2 + sd^2) / (sig sd)^2, sig = sigma/alpha
    (EDM eq. (8) with Table 1's lambda: unit weight on the raw network output); "eps"/"x0"/"v": plain MSE
    of that prediction against its exact target.
    """
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"critic weighting '{weighting}' is unknown; choose one of {WEIGHTINGS}")
    sched = denoiser.schedule
    t = sample_t(sched, x0.shape[0], lo, hi, like=x0) if t is None else t
    x_t, eps = noised(sched, x0, t)
    if weighting == "edm":
        sig = bcast(sched.sigma(t) / sched.alpha(t), x0)
        lam = (sig**2 + sigma_data**2) / (sig * sigma_data) ** 2
        err = lam * (denoiser.x0(x_t, t, cond) - x0) ** 2
    else:
        target = param.from_x0_eps(x0, eps, weighting, t, sched)
        err = (denoiser.predict(weighting, x_t, t, cond) - target) ** 2
    return err.flatten(1).mean(1).mean()
