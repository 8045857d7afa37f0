"""Training-free conversion of any Denoiser into a TrigFlow velocity model (as SANA-Sprint does for flow models).

TrigFlow (Lu & Song 2024, Sec. 2): x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I), t in [0, pi/2], with
velocity dx_t/dt = -sin(t) x0 + cos(t) z, i.e. alpha = cos t, sigma = sigma_d sin t in the eps convention.

A source schedule (VP, EDM, rectified flow, ...) with x_s = a(s) x0 + b(s) eps reaches the same SNR at
    s(t) = src.t_of_logsnr(logsnr_trig(t)),   logsnr_trig(t) = 2 log(cos t / (sigma_d sin t)),
and x/alpha is schedule-free, so the TrigFlow point x_t corresponds to x_s = x_t a(s) / cos t. The source's
(x0, eps) at (x_s, s) are the TrigFlow (x0, eps) at (x_t, t); the TrigFlow velocity follows from param.py.
All maps are smooth closed forms, so forward-mode AD (the sCM tangent) flows through the conversion.
"""

from __future__ import annotations

import math

import torch

from onestep.denoisers.base import Denoiser
from onestep.errors import ConfigError
from onestep.schedules import Schedule, TrigFlow, bcast


def trigflow_range(src: Schedule, sigma_data: float) -> tuple[float, float]:
    """The TrigFlow times whose SNR lies inside ``src``'s [t_min, t_max] (SNR decreases with t in both)."""
    hi_snr, lo_snr = (src.logsnr(torch.tensor(v, dtype=torch.float64)) for v in (src.t_min, src.t_max))
    trig = TrigFlow(sigma_data)
    return float(trig.t_of_logsnr(hi_snr)), float(trig.t_of_logsnr(lo_snr))


class TrigFlowDenoiser(Denoiser):
    """``base`` seen as a TrigFlow model with data std ``sigma_data``. Native prediction x0 (so no schedule
    derivative enters a JVP); ``.flow()`` / :func:`velocity` give the TrigFlow velocity.

    Its schedule is TrigFlow restricted to the times whose SNR the source schedule covers, so callers that
    sample t from ``self.schedule`` never ask the source for a noise level it was not trained on.
    """

    prediction = "x0"

    def __init__(self, base: Denoiser, sigma_data: float = 0.5):
        super().__init__()
        if sigma_data <= 0:
            raise ConfigError(f"sigma_data={sigma_data} must be > 0 (the data standard deviation of TrigFlow)")
        self.base, self.sigma_data = base, float(sigma_data)
        t_min, t_max = trigflow_range(base.schedule, sigma_data)
        self.schedule = TrigFlow(sigma_data, t_min=t_min, t_max=min(t_max, math.pi / 2 - 1e-6))
        self.data_shape, self.num_classes = base.data_shape, base.num_classes

    def source_point(self, x_t: torch.Tensor, t: torch.Tensor):
        """(x_s, s): the source schedule's point with the SNR of TrigFlow's (x_t, t)."""
        src = self.base.schedule
        s = src.t_of_logsnr(self.schedule.logsnr(t))
        return x_t * bcast(src.alpha(s) / torch.cos(t), x_t), s

    def forward(self, x_t, t, cond=None):
        t = self._time(t, x_t)
        x_s, s = self.source_point(x_t, t)
        return self.base.x0(x_s, s, cond)


def as_trigflow(denoiser: Denoiser, sigma_data: float = 0.5) -> Denoiser:
    """The denoiser itself when it already is TrigFlow with this sigma_data, else the exact conversion."""
    sched = denoiser.schedule
    if isinstance(sched, TrigFlow) and sched.sigma_data == sigma_data:
        return denoiser
    return TrigFlowDenoiser(denoiser, sigma_data)


def velocity(model: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """TrigFlow velocity of a TrigFlow-scheduled denoiser: x0 = cos t x_t - sin t v  =>  v = (cos t x_t - x0) / sin t."""
    c, s = bcast(torch.cos(t), x_t), bcast(torch.sin(t), x_t)
    return (c * x_t - model.x0(x_t, t, cond)) / s
