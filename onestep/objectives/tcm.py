"""TCM: Truncated Consistency Models (Lee, Xu, Geffner, Fanti, Kreis, Vahdat & Nie 2025, "Truncated Consistency
Models", ICLR, arXiv 2410.14895; reimplemented in NVlabs/FastGen fastgen/methods/consistency_model/TCM.py, cited below as
FastGen with line numbers).

A consistency model spends capacity on denoising small noise levels, which a 1-/2-step sampler never uses. TCM trains
in two stages. Stage 1 is an ordinary consistency model on every t (here: cd.py's CD). Stage 2 trains only on the
truncated range t >= t' (the transition time), through the two-stage model (FastGen TCM.py:82-108, ``TCMPrecond``)
    f_{theta,phi}(x, t) = f_phi(x, t)   (the frozen stage-1 model)  for t <  t'
                        = f_theta(x, t)  (the student)               for t >= t'
on cd.py's discretization sig_1 < ... < sig_N, with t' the grid level nearest to ``transition_sigma`` (log scale),
sig_k. Per sample, a pair (sig_n, sig_{n+1}) with n >= k (student and target both at t >= t'), or, for exactly
floor(B p_B) rows of the batch (FastGen TCM.py:158-172), the boundary pair (sig_{k-1}, sig_k):
    x_{n+1} = alpha x0 + sigma eps,   x^_n = one teacher ODE step t_{n+1} -> t_n                      (CM eq. 7)
    d_i     = lambda(sig_n) d( f_theta(x_{n+1}, t_{n+1}), f_{theta-,phi}(x^_n, t_n) )
    L       = mean_{non-boundary} d_i + w_B mean_{boundary} d_i                                       (FastGen TCM.py:187-191)
so the boundary rows pull the student at t' onto the frozen stage-1 model's output one step below ("boundary
samples"), and every other row is the usual consistency target (stop-grad or EMA student, cd.py). The student is never
evaluated below t' (its outputs there are untrained, and a 2-step sampler hands over at t': ``generator.ts=[80, t']``).
Defaults from FastGen's configs/methods/config_tcm.py: p_B = 0.25 (line 20), w_B = 0.1 (line 22), t' = 1.0 (EDM sigma,
line 24). FastGen's stage 2 samples continuous t from a Student-t on log t above t' with ECT's r(t); this file keeps
cd.py's discrete pairs and time sampling, restricted to the levels >= t'.

The stage-1 model is a frozen target module ``stage1`` (Objective.targets with decay 1: the trainer checkpoints it
and never moves it), filled either
    ``objective.stage1=<run folder | checkpoint folder | .safetensors>``: the generator_ema weights of a finished
        consistency run of the same generator (``run_weights``: the trainer resolves the path and reads the file),
        loaded by ``prepare`` into the target AND the student (stage 2 starts from stage 1, as FastGen's
        pretrained_ckpt_key_map {"cm_teacher": "ema", "net": "ema"}, config_tcm.py:36); or
    ``objective.stage1_steps=N``: in-run, the first N steps are plain CD on every t (stage 1), and at step N the
        generator's weights are copied into ``stage1``, which is checkpointed from then on, so a resumed run is the
        uninterrupted run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from onestep.core import noised
from onestep.errors import ConfigError
from onestep.objectives import consistency as C
from onestep.objectives.base import Batch, Nets, load_generator_weights, register_objective
from onestep.objectives.cd import CDConfig, ConsistencyDistillation

STAGE1 = "stage1"  # the frozen stage-1 model's name in Nets.targets and in checkpoints


@dataclass
class TCMConfig(CDConfig):
    name: str = "tcm"
    #: t' as an EDM noise level sigma/alpha, snapped to the nearest grid level (FastGen config_tcm.py:24: 1.0)
    transition_sigma: float = 1.0
    #: fraction of each batch on the boundary pair (FastGen config_tcm.py:20 boundary_prob = 0.25)
    boundary_prob: float = 0.25
    #: w_B, the boundary loss weight (FastGen config_tcm.py:22 w_boundary = 0.1)
    boundary_weight: float = 0.1
    #: the stage-1 consistency model: a run folder, checkpoint folder or .safetensors of its generator ("" = in-run)
    stage1: str = ""
    #: in-run stage 1: this many steps of plain CD on every t before stage 2 (0 = objective.stage1 gives it)
    stage1_steps: int = 0


def transition_index(sigmas: torch.Tensor, transition_sigma: float) -> int:
    """k: the grid level nearest to t' in log sigma; it needs a level below (the boundary pair) and a pair above."""
    k = int(torch.argmin((torch.log(sigmas) - math.log(transition_sigma)).abs()))
    if not 1 <= k <= len(sigmas) - 2:
        raise ConfigError(f"objective.transition_sigma={transition_sigma} falls on level {k} of the {len(sigmas)}-level "
                          f"grid [{float(sigmas[0]):.3g}, {float(sigmas[-1]):.3g}]; it needs a level below it and a "
                          f"pair above: pass a transition_sigma inside the range (FastGen: 1.0)")
    return k


