"""PSO: Pairwise Sample Optimization (Miao, Yang, Lin, Wang, Liu, Wang & Qiu 2025, "Tuning Timestep-Distilled Diffusion
Model Using Pairwise Sample Optimization", ICLR, arXiv 2410.03190).

Fine-tuning a timestep-distilled student with the plain diffusion loss blurs it; PSO instead raises the relative
likelihood of a preferred sample x^w over a reference sample x^l drawn from the current student itself, measured
against a frozen copy of the starting student (the reference model), so that the student moves toward x^w while
staying where its few-step sampler works (Sec. 3). It is Diffusion-DPO's pairwise objective (Wallace et al. 2024,
"Diffusion Model Alignment Using Direct Preference Optimization", Sec. 4, its final loss with T w(lambda_t) folded into
beta) on the student's own x0 predictions:

    e_M(x, t) = || x - M.x0(alpha_t x + sigma_t eps, t, c) ||^2 / D          (M = the student G_theta or reference G_ref)
    d         = [e_G(x^w, t) - e_ref(x^w, t)] - [e_G(x^l, t) - e_ref(x^l, t)]
    L_PSO     = -log sigmoid(-beta d)                                         (one t and eps shared by the pair)

A reward pair whose gap |r(x^a) - r(x^b)| is under ``objective.tie`` is a tie and adds 0 to the batch's mean of L_PSO:
Diffusion-DPO trains on Pick-a-Pic v2 with its tied pairs removed (Wallace et al. 2024, Sec. 5), and a near-tie of a
saturated reward (digits_class on samples the classifier already reads as the prompted digit: gaps ~1e-3) ranks the
pair by noise, which L_PSO would push on as hard as a real preference.

The pairs (``objective.pairs``):
    reward  online PSO: two samples of the current student for the same prompt and two noises, ranked by ``reward=``
            (x^w the higher reward); the paper's online preference tuning, its reward here any reward= reward
    data    offline PSO's data form: x^w the run's data (batch.real: style / concept images), x^l a sample of the
            current student for the same conditioning (the paper's "reference images sampled from the current model")

The student is the distilled generator of another run (``objective.student``, ``rewarded.StudentStart``), loaded into
the generator and into the reference (a target of decay 1: checkpointed, never moved); '' starts both from the run's
student init. The samples come from the trainer's generation path (DMD2's backward simulation: for a 1-step student
its sample; for a k-step student the output of a random step of its own chain), so the student keeps its sampler. The
noise level t of the loss is drawn by ``t_dist`` in [t_lo, t_hi]: the whole range is Diffusion-DPO's uniform t; a
1-step student can be tuned at its own t_0 alone (digits_t2i_pso: t_dist=grid, [0.98, 1], SD timesteps 980..999).

The paper's text was not readable from this project's reference store when this file was written: the loss above is
its Diffusion-DPO form as the abstract and Sec. 3 describe it; beta and the t-range are this project's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from onestep import conditioning
from onestep.core import noised, sample_t
from onestep.errors import ConfigError
from onestep.objectives.base import (Batch, Nets, Objective, ObjectiveConfig, TimeDraw, check_t_dist, check_t_range,
                                     register_objective)
from onestep.objectives.rewarded import SampleReward, StudentStart

REFERENCE = "pso_reference"  # the frozen reference student's name in Nets.targets and in checkpoints
PAIRS = ("reward", "data")


@dataclass
class PSOConfig(ObjectiveConfig, TimeDraw):
    name: str = "pso"
    #: the distilled student to tune: its run folder, checkpoint folder or .safetensors ('' = the run's student init)
    student: str = ""
    #: beta of L_PSO = -log sigmoid(-beta d): how hard the pair's likelihood margin against the reference is pushed
    beta: float = 100.0
    #: reward (two student samples of one prompt ranked by reward=) | data (batch.real vs a student sample)
    pairs: str = "reward"
    #: pairs=reward: a pair whose reward gap is under tie is a tie and adds 0 to L_PSO (0 = every pair counts)
    tie: float = 0.0


def error(model: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """e = ||x - x0_pred||^2 / D per sample, in at least fp32."""
    wdtype = torch.promote_types(model.dtype, torch.float32)
    return (model.to(wdtype) - x.to(wdtype)).pow(2).flatten(1).mean(1)


def pso_loss(pred_w, pred_l, ref_w, ref_l, x_w, x_l, beta: float,
             keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_PSO averaged over the pairs, d per pair): the student's predictions ``pred_*`` (with gradient), the
    reference's ``ref_*`` and the pair's clean samples ``x_w`` (preferred) and ``x_l``; ``keep`` (bool per pair, None =
    all) zeroes the terms of ties."""
    d = (error(pred_w, x_w) - error(ref_w, x_w)) - (error(pred_l, x_l) - error(ref_l, x_l))
    terms = F.softplus(beta * d)  # softplus(beta d) = -log sigmoid(-beta d)
    return (terms if keep is None else terms * keep.to(terms)).mean(), d


