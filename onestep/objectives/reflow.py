"""Reflow and InstaFlow: straighten the teacher's flow on its own noise -> sample coupling, then distill the
straightened flow into one step (Liu, Gong & Liu 2023, "Flow Straight and Fast: Learning to Generate and Transfer
Data with Rectified Flow", ICLR; Liu et al. 2024, "InstaFlow: One Step is Enough for High-Quality Diffusion-Based
Text-to-Image Generation", ICLR, Sec. 3 and Alg. 1).

Pairs. A fixed pool of couplings (z, x), x = ODE_teacher(z): the teacher's deterministic sampler (``pair_solver``,
``pair_steps``) from z scaled to the prior at t_max, with uniform class labels for class-conditional teachers. Built
in ``prepare`` from a fixed seed (a resumed run rebuilds the same pool).

Reflow (Rectified Flow eq. (1) / InstaFlow eq. (3)): on the straight interpolation between the pair,
    x_t = alpha(t) x + sigma(t) z,   min_v E_{t ~ U, (z, x)} || v(x_t, t) - (alpha'(t) x + sigma'(t) z) ||^2
which on a rectified-flow schedule (alpha = 1 - t, sigma = t) is || v(x_t, t) - (z - x) ||^2. v is the generator's
flow prediction; its ODE is the 2-rectified flow, whose paths are straighter than the teacher's (Liu et al. Thm. 3.6),
so its 1-step Euler sample x = G.x0(z, t_max) is already close to the teacher's ODE output.

Distillation (InstaFlow eq. (4), Alg. 1 step 3): min_G E_z d(G(z), ODE_{2-RF}(z)), with d the squared L2 here (the paper
uses LPIPS on images); the pairs come from the reflowed model's own ODE (``distill_steps`` Euler steps: the flow is
nearly straight), sampled once when distillation starts and kept in a checkpointed buffer, so a resumed run continues
with the same pairs rather than re-sampling a moved generator.

``mode``:
    instaflow   reflow for ``reflow_steps`` generator steps, then distill the reflowed generator (the paper's pipeline)
    reflow      2-rectified flow only (a 1-step student is its 1-step Euler sample)
    distill     distill the teacher's own pairs directly (InstaFlow's "direct distillation" baseline, Sec. 3.1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onestep import param
from onestep.conditioning import Cond
from onestep.core import Batch, Nets, noised, sample_t
from onestep.denoisers.base import Denoiser
from onestep.errors import ConfigError
from onestep.objectives.base import Objective, ObjectiveConfig, TimeRange, register_objective
from onestep.sampling import METHODS, sample

MODES = ("instaflow", "reflow", "distill")
#: seeds of the teacher pair pool and of the reflowed model's distillation pool
PAIR_SEED, DISTILL_SEED = 4321, 8765


@dataclass
class ReflowConfig(ObjectiveConfig, TimeRange):
    name: str = "reflow"
    #: instaflow (reflow, then distill the reflowed model) | reflow (2-rectified flow) | distill (teacher pairs)
    mode: str = "instaflow"
    #: generator steps of reflow before distillation starts (mode=instaflow)
    reflow_steps: int = 400
    #: size of the teacher's noise -> sample pool, and the teacher sampler that builds it
    num_pairs: int = 16384
    pair_solver: str = "heun"
    pair_steps: int = 32
    #: Euler steps of the reflowed model's ODE that produce the distillation pairs (same pool size)
    distill_steps: int = 16
    #: reflow time t ~ U[t_lo, t_hi] (fractions of the schedule's range; Rectified Flow: U[0, 1])
    t_lo: float = 0.0
    t_hi: float = 1.0


@torch.no_grad()
def ode_pairs(model: Denoiser, count: int, ts: torch.Tensor, method: str, seed: int, device,
              num_classes: int = 0) -> dict[str, torch.Tensor]:
    """{"noise", "sample"[, "cond"]}: ``count`` solutions of ``model``'s ODE from fixed standard-normal noise
    (started at prior_std(ts[0]) z, as every sampler of the project), with uniform labels if class-conditional."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(count, *model.data_shape, generator=g)
    out = {"noise": z}
    cond = None
    if num_classes:
        out["cond"] = torch.randint(0, num_classes, (count,), generator=g)
        cond = Cond.of_classes(out["cond"], num_classes, device)
    out["sample"] = sample(model, z.to(device), ts, cond, method=method).cpu()
    return out


def teacher_pairs(nets: Nets, c, objective: str) -> dict[str, torch.Tensor]:
    """``c.num_pairs`` noise -> teacher-ODE-sample pairs (``c.pair_steps`` steps of ``c.pair_solver``, PAIR_SEED) on
    the generator's device: what reflow and SlimFlow train on."""
    teacher = nets.teacher
    if teacher.conditional and not teacher.num_classes:
        raise ConfigError(f"objective={objective} builds noise -> teacher-sample pairs for unconditional or class-"
                          "conditional teachers only (no prompt pool)")
    device = next((p.device for p in nets.generator.parameters()), torch.device("cpu"))
    ts = teacher.schedule.default_ts(c.pair_steps)
    return {k: v.to(device) for k, v in
            ode_pairs(teacher, c.num_pairs, ts, c.pair_solver, PAIR_SEED, device, teacher.num_classes).items()}


