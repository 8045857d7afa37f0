"""MLCM: Multistep Latent Consistency Models (Xie, Liao, Chen, Deng, Tang & Lu 2024, "MLCM: Multistep Consistency
Distillation of Latent Diffusion Model", arXiv 2406.05768). Written from the paper's stated method (abstract and
introduction); its equations and official code were not available to this session to cite line by line.

MLCM is multistep consistency distillation (MCD, Heek, Hoogeboom & Salimans 2024, "Multistep Consistency Models"): the
noise range is cut into k segments and, inside each, the student is a consistency function onto the segment's lower
boundary, so one model samples in k steps (one per segment) and, by the same map, in other step counts. MLCM adds
  (i)  a progressive training strategy between segment counts, to strengthen the consistency between segments: the
       segment count decreases over training (k = 8 -> 4 -> 2 -> 1 here), each stage starting from the last; and
  (ii) the states of the teacher's own sampling trajectories as training data, in place of noised real images, which
       lifts the need for a high-quality dataset and matches training to inference (the student is run on states the
       teacher's sampler visits).
Both are built on tscd.py, whose segment loss (the DDIM map onto the segment boundary, the target the stop-grad / EMA
student after one teacher ODE step mapped to the same boundary) and progressive stage schedule (``segments``,
``stage_steps``) are MCD's with Hyper-SD's merge order. This file adds (ii): with ``states=teacher`` the pair
(x_{n+1}, x^_n) is two consecutive states of one teacher trajectory on cd.py's grid, started from prior noise at the top
level (``batch.noise`` scaled to the prior's std) and stepped down with the same teacher step (euler | heun) cd.py uses:
    x_N ~ prior,   x_j = Phi(x_{j+1}, t_{j+1} -> t_j)  (j = N-1 .. n),
    L = lambda(sig_n) d( F_theta(x_{n+1}, t_{n+1}; s), F_theta-(x_n, t_n; s) )                              (tscd.py)
so no data is read; ``states=data`` is TSCD's noised data (x_{n+1} = alpha x0 + sigma eps).
MLCM's preference-learning stage (reward fine-tuning after distillation) is not part of this objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onestep.errors import ConfigError
from onestep.objectives import consistency as C
from onestep.objectives.base import Batch, Nets, register_objective
from onestep.objectives.tscd import TSCD, TSCDConfig, boundaries, to_boundary

STATES = ("teacher", "data")


@dataclass
class MLCMConfig(TSCDConfig):
    name: str = "mlcm"
    #: the student's input states: teacher (consecutive states of the teacher's own ODE trajectories from prior noise,
    #: MLCM's training data; no data read) | data (noised real samples, as tscd)
    states: str = "teacher"


def teacher_trajectory(step, noise: torch.Tensor, ts: torch.Tensor, lowest: int) -> list[torch.Tensor | None]:
    """States x_j of the teacher ODE on the levels ts (increasing), from x_{N-1} = noise at the top level down to level
    ``lowest``: step(x, t, s) is one teacher step t -> s; entries below ``lowest`` are None (not computed)."""
    n = len(ts)
    states: list[torch.Tensor | None] = [None] * n
    states[n - 1] = noise
    rows = noise.shape[0]
    for j in range(n - 2, lowest - 1, -1):
        states[j] = step(states[j + 1], ts[j + 1].expand(rows), ts[j].expand(rows))
    return states


@register_objective
class MLCM(TSCD):
    name = "mlcm"
    Config = MLCMConfig

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if cfg.states not in STATES:
            raise ConfigError(f"objective.states='{cfg.states}' is unknown; choose one of {STATES}")
        if cfg.states == "teacher" and cfg.solver == "data":
            raise ConfigError("objective.solver=data steps with the data's own noise, and objective.states=teacher has "
                              "no data: pass objective.solver=heun (or euler), or objective.states=data")

    def segment_pairs(self, nets: Nets, batch: Batch, step: int) -> dict:
        if self.cfg.states == "data":
            return super().segment_pairs(nets, batch, step)
        c, sched, noise = self.cfg, nets.generator.schedule, batch.noise
        n_scales, k = self.scales(step), self.segments_at(step)
        sigmas = C.karras_sigmas(n_scales, *C.sigma_range(sched), c.rho)
        bounds = boundaries(n_scales, k)
        idx = torch.multinomial(C.index_probs(sigmas, c.time_sampling, c.p_mean, c.p_std), noise.shape[0],
                                replacement=True)
        seg = torch.searchsorted(bounds, idx, right=True) - 1  # b_seg <= idx < b_{seg+1}
        ts = C.t_of_sigma(sched, sigmas).to(noise)
        ts[-1] = sched.t_max  # (the top level's time, without the round trip through sigma)
        sig_lo, sig_hi, sig_end = sigmas[idx], sigmas[idx + 1], sigmas[bounds[seg]]
        t_lo, t_hi, t_end = ts[idx], ts[idx + 1], C.t_of_sigma(sched, sig_end).to(noise)
        lowest = (seg == 0).to(noise.device)
        rows = torch.arange(noise.shape[0], device=noise.device)
        with torch.no_grad():
            prior = noise * sched.prior_std(ts[-1:]).to(noise)
            step_fn = lambda x, t, s: self._step(nets, None, None, x, t, s, batch.cond)  # noqa: E731
            states = teacher_trajectory(step_fn, prior, ts, int(idx.min()))
            stack = torch.stack([torch.zeros_like(prior) if x is None else x for x in states])
            dev = idx.to(noise.device)
            x_hi, x_lo = stack[dev + 1, rows], stack[dev, rows]
            target = to_boundary(self._target(nets).x0(x_lo, t_lo, batch.cond), x_lo, t_lo, t_end, sched, lowest)
        return {"x_hi": x_hi, "t_hi": t_hi, "x_lo": x_lo, "t_lo": t_lo, "t_end": t_end, "lowest": lowest,
                "target": target, "sig_lo": sig_lo, "sig_hi": sig_hi, "segments": k, "scales": n_scales}
