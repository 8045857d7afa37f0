"""Consistency-model boundary parametrization on top of any Denoiser (``generator.consistency_boundary``).

Consistency models need f(x, t_min) = x exactly (Song et al. 2023, eq. (7) and App. C):
    f = c_skip(sig) x~ + c_out(sig) F,  c_skip = sd^2 / ((sig - sig_min)^2 + sd^2),  c_out = sd (sig - sig_min) / sqrt(sd^2 + sig^2)
in the schedule-free variables x~ = x_t / alpha, sig = sigma / alpha. The base denoiser D is EDM-preconditioned
(Karras et al. 2022, Table 1): D = c_skip^E x~ + c_out^E F with c_skip^E = sd^2 / (sig^2 + sd^2),
c_out^E = sig sd / sqrt(sig^2 + sd^2). Eliminating F (c_out / c_out^E = (sig - sig_min) / sig =: k) gives
    f = k D + (c_skip - k c_skip^E) x~,
which is exact for the project's MLPs and still a valid boundary-respecting map for any other D. Away from
t_min, f and D differ by O(sig_min / sig), so a teacher-initialized student starts as a good denoiser.

On a discrete diffusers table (SD-family teachers, ``vp_discrete``) the boundary is LCM's instead (Luo et al.
2023; diffusers' LCMScheduler.get_scalings_for_boundary_condition_discrete), on the table index tau:
    f = c_skip x_t + c_out D,   c_skip = sd^2 / ((10 tau)^2 + sd^2),   c_out = 10 tau / sqrt((10 tau)^2 + sd^2),
so f(x, tau = 0) = x, and a pipeline exported with a stock LCMScheduler samples exactly what the student learned.
"""

from __future__ import annotations

import torch

from onestep.denoisers.base import Denoiser
from onestep.schedules import VPDiscrete, bcast

#: LCMScheduler's ``timestep_scaling`` (its default, and the LCM / LCM-LoRA training scripts')
LCM_TIMESTEP_SCALING = 10.0


class ConsistencyBoundary(Denoiser):
    prediction = "x0"

    def __init__(self, base: Denoiser, sigma_data: float = 0.5):
        super().__init__()
        self.base, self.sigma_data = base, float(sigma_data)
        self.schedule, self.data_shape, self.num_classes = base.schedule, base.data_shape, base.num_classes
        t_min = torch.tensor(self.schedule.t_min, dtype=torch.float64)
        self.sig_min = float(self.schedule.sigma(t_min) / self.schedule.alpha(t_min))
        self.lcm = isinstance(self.schedule, VPDiscrete)

    def forward(self, x_t, t, cond=None):
        t = self._time(t, x_t)
        if self.lcm:
            tau = bcast(self.schedule.index(t) * LCM_TIMESTEP_SCALING, x_t)
            sd2 = self.sigma_data**2
            return sd2 / (tau**2 + sd2) * x_t + tau / torch.sqrt(tau**2 + sd2) * self.base.x0(x_t, t, cond)
        a = bcast(self.schedule.alpha(t), x_t)
        sig = bcast(self.schedule.sigma(t), x_t) / a
        sd2 = self.sigma_data**2
        k = (sig - self.sig_min) / sig
        c_skip = sd2 / ((sig - self.sig_min) ** 2 + sd2)
        c_skip_edm = sd2 / (sig**2 + sd2)
        return k * self.base.x0(x_t, t, cond) + (c_skip - k * c_skip_edm) * (x_t / a)
