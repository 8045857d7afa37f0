"""TSCD: Trajectory Segmented Consistency Distillation, the first part of Hyper-SD (Ren, Xia, Lu, Zhang, Wu, Xie, Wang &
Xiao 2024, "Hyper-SD: Trajectory Segmented Consistency Model for Efficient Image Synthesis", NeurIPS, arXiv 2404.13686,
Sec. 3.1 and Fig. 2). Written from the paper's text; no official training code was consulted.

On cd.py's discretization sig_1 < ... < sig_N (pairs n = 0 .. N-2 between levels n and n+1, 0-based), the range is cut
into k segments at the levels b_j = round(j (N - 1) / k), j = 0 .. k; the pair n belongs to segment i when
b_i <= n < b_{i+1}, and its segment's lower boundary ("t_end" of the paper) is s = t(sig_{b_i}). Within a segment the
student is a consistency function onto s, reparametrized from its x0 prediction by one DDIM step (Song et al. 2021,
DDIM eq. 12 with eta = 0):
    F_theta(x_t, t; s) = alpha_s x0_theta + sigma_s (x_t - alpha_t x0_theta) / sigma_t            (F(x, s; s) = x)
and the lowest segment (i = 0) maps to x0 itself: F_theta = x0_theta, cd.py's consistency function. Per sample, with
    x_{n+1} = alpha x0 + sigma eps,   x^_n = one teacher ODE step t_{n+1} -> t_n                        (CM eq. 7)
    L = lambda(sig_n) d( F_theta(x_{n+1}, t_{n+1}; s), F_theta-(x^_n, t_n; s) )           Hyper-SD Sec. 3.1, L_TSCD
the target is the stop-grad (or EMA) student after the teacher step, mapped to the SAME boundary s (at n = b_i it is
x^_n itself: the segment's boundary condition). Training merges the segments progressively, k = 8 -> 4 -> 2 -> 1
(Hyper-SD Sec. 3.1; ``objective.segments`` with ``objective.stage_steps`` the lengths of every stage but the last,
which runs to the end). The last stage k = 1 is cd.py's loss exactly, so the 1-step student samples as any consistency
model; a student whose last stage has k segments samples with k DDIM steps on the segment boundaries
(``generator.method=ddim generator.ts=[t(sig_{b_k}), ..., t(sig_{b_1})]``, ``boundary_ts``). Hyper-SD adds an
adversarial term to the MSE inside each segment (and human feedback / score distillation after TSCD); this file is
the consistency part alone, with cd.py's distance and weighting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from onestep.core import noised
from onestep.errors import ConfigError
from onestep.objectives import consistency as C
from onestep.objectives.base import Batch, Nets, register_objective
from onestep.objectives.cd import CDConfig, ConsistencyDistillation
from onestep.schedules import bcast


@dataclass
class TSCDConfig(CDConfig):
    name: str = "tscd"
    #: segments per stage, merged progressively (Hyper-SD Sec. 3.1: 8 -> 4 -> 2 -> 1)
    segments: list[int] = field(default_factory=lambda: [8, 4, 2, 1])
    #: generator steps of every stage but the last (which runs to trainer.steps)
    stage_steps: list[int] = field(default_factory=lambda: [200, 200, 200])
    #: 17 levels = 16 pairs: the 8 / 4 / 2 segment boundaries fall on levels of one grid
    num_scales: int = 17


def boundaries(n_levels: int, k: int) -> torch.Tensor:
    """b_0 = 0 < b_1 < ... < b_k = N - 1: the grid levels where the k segments meet (round(j (N - 1) / k))."""
    if not 1 <= k <= n_levels - 1:
        raise ConfigError(f"{k} segments need at least {k} pairs of noise levels, the grid has {n_levels - 1}: raise "
                          f"objective.num_scales to >= {k + 1} or use fewer objective.segments")
    return torch.round(torch.arange(k + 1, dtype=torch.float64) * (n_levels - 1) / k).long()


def boundary_ts(schedule, n_levels: int, k: int, rho: float = 7.0) -> torch.Tensor:
    """The k-step t-list of a k-segment student: the segments' upper ends t(sig_{b_k}) > ... > t(sig_{b_1})."""
    sigmas = C.karras_sigmas(n_levels, *C.sigma_range(schedule), rho)
    ts = C.t_of_sigma(schedule, sigmas[boundaries(n_levels, k)[1:]]).flip(0)
    ts[0] = schedule.t_max  # (the top level's time, without the round trip through sigma)
    return ts


