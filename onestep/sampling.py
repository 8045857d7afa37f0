"""One sampler signature for teachers and students (k-diffusion style).

    sample(denoiser, noise, ts, cond=None, method="euler", guidance=None, generator=None, callback=None)

``ts`` is a strictly decreasing list of times at which the denoiser is evaluated; x starts at
x_{ts[0]} = prior_std(ts[0]) * noise (sigma(ts[0]); 1 at t_max of diffusers' discrete tables), every method
steps ts[i] -> ts[i+1], and the last step jumps from ts[-1] to clean data with the x0 prediction.
So ``len(ts)`` is the number of denoiser evaluations for the first-order methods (Heun: 2 len(ts) - 1).

Methods
  euler      Euler on the probability-flow ODE dx/dt = u(x, t) (u = flow prediction)
  heun       Heun (EDM Alg. 1) on the same ODE; the final step to t=0 is a plain x0 jump
  ddim       x_s = a_s x0 + s_s eps (DDIM, eta = 0; first order, exact for a single data point)
  ancestral  DDPM posterior q(x_s | x_t, x0_hat) sampling (stochastic, any schedule)
  renoise    consistency / DMD2 multi-step: x_s = a_s x0_hat + s_s * fresh noise (stochastic)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from onestep.denoisers.base import Denoiser, guided
from onestep.errors import ConfigError
from onestep.schedules import bcast

METHODS = ("euler", "heun", "ddim", "ancestral", "renoise")


def check_ts(ts, schedule=None) -> torch.Tensor:
    ts = torch.as_tensor(ts, dtype=torch.float64).flatten()
    if ts.numel() == 0:
        raise ConfigError("the t-list is empty; give at least one sampling time")
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ConfigError(f"the t-list {ts.tolist()} must be strictly decreasing (start near t_max, end near 0)")
    if schedule is not None:
        schedule.check_t(ts, "the t-list")
    return ts


@torch.no_grad()
def sample(denoiser: Denoiser, noise: torch.Tensor, ts: Sequence[float] | torch.Tensor, cond=None, *,
           method: str = "euler", guidance: float | None = None, generator: torch.Generator | None = None,
           callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    if method not in METHODS:
        raise ConfigError(f"sampler method '{method}' is unknown; choose one of {METHODS}")
    model = guided(denoiser, guidance) if guidance not in (None, 1.0) else denoiser
    sched = model.schedule
    ts = check_ts(ts, sched)
    x = noise * sched.prior_std(ts[0].to(device=noise.device, dtype=noise.dtype))
    return _integrate(model, x, ts, cond, method, generator, callback)


@torch.no_grad()
def hybrid_sample(teacher: Denoiser, student: Denoiser, noise: torch.Tensor, ts: Sequence[float] | torch.Tensor,
                  teacher_steps: int, cond=None, *, teacher_method: str = "ddim", student_method: str = "renoise",
                  guidance: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hybrid inference of "Distilling Diversity and Control in Diffusion Models" (Gandikota & Bau, 2025, Sec. 5):
    the teacher takes the first ``teacher_steps`` steps of the student's t-list ``ts`` (where a distilled model
    loses its diversity: the layout is set there), the student runs the rest. Evaluations: len(ts) (the teacher's
    ``guidance`` doubles its share under CFG)."""
    ts = check_ts(ts, student.schedule)
    if not 1 <= teacher_steps < len(ts):
        raise ConfigError(f"hybrid sampling hands over inside the student's t-list of {len(ts)} times: "
                          f"teacher_steps={teacher_steps} must be in [1, {len(ts) - 1}] (a {len(ts)}-step student)")
    for m in (teacher_method, student_method):
        if m not in METHODS:
            raise ConfigError(f"sampler method '{m}' is unknown; choose one of {METHODS}")
    model = guided(teacher, guidance) if guidance not in (None, 1.0) else teacher
    x = noise * model.schedule.prior_std(ts[0].to(device=noise.device, dtype=noise.dtype))
    x = _integrate(model, x, ts[:teacher_steps + 1], cond, teacher_method, generator, None, to_x0=False)
    return _integrate(student, x, ts[teacher_steps:], cond, student_method, generator, None)


def _integrate(model, x, ts, cond, method, generator, callback, to_x0: bool = True):
    """Step x from ts[0] through ts; the last time jumps to the x0 prediction (``to_x0``) or is where x stops."""
    sched = model.schedule
    t_all = ts.to(device=x.device, dtype=x.dtype)
    n = len(t_all) if to_x0 else len(t_all) - 1
    for i in range(n):
        t = t_all[i].expand(x.shape[0])
        last = to_x0 and i == n - 1
        if method in ("euler", "heun") and not last:
            u = model.flow(x, t, cond)
            dt = t_all[i + 1] - t_all[i]
            x_next = x + dt * u
            if method == "heun":
                u2 = model.flow(x_next, t_all[i + 1].expand(x.shape[0]), cond)
                x_next = x + dt * 0.5 * (u + u2)
            x0 = None
        else:
            x0 = model.x0(x, t, cond)
            if last:
                x_next = x0
            else:
                x_next = _step_from_x0(method, x, x0, t_all[i], t_all[i + 1], sched, generator, model)
        if callback is not None:
            callback(i, x, x0 if x0 is not None else x_next)
        x = x_next
    return x


def _step_from_x0(method, x, x0, t, s, sched, generator, model):
    a_t, s_t, a_s, s_s = (bcast(v, x) for v in (sched.alpha(t), sched.sigma(t), sched.alpha(s), sched.sigma(s)))
    if method == "ddim":
        eps = (x - a_t * x0) / s_t
        return a_s * x0 + s_s * eps
    if method == "renoise":
        return a_s * x0 + s_s * model.randn_like(x, generator)
    # ancestral: q(x_s | x_t, x0) for the Markov chain with a_{t|s} = a_t/a_s, s_{t|s}^2 = s_t^2 - a_{t|s}^2 s_s^2
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2
    mean = (a_ts * s_s**2 / s_t**2) * x + (a_s * var_ts / s_t**2) * x0
    std = torch.sqrt((var_ts * s_s**2 / s_t**2).clamp_min(0))
    return mean + std * model.randn_like(x, generator)


def nfe(method: str, steps: int) -> int:
    """Denoiser evaluations of ``sample`` for a t-list of ``steps`` times."""
    return 2 * steps - 1 if method == "heun" else steps
