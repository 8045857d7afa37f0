"""Exact conversions between predictions for x_t = a x0 + s eps.

Kinds:
  x0    clean-data estimate
  eps   noise estimate
  v     a eps - s x0                  (Salimans & Ho 2022; for any a, s)
  flow  u = dx_t/dt = a' x0 + s' eps  (probability-flow velocity; rectified flow: eps - x0)
  score grad log p_t(x_t) = -eps / s

Every conversion goes through the pair (x0, eps), which together with x_t are linearly related;
so a conversion is exact up to float rounding and there is a single place where each formula lives.
"""

from __future__ import annotations

import torch

from onestep.errors import ConfigError
from onestep.schedules import Schedule, bcast

KINDS = ("x0", "eps", "v", "flow", "score")


def _coeffs(schedule: Schedule, t: torch.Tensor, x: torch.Tensor, need_derivatives: bool):
    a, s = bcast(schedule.alpha(t), x), bcast(schedule.sigma(t), x)
    if not need_derivatives:
        return a, s, None, None
    da, ds = schedule.derivatives(t)
    return a, s, bcast(da, x), bcast(ds, x)


def to_x0_eps(pred: torch.Tensor, kind: str, x_t: torch.Tensor, t: torch.Tensor, schedule: Schedule):
    """(x0, eps) implied by a prediction of the given kind."""
    a, s, da, ds = _coeffs(schedule, t, x_t, kind == "flow")
    if kind == "x0":
        return pred, (x_t - a * pred) / s
    if kind == "eps":
        return (x_t - s * pred) / a, pred
    if kind == "v":
        # a x_t - s v = (a^2 + s^2) x0 ;  s x_t + a v = (a^2 + s^2) eps
        n = a * a + s * s
        return (a * x_t - s * pred) / n, (s * x_t + a * pred) / n
    if kind == "flow":
        # solve [a s; a' s'] [x0; eps] = [x_t; u]
        det = a * ds - s * da
        return (ds * x_t - s * pred) / det, (a * pred - da * x_t) / det
    if kind == "score":
        eps = -s * pred
        return (x_t - s * eps) / a, eps
    raise ConfigError(f"prediction kind '{kind}' is unknown; use one of {KINDS}")


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, kind: str, t: torch.Tensor, schedule: Schedule):
    """Prediction of the given kind from (x0, eps)."""
    a, s, da, ds = _coeffs(schedule, t, x0, kind == "flow")
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    if kind == "v":
        return a * eps - s * x0
    if kind == "flow":
        return da * x0 + ds * eps
    if kind == "score":
        return -eps / s
    raise ConfigError(f"prediction kind '{kind}' is unknown; use one of {KINDS}")


def convert(pred: torch.Tensor, src: str, dst: str, x_t: torch.Tensor, t: torch.Tensor, schedule: Schedule):
    """Convert a prediction between kinds at the same (x_t, t)."""
    if src == dst:
        return pred
    x0, eps = to_x0_eps(pred, src, x_t, t, schedule)
    return from_x0_eps(x0, eps, dst, t, schedule)
