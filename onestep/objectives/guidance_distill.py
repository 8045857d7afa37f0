"""Guidance distillation: stage one of Meng et al. 2023 ("On Distillation of Guided Diffusion Models", CVPR 2023, Sec. 3).

Classifier-free guidance costs two network passes per step (conditional and unconditional). A student x_eta(z_t, w)
that takes the guidance scale w as an input learns the teacher's guided prediction for every w at once, in one pass:
    L(eta) = E_{w ~ U[w_min, w_max], t, x ~ data, eps} [ omega(t) || x_eta(z_t, w) - x^w_theta(z_t) ||^2 ],
    x^w_theta(z_t) = x_theta(z_t, null) + w (x_theta(z_t, c) - x_theta(z_t, null)),   z_t = alpha_t x + sigma_t eps.
Scales follow this project's convention (1 = the conditional model); Meng et al. write (1 + w) x_c - w x, so their
w is this w - 1 and their U[0, 4] is ``w_min=1, w_max=5``. omega(t): EDM's lambda(sigma) = (sig^2 + sd^2) / (sig sd)^2
on the x0 error (Karras et al. 2022, Table 1: unit weight on the network output), as the teacher's own DSM
(core.dsm_loss "edm"); Meng et al. use the truncated-SNR weight of progressive distillation, which weights the same
x0 error by max(SNR, 1) instead.

The student: generator.guidance_input=<w used when none is given> adds zero-initialized guidance inputs (denoisers/
nets.py ``add_guidance_input``): a Fourier embedding of w added to the time embedding (Meng et al.) and a small residual
adapter per block on the block's input and the w features (AGD's adapters), so it starts as the conditional network,
initialized from the teacher's. ``trained=full`` trains every weight (Meng et al.); ``trained=adapter`` keeps the base
frozen and trains the guidance inputs only (AGD, Jensen & Sadat 2025: ~2% of the weights on their nets, 13%
on the 128-wide GMM MLP). The trained student
is a w-conditioned denoiser, sampled with generator.steps steps of generator.method (ddim) at any w through
``with_guidance`` (or the default w), where the teacher needs 2x the evaluations. Stage two of the paper (progressive
distillation of this student to fewer steps) is not part of this objective.

A student at one scale (``w_min = w_max = w``, no guidance input) learns x^w itself: the plain network then does in
one pass what the CFG teacher does in two, and can be the teacher plus LoRA adapters on the shared frozen base
(``generator.lora``; Golnari 2023, "LoRA-Enhanced Distillation on Guided Diffusion Models", arXiv 2312.06899: guided
distillation without a second full copy of the network, configs/experiment/gmm_guidance_distill_lora.yaml). The
guidance input itself is refused with LoRA: its embedding would live in the base the teacher shares.

Inputs z_t: ``source=data`` noises training data (Meng et al.); ``source=trajectory`` takes the states of the
teacher's own CFG-guided DDIM trajectories at the same w (AGD, Jensen & Sadat 2025, "Efficient Distillation of
Classifier-Free Guidance using Adapters", TMLR: the student then sees at training what it sees at inference).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from onestep.core import noised, sample_t
from onestep.denoisers.base import Denoiser, guided, with_guidance
from onestep.denoisers.nets import GUIDANCE_ADAPTER
from onestep.errors import ConfigError
from onestep.objectives.base import (Batch, Nets, Objective, ObjectiveConfig, TimeRange, check_t_range,
                                     register_objective)
from onestep.objectives.snoopi import check_guidance_range, sample_guidance
from onestep.sampling import sample
from onestep.schedules import bcast

SOURCES = ("data", "trajectory")
TRAINED = ("full", "adapter")
#: EDM's sigma_data of the x0 weighting (the MLP's preconditioning uses the same)
SIGMA_DATA = 0.5


def guided_target(teacher: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond, w: torch.Tensor) -> torch.Tensor:
    """The teacher's CFG prediction x^w(z_t) of each row at its own scale w (B,), no grad."""
    with torch.no_grad():
        return guided(teacher.unguided(), w).x0(x_t, t, cond)


