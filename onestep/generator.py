"""The one-/few-step generator: a Denoiser (initialized from the teacher's net) used as an x0 map.

1 step:  x = G.x0(sigma(t_0) z, t_0).
n steps: on the t-list t_0 > ... > t_{n-1}: x0 = G.x0(x_{t_i}, t_i), then x_{t_{i+1}} is re-noised from
x0 (``renoise``, as DMD2/consistency models sample) or moved by DDIM; the output is the last x0.
Training a multi-step student uses DMD2's *backward simulation* (Yin et al. 2024b, Sec. 4.5): a random
step i is picked, the student's own chain produces x_{t_i} without gradients, and the generator's output
at that step carries the gradient, so training inputs match what the student sees at inference.
"""

from __future__ import annotations

import math

import torch

from onestep.denoisers.base import Denoiser
from onestep.errors import ConfigError
from onestep.core import Batch, Nets
from onestep.core import noised
from onestep.sampling import METHODS, check_ts, sample


class Student:
    def __init__(self, schedule, steps: int = 1, ts=None, method: str = "renoise", sigma_init: float | None = None):
        if method not in ("renoise", "ddim"):
            raise ConfigError(f"generator.method '{method}' is not a student sampler; use renoise or ddim "
                             f"(teacher samplers: {METHODS})")
        self.schedule = schedule
        self.t_start = schedule.t_max
        if sigma_init is not None:
            if sigma_init <= 0:
                raise ConfigError(f"generator.sigma_init={sigma_init} must be > 0 (a noise level sigma/alpha)")
            logsnr = torch.tensor(-2 * math.log(sigma_init), dtype=torch.float64)
            self.t_start = float(schedule.t_of_logsnr(logsnr).clamp(schedule.t_min, schedule.t_max))
        self.ts = check_ts(self.ts_for(steps) if ts is None else ts, schedule)
        self.method = method

    @classmethod
    def from_config(cls, schedule, gc) -> "Student":
        """The student of a run's ``generator`` config section (the one place that reads it for the sampler)."""
        return cls(schedule, gc.steps, gc.ts, gc.method, gc.sigma_init)

    def ts_for(self, steps: int) -> torch.Tensor:
        """The schedule's student t-list from the start time (Schedule.student_ts: evenly spaced; DMD2's integer
        timesteps on SD tables; through the shift on flow schedules)."""
        return self.schedule.student_ts(self.t_start, steps)

    def train_sample(self, nets: Nets, batch: Batch) -> torch.Tensor:
        g, noise = nets.generator, batch.noise
        i = 0 if len(self.ts) == 1 else int(torch.randint(0, len(self.ts), ()))
        t = self.ts[i].to(noise).expand(noise.shape[0])
        if i == 0:
            x_t = noise * g.schedule.prior_std(self.ts[0]).to(noise)
        else:
            # backward simulation: the student's own chain up to step i, then renoise to t_i
            with torch.no_grad():
                x0 = sample(g, noise, self.ts[:i], batch.cond, method=self.method)
            x_t, _ = noised(g.schedule, x0, t)
        return g.x0(x_t, t, batch.cond)

    @torch.no_grad()
    def sample(self, generator: Denoiser, noise: torch.Tensor, cond=None, steps: int | None = None,
               rng: torch.Generator | None = None) -> torch.Tensor:
        ts = self.ts if steps in (None, len(self.ts)) else self.ts_for(steps)
        return sample(generator, noise, ts, cond, method=self.method, generator=rng)