@register_objective
class PSO(Objective):
    name = "pso"
    Config = PSOConfig
    networks = ("generator",)

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        check_t_range(cfg)
        check_t_dist(cfg)
        if not cfg.beta > 0:
            raise ConfigError(f"objective.beta={cfg.beta} must be > 0 (the pair margin's scale in L_PSO)")
        if cfg.pairs not in PAIRS:
            raise ConfigError(f"objective.pairs='{cfg.pairs}' is unknown; choose one of {PAIRS}")
        if cfg.tie < 0:
            raise ConfigError(f"objective.tie={cfg.tie} must be >= 0 (the reward gap under which a pair is a tie)")
        self.reward = SampleReward(self.name)
        self.start = StudentStart(cfg.student, self.name)

    def build_modules(self, setup):
        if self.cfg.pairs == "reward":
            self.reward.bind(setup)
        return {}

    def targets(self):
        return {REFERENCE: 1.0}  # decay 1: the frozen starting student, checkpointed with the run

    def run_weights(self):
        return self.start.run_weights()

    def prepare(self, nets: Nets, weights=None) -> None:
        self.start.load(weights, nets.generator, nets.targets[REFERENCE])

    @torch.no_grad()
    def pair(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """(x^w, x^l, keep: the pairs that are no tie, logs) for the batch's conditioning."""
        x_a = self.generate(nets, batch)
        if self.cfg.pairs == "data":
            if batch.real is None:
                raise ConfigError("objective.pairs=data takes the preferred samples from the data: pass a data= with "
                                  "images (e.g. data=digits_text or image_text), or objective.pairs=reward")
            return batch.real.to(x_a), x_a, torch.ones(x_a.shape[0], dtype=torch.bool, device=x_a.device), {}
        x_b = self.generate(nets, replace(batch, noise=torch.randn_like(batch.noise)))
        r_a, r_b = self.reward(x_a, batch.cond), self.reward(x_b, batch.cond)
        a_wins = (r_a >= r_b).view(-1, *([1] * (x_a.ndim - 1)))
        x_w, x_l = torch.where(a_wins, x_a, x_b), torch.where(a_wins, x_b, x_a)
        gap = (r_a - r_b).abs()
        keep = gap >= self.cfg.tie
        return x_w, x_l, keep, {"reward": (r_a + r_b).mean() / 2, "reward_gap": gap.mean(),
                                "pso_pairs": keep.float().mean()}

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        x_w, x_l, keep, logs = self.pair(nets, batch)
        n, sched = x_w.shape[0], nets.teacher.schedule
        t = sample_t(sched, n, self.cfg.t_lo, self.cfg.t_hi, like=x_w, dist=self.cfg.t_dist)
        eps = torch.randn_like(x_w)  # one t and one eps per pair (Diffusion-DPO)
        x_t = torch.cat([noised(sched, x_w, t, eps)[0], noised(sched, x_l, t, eps)[0]])
        tt, cond = torch.cat([t, t]), conditioning.cat([batch.cond, batch.cond])
        pred_w, pred_l = nets.generator.x0(x_t, tt, cond).chunk(2)
        with torch.no_grad():
            ref_w, ref_l = nets.targets[REFERENCE].x0(x_t, tt, cond).chunk(2)
        loss, d = pso_loss(pred_w, pred_l, ref_w, ref_l, x_w, x_l, self.cfg.beta, keep)
        return {"loss": loss, "pso_margin": d.mean().detach(), "pso_acc": (d < 0).float().mean(), **logs}