def edm_weight(schedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """lambda(sigma) = (sig^2 + sd^2) / (sig sd)^2, sig = sigma / alpha (EDM Table 1), shaped to broadcast on like."""
    sig = bcast(schedule.sigma(t) / schedule.alpha(t), like)
    return (sig**2 + SIGMA_DATA**2) / (sig * SIGMA_DATA) ** 2


def trajectory_states(teacher: Denoiser, noise: torch.Tensor, cond, w: torch.Tensor, steps: int):
    """(z_t, t): per row, a state of the teacher's CFG-guided DDIM trajectory at the row's w, at a step drawn
    uniformly from its ``steps`` sampling times (AGD: training on CFG-guided trajectories). No grad."""
    model = guided(teacher.unguided(), w)
    ts = model.schedule.default_ts(steps)
    states: list[torch.Tensor] = []
    with torch.no_grad():
        sample(model, noise, ts, cond, method="ddim", callback=lambda i, x, x0: states.append(x))
    pick = torch.randint(0, steps, (noise.shape[0],))
    x_t = torch.stack(states)[pick.to(noise.device), torch.arange(noise.shape[0], device=noise.device)]
    return x_t, ts.to(noise)[pick.to(noise.device)]


@contextmanager
def adapter_only(student: Denoiser):
    """AGD: the student's base parameters take no gradient for the duration, only its guidance adapter
    (``GUIDANCE_ADAPTER``) does; AdamW skips parameters without a gradient, so the base stays the teacher's."""
    base = [p for n, p in student.named_parameters() if not n.startswith(GUIDANCE_ADAPTER) and p.requires_grad]
    if len(base) == sum(1 for _ in student.parameters()):
        raise ConfigError("objective.trained=adapter trains the student's guidance adapter only, and this student has "
                          "none; pass generator.guidance_input=<w>")
    for p in base:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in base:
            p.requires_grad_(True)


@dataclass
class GuidanceDistillConfig(ObjectiveConfig, TimeRange):
    name: str = "guidance_distill"
    #: the range of guidance scales the student learns, w ~ U[w_min, w_max] per sample (1 = conditional); Meng et
    #: al.'s U[0, 4] in their convention
    w_min: float = 1.0
    w_max: float = 5.0
    #: the noise level t ~ U[t_lo, t_hi] (fractions of the schedule's range, through t_from_unit) for source=data
    t_lo: float = 0.0
    t_hi: float = 1.0
    #: data (Meng et al.: noised training data) | trajectory (AGD: states of the teacher's guided DDIM trajectories)
    source: str = "data"
    #: DDIM steps of the teacher's trajectories (source=trajectory)
    trajectory_steps: int = 16
    #: full (Meng et al.: every weight of the student) | adapter (AGD: the base frozen, only the guidance adapter)
    trained: str = "full"


@register_objective
class GuidanceDistill(Objective):
    name = "guidance_distill"
    Config = GuidanceDistillConfig
    networks = ("generator",)
    generator_keys = ("guidance_input",)

    @classmethod
    def shape_generator(cls, gc, net):
        if gc.guidance_input is None:
            return net  # (the loss names the key to set)
        if not hasattr(net, "add_guidance_input") or gc.lora.rank is not None:
            raise ConfigError(f"generator.guidance_input={gc.guidance_input} adds a trained guidance embedding to a "
                              f"full copy of the GMM MLP; {type(net).__name__}"
                              f"{' with generator.lora' if gc.lora.rank is not None else ''} has none "
                              "(unset generator.guidance_input, or use teacher=gmm_classes without LoRA)")
        net = copy.deepcopy(net)  # (the init is shared: the teacher itself for image teachers)
        net.add_guidance_input(gc.guidance_input)
        return net

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        check_guidance_range([cfg.w_min, cfg.w_max], "objective.[w_min,w_max]")
        check_t_range(cfg)
        if cfg.source not in SOURCES:
            raise ConfigError(f"objective.source='{cfg.source}' is unknown; choose one of {SOURCES}")
        if cfg.trained not in TRAINED:
            raise ConfigError(f"objective.trained='{cfg.trained}' is unknown; choose one of {TRAINED}")
        if cfg.trajectory_steps < 1:
            raise ConfigError(f"objective.trajectory_steps={cfg.trajectory_steps} must be >= 1")

    def inputs(self, nets: Nets, batch: Batch, w: torch.Tensor):
        """(z_t, t) the student learns at: noised data, or states of the teacher's guided trajectories."""
        if self.cfg.source == "trajectory":
            return trajectory_states(nets.teacher, batch.noise, batch.cond, w, self.cfg.trajectory_steps)
        if batch.real is None:
            raise ConfigError("objective=guidance_distill with source=data noises training data, and this data gives "
                              "none; use data with samples (data=gmm, image_text) or objective.source=trajectory")
        x = batch.real
        t = sample_t(nets.teacher.schedule, x.shape[0], self.cfg.t_lo, self.cfg.t_hi, like=x)
        return noised(nets.teacher.schedule, x, t)[0], t

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        student = nets.generator
        at_one_scale = not student.embedded_guidance
        if at_one_scale and self.cfg.w_min != self.cfg.w_max:
            raise ConfigError("objective=guidance_distill trains a student that takes the guidance scale as an input; "
                              "pass generator.guidance_input=<its default w> (e.g. generator.guidance_input="
                              "${teacher.guidance}), or objective.w_min=objective.w_max=<w> for a student at one scale")
        if batch.cond is None:
            raise ConfigError("objective=guidance_distill distills classifier-free guidance and needs a conditional "
                              "teacher and data (e.g. teacher=gmm_classes)")
        w = sample_guidance(batch.noise.shape[0], self.cfg.w_min, self.cfg.w_max, like=batch.noise)
        x_t, t = self.inputs(nets, batch, w)
        target = guided_target(nets.teacher, x_t, t, batch.cond, w)
        cond = batch.cond if at_one_scale else with_guidance(batch.cond, w)
        if self.cfg.trained == "adapter":
            with adapter_only(student):
                pred = student.x0(x_t, t, cond)
        else:
            pred = student.x0(x_t, t, cond)
        err = edm_weight(student.schedule, t, pred) * (pred - target.to(pred)) ** 2  # Meng et al. stage one
        loss = err.flatten(1).mean(1).mean()
        return {"loss": loss, "guidance_mse": (pred - target.to(pred)).detach().pow(2).mean()}