def to_boundary(x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, schedule,
                lowest: torch.Tensor) -> torch.Tensor:
    """F(x, t; s): one DDIM step (eta = 0) from (x, t) to s with the x0 prediction ``x0``; x0 itself where ``lowest``
    (the segment ending at the data); exactly x where t == s (the boundary condition)."""
    a_t, s_t, a_s, s_s = (bcast(v, x) for v in (schedule.alpha(t), schedule.sigma(t), schedule.alpha(s),
                                                 schedule.sigma(s)))
    out = a_s * x0 + s_s * (x - a_t * x0) / s_t  # DDIM eq. (12), eta = 0
    out = torch.where(bcast(t == s, x), x, out)
    return torch.where(bcast(lowest, x), x0, out)


@register_objective
class TSCD(ConsistencyDistillation):
    name = "tscd"
    Config = TSCDConfig

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        seg, steps = list(cfg.segments), list(cfg.stage_steps)
        if not seg or any(k < 1 for k in seg) or any(a <= b for a, b in zip(seg, seg[1:])):
            raise ConfigError(f"objective.segments={seg} must be segment counts >= 1, strictly decreasing (segments "
                              "are merged), e.g. objective.segments=[8,4,2,1]")
        if len(steps) != len(seg) - 1 or any(n < 1 for n in steps):
            raise ConfigError(f"objective.stage_steps={steps} must give the length (>= 1 step) of every stage but the "
                              f"last ({len(seg) - 1} numbers for segments={seg}); the last stage runs to trainer.steps")
        if not cfg.curriculum_steps:
            boundaries(cfg.num_scales, seg[0])
        self.starts = [sum(steps[:i]) for i in range(len(seg))]

    def segments_at(self, step: int) -> int:
        """k of the stage ``step`` falls in."""
        return [k for k, start in zip(self.cfg.segments, self.starts) if step >= start][-1]

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        p = self.segment_pairs(nets, batch, step)
        c, sched = self.cfg, nets.generator.schedule
        x0_hat = nets.generator.x0(p["x_hi"], p["t_hi"], batch.cond)
        f = to_boundary(x0_hat, p["x_hi"], p["t_hi"], p["t_end"], sched, p["lowest"])
        wdtype = torch.promote_types(f.dtype, torch.float32)
        d = C.distance(f.to(wdtype), p["target"].to(wdtype), c.distance, c.huber_c or None)
        loss = (C.pair_weight(p["sig_lo"], p["sig_hi"], c.weighting).to(d) * d).mean()
        return {"loss": loss, "consistency": d.mean().detach(), "segments": torch.tensor(float(p["segments"])),
                "scales": torch.tensor(float(p["scales"]))}

    def segment_pairs(self, nets: Nets, batch: Batch, step: int) -> dict:
        """The pairs, each pair's segment boundary t_end and the target F_theta-(x^_n, t_n; t_end)."""
        if batch.real is None:
            raise ConfigError(f"objective '{self.name}' needs data samples (x0) but the data source gives none; "
                              "use data with real samples (data=gmm)")
        c, sched, x0 = self.cfg, nets.generator.schedule, batch.real
        n_scales, k = self.scales(step), self.segments_at(step)
        sigmas = C.karras_sigmas(n_scales, *C.sigma_range(sched), c.rho)
        bounds = boundaries(n_scales, k)
        idx = torch.multinomial(C.index_probs(sigmas, c.time_sampling, c.p_mean, c.p_std), x0.shape[0],
                                replacement=True)
        seg = torch.searchsorted(bounds, idx, right=True) - 1  # b_seg <= idx < b_{seg+1}
        sig_lo, sig_hi, sig_end = sigmas[idx], sigmas[idx + 1], sigmas[bounds[seg]]
        t_lo, t_hi, t_end = (C.t_of_sigma(sched, s).to(x0) for s in (sig_lo, sig_hi, sig_end))
        lowest = (seg == 0).to(x0.device)
        x_hi, eps = noised(sched, x0, t_hi)
        with torch.no_grad():
            x_lo = self._step(nets, x0, eps, x_hi, t_hi, t_lo, batch.cond)
            target = to_boundary(self._target(nets).x0(x_lo, t_lo, batch.cond), x_lo, t_lo, t_end, sched, lowest)
        return {"x_hi": x_hi, "t_hi": t_hi, "x_lo": x_lo, "t_lo": t_lo, "t_end": t_end, "lowest": lowest,
                "target": target, "sig_lo": sig_lo, "sig_hi": sig_hi, "segments": k, "scales": n_scales}