def reflow_loss(model: Denoiser, z: torch.Tensor, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """Rectified Flow eq. (1): mean || v(x_t, t) - (alpha' x + sigma' z) ||^2 on the straight path between the pair."""
    sched = model.schedule
    x_t, _ = noised(sched, x, t, z)
    target = param.from_x0_eps(x, z, "flow", t, sched)
    return (model.flow(x_t, t, cond) - target).flatten(1).pow(2).mean(1).mean()


class PairBank(nn.Module):
    """The distillation pool of the reflowed model, as buffers: checkpointed with the run (no parameters)."""

    def __init__(self, count: int, data_shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("noise", torch.zeros(count, *data_shape))
        self.register_buffer("sample", torch.zeros(count, *data_shape))
        self.register_buffer("cond", torch.zeros(count, dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def fill(self, pairs: dict[str, torch.Tensor]) -> None:
        self.noise.copy_(pairs["noise"])
        self.sample.copy_(pairs["sample"])
        if "cond" in pairs:
            self.cond.copy_(pairs["cond"])
        self.filled.fill_(1)


@register_objective
class Reflow(Objective):
    name = "reflow"
    Config = ReflowConfig
    networks = ("generator",)

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if cfg.mode not in MODES or cfg.pair_solver not in METHODS:
            raise ConfigError(f"objective.mode='{cfg.mode}' / pair_solver='{cfg.pair_solver}': choose mode from {MODES} "
                              f"and pair_solver from {METHODS}")
        if cfg.num_pairs < 1 or cfg.pair_steps < 1 or cfg.distill_steps < 1 or cfg.reflow_steps < 0:
            raise ConfigError(f"objective.num_pairs={cfg.num_pairs}, pair_steps={cfg.pair_steps}, distill_steps="
                              f"{cfg.distill_steps} must be >= 1 and reflow_steps={cfg.reflow_steps} >= 0")
        if not 0 <= cfg.t_lo < cfg.t_hi <= 1:
            raise ConfigError(f"objective.t_lo={cfg.t_lo}, t_hi={cfg.t_hi} must satisfy 0 <= t_lo < t_hi <= 1")
        self.pairs: dict[str, torch.Tensor] | None = None

    def build_modules(self, setup):
        if self.cfg.mode != "instaflow":
            return {}
        return {"reflowed_pairs": (PairBank(self.cfg.num_pairs, setup.teacher.data_shape), "generator")}

    def prepare(self, nets: Nets, weights=None) -> None:
        self.pairs = teacher_pairs(nets, self.cfg, "reflow")

    def stage(self, step: int) -> str:
        c = self.cfg
        if c.mode == "instaflow":
            return "reflow" if step < c.reflow_steps else "distill"
        return c.mode

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        if self.pairs is None:
            self.prepare(nets)
        stage, g = self.stage(step), nets.generator
        n, device = batch.noise.shape[0], batch.noise.device
        pool = self.pairs if stage == "reflow" or self.cfg.mode == "distill" else self._reflowed(nets)
        idx = torch.randint(0, pool["noise"].shape[0], (n,), device=device)
        z, x = pool["noise"][idx].to(batch.noise), pool["sample"][idx].to(batch.noise)
        cond = Cond.of_classes(pool["cond"][idx] if "cond" in pool else None, nets.teacher.num_classes)
        if stage == "reflow":
            t = sample_t(g.schedule, n, self.cfg.t_lo, self.cfg.t_hi, like=z)
            loss = reflow_loss(g, z, x, t, cond)
            return {"loss": loss, "reflow": loss.detach()}
        # InstaFlow eq. (4): the 1-step student against the coupled sample
        loss = (self.generate(nets, Batch(noise=z, cond=cond)) - x).flatten(1).pow(2).mean(1).mean()
        return {"loss": loss, "distill": loss.detach()}

    def _reflowed(self, nets: Nets) -> dict[str, torch.Tensor]:
        """The reflowed model's pool: sampled from the generator's own ODE on the first distillation step."""
        bank = nets.modules["reflowed_pairs"]
        if not int(bank.filled):
            g, c = nets.generator, self.cfg
            device = bank.noise.device
            ts = g.schedule.default_ts(c.distill_steps)
            bank.fill({k: v.to(device) for k, v in
                       ode_pairs(g, c.num_pairs, ts, "euler", DISTILL_SEED, device, nets.teacher.num_classes).items()})
        return {"noise": bank.noise, "sample": bank.sample, "cond": bank.cond}
