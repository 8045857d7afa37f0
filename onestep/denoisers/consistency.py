"""Consistency-model boundary parametrization on top of any Denoiser (``generator.consistency_boundary``).

Consistency models need f(x, t_min) = x exactly (Song et al. 2023, eq. (7) and App. C):
    f = c_skip(sig) x~ + c_out(sig) F,  c_skip = sd^2 / ((sig - sig_min)^2 + sd^2),  c_out = sd (sig - sig_min) / sqrt(sd^2 + sig^2)
in the schedule-free variables x~ = x_t / alpha, sig = sigma / alpha. The base denoiser D is EDM-preconditioned
(Karras et al. 2022, Table 1): D = c_skip^E x~ + c_out^E F with c_skip^E = sd^2 / (sig^2 + sd^2),
c_out^E = sig sd / sqrt(sig^2 + sd^2). Eliminating F (c_out / c_out^E = (sig - sig_min) / sig =: k) gives
    f = k D + (c_skip - k c_skip^E) x~,
which is exact for the project's MLPs and still a valid boundary-respecting map for any other D. Away from
t_min, f and D differ by O(sig_min / sig), so a teacher-initialized student starts as a good denoiser.
"""

from __future__ import annotations

import torch

from onestep.denoisers.base import Denoiser
from onestep.schedules import bcast


class ConsistencyBoundary(Denoiser):
    prediction = "x0"

    def __init__(self, base: Denoiser, sigma_data: float = 0.5):
        super().__init__()
        self.base, self.sigma_data = base, float(sigma_data)
        self.schedule, self.data_shape, self.num_classes = base.schedule, base.data_shape, base.num_classes
        t_min = torch.tensor(self.schedule.t_min, dtype=torch.float64)
        self.sig_min = float(self.schedule.sigma(t_min) / self.schedule.alpha(t_min))

    def forward(self, x_t, t, cond=None):
        t = self._time(t, x_t)
        a = bcast(self.schedule.alpha(t), x_t)
        sig = bcast(self.schedule.sigma(t), x_t) / a
        sd2 = self.sigma_data**2
        k = (sig - self.sig_min) / sig
        c_skip = sd2 / ((sig - self.sig_min) ** 2 + sd2)
        c_skip_edm = sd2 / (sig**2 + sd2)
        return k * self.base.x0(x_t, t, cond) + (c_skip - k * c_skip_edm) * (x_t / a)