@register_objective
class TCM(ConsistencyDistillation):
    name = "tcm"
    Config = TCMConfig

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if not cfg.transition_sigma > 0 or not 0 <= cfg.boundary_prob < 1 or cfg.boundary_weight < 0:
            raise ConfigError(f"objective.transition_sigma={cfg.transition_sigma}, boundary_prob={cfg.boundary_prob}, "
                              f"boundary_weight={cfg.boundary_weight} must satisfy transition_sigma > 0, "
                              f"0 <= boundary_prob < 1, boundary_weight >= 0 (FastGen: 1.0, 0.25, 0.1)")
        if cfg.stage1_steps < 0 or bool(cfg.stage1) == (cfg.stage1_steps > 0):
            raise ConfigError(f"objective=tcm needs its stage-1 model from exactly one place (got stage1='{cfg.stage1}', "
                              f"stage1_steps={cfg.stage1_steps}): pass objective.stage1=<run folder of a consistency "
                              f"run> or objective.stage1_steps=N (N > 0 steps of CD first)")

    def accumulation_refusal(self):
        if self.cfg.boundary_prob > 0:
            return (f"objective.boundary_prob={self.cfg.boundary_prob} puts the first floor(B p) rows of each batch "
                    "on the boundary pair")
        return None

    def run_weights(self):
        return {"stage1": self.cfg.stage1} if self.cfg.stage1 else {}

    def targets(self):
        # decay 1: the trainer checkpoints the stage-1 model and leaves it where this objective puts it
        return {**super().targets(), STAGE1: 1.0}

    def prepare(self, nets: Nets, weights=None) -> None:
        if not self.cfg.stage1:
            return
        if not weights or "stage1" not in weights:
            raise ConfigError(f"objective.stage1='{self.cfg.stage1}' was not read: the caller of prepare passes the "
                              "weights run_weights() names (onestep.checkpoint.read_run_weights)")
        for net in (nets.targets[STAGE1], nets.generator):  # (a resumed run's checkpoint then overwrites both)
            load_generator_weights(net, weights["stage1"], "objective.stage1", self.cfg.stage1,
                                   "pass the run folder of a consistency run of the same teacher and generator")

    def stage(self, step: int) -> int:
        return 1 if step < self.cfg.stage1_steps else 2

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        if self.stage(step) == 1:
            return {**super().generator_loss(nets, batch, step), "stage": torch.tensor(1.0)}
        if step == self.cfg.stage1_steps > 0:
            freeze_into(nets.targets[STAGE1], nets.generator)
        p = self.truncated_pairs(nets, batch, step)
        c = self.cfg
        f = nets.generator.x0(p["x_hi"], p["t_hi"], batch.cond)
        wdtype = torch.promote_types(f.dtype, torch.float32)
        d = C.distance(f.to(wdtype), p["target"].to(wdtype), c.distance, c.huber_c or None)
        d = C.pair_weight(p["sig_lo"], p["sig_hi"], c.weighting).to(d) * d
        b = p["boundary"]
        consistency = d[~b].mean()
        boundary = d[b].mean() if bool(b.any()) else d.new_zeros(())
        loss = consistency + c.boundary_weight * boundary  # FastGen TCM.py:191
        return {"loss": loss, "consistency": consistency.detach(), "boundary": boundary.detach(),
                "stage": torch.tensor(2.0), "scales": torch.tensor(float(p["scales"]))}

    def truncated_pairs(self, nets: Nets, batch: Batch, step: int) -> dict:
        """Stage 2's pairs and targets: x_hi at t_hi >= t' (the student's input), the target f_{theta-,phi}(x^_n, t_n)
        of the two-stage model, and which rows are boundary rows (the first floor(B p_B))."""
        if batch.real is None:
            raise ConfigError(f"objective '{self.name}' needs data samples (x0) but the data source gives none; "
                              "use data with real samples (data=gmm)")
        c, sched, x0 = self.cfg, nets.generator.schedule, batch.real
        n_scales = self.scales(step)
        sigmas = C.karras_sigmas(n_scales, *C.sigma_range(sched), c.rho)
        k = transition_index(sigmas, c.transition_sigma)
        rows = x0.shape[0]
        # the pairs with both levels >= t', drawn by cd.py's time sampling restricted to them
        idx = k + torch.multinomial(C.index_probs(sigmas[k:], c.time_sampling, c.p_mean, c.p_std), rows,
                                    replacement=True)
        boundary = torch.arange(rows) < int(rows * c.boundary_prob)
        idx[boundary] = k - 1
        sig_lo, sig_hi = sigmas[idx], sigmas[idx + 1]
        t_lo, t_hi = (C.t_of_sigma(sched, s).to(x0) for s in (sig_lo, sig_hi))
        x_hi, eps = noised(sched, x0, t_hi)
        below = (idx < k).to(x0.device)  # t_lo < t': the two-stage model is the stage-1 model there
        with torch.no_grad():
            x_lo = self._step(nets, x0, eps, x_hi, t_hi, t_lo, batch.cond)
            target = self.two_stage(nets, x_lo, t_lo, below, batch.cond)
        return {"x_hi": x_hi, "t_hi": t_hi, "x_lo": x_lo, "t_lo": t_lo, "target": target, "sig_lo": sig_lo,
                "sig_hi": sig_hi, "boundary": boundary.to(x0.device), "transition": float(sigmas[k]),
                "scales": n_scales}

    def two_stage(self, nets: Nets, x, t, below: torch.Tensor, cond=None) -> torch.Tensor:
        """f_{theta-,phi}(x, t): the frozen stage-1 model where ``below`` (t < t'), the consistency target elsewhere
        (FastGen TCM.py:96-106: both evaluated, rows picked)."""
        out = nets.targets[STAGE1].x0(x, t, cond) if bool(below.any()) else None
        if not bool(below.all()):
            above = self._target(nets).x0(x, t, cond)
            out = above if out is None else torch.where(below.view(-1, *[1] * (x.dim() - 1)), out, above)
        return out


@torch.no_grad()
def freeze_into(target, generator) -> None:
    """target <- generator, parameter by parameter (the end of in-run stage 1); a sharded generator's parameters are
    gathered (``full_tensor``) into the replicated target."""
    for p_t, p in zip(target.parameters(), generator.parameters()):
        p_t.copy_((p.full_tensor() if hasattr(p, "full_tensor") else p).to(p_t.dtype))
