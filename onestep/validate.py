"""The config's ranges and choices, checked once before a run creates anything (no run folder, no teacher
load, no pretraining): ``check_config(cfg)`` raises a one-line ConfigError naming the key, its value and the fix.

Ranges live in the tables below. Checks that belong to a module (an objective's hyperparameters, LoRA and
frozen dtype, attention, the t-list's order) are that module's own functions, called from here so that they
too run before anything is written. What can only be known from the files (a teacher folder, a prompts file,
the teacher's conditioning) is checked where it is read; the trainer then leaves the run folder as it found
it (train/run_dir.py, ``undo_on_bad_input``).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Callable, NamedTuple

from omegaconf import OmegaConf

from onestep.checkpoint import generator_weights_file
from onestep import teachers
from onestep.data.text import find_image_text_pairs
from onestep.denoisers.attention import check_attention
from onestep.errors import ConfigError
from onestep.experiment import check_data_kind
from onestep.networks import check_networks
from onestep.objectives import make_objective
from onestep.objectives.base import check_generator_keys
from onestep.sampling import METHODS, check_ts


class Range(NamedTuple):
    ok: Callable[[float], bool]
    #: what the value must be, as the message's fix says it: pass key=<text>
    text: str


COUNT = Range(lambda v: v >= 1, "integer >= 1")
COUNT_OR_ZERO = Range(lambda v: v >= 0, "integer >= 0")
POSITIVE = Range(lambda v: v > 0, "number > 0")
NON_NEGATIVE = Range(lambda v: v >= 0, "number >= 0")
#: EMA decays and Adam betas: 1 would freeze the average forever
DECAY = Range(lambda v: 0 <= v < 1, "number in [0, 1)")
T5_TOKENS = Range(lambda v: 1 <= v <= 512, "integer in 1..512")

#: key -> (range, what the key is); an unset (null) key is not checked
RANGES: dict[str, tuple[Range, str]] = {
    "trainer.steps": (COUNT, "total training steps"),
    "trainer.batch_size": (COUNT, "samples per update"),
    "trainer.grad_accum": (COUNT, "micro-batches per optimizer update; 1 = no gradient accumulation"),
    "trainer.generator_optim.lr": (POSITIVE, "the generator's AdamW learning rate"),
    "trainer.generator_optim.weight_decay": (NON_NEGATIVE, "the generator's AdamW weight decay"),
    "trainer.critic_optim.lr": (POSITIVE, "the critic's AdamW learning rate"),
    "trainer.critic_optim.weight_decay": (NON_NEGATIVE, "the critic's AdamW weight decay"),
    "trainer.grad_clip": (NON_NEGATIVE, "the gradient-norm clip; 0 = off"),
    "trainer.ema_decay": (DECAY, "the decay of generator_ema; 0 = the generator itself"),
    "trainer.checkpoint_every": (COUNT, "steps between checkpoints"),
    "trainer.keep_checkpoints": (COUNT_OR_ZERO, "checkpoints kept; 0 = all"),
    "trainer.log_every": (COUNT, "steps between stats lines"),
    "trainer.eval_every": (COUNT_OR_ZERO, "steps between evaluations; 0 = only at the end"),
    "trainer.sample_every": (COUNT_OR_ZERO, "steps between sample grids; 0 = none"),
    "trainer.max_bad_steps": (COUNT_OR_ZERO, "consecutive skipped non-finite steps tolerated"),
    "teacher.guidance": (NON_NEGATIVE, "the classifier-free guidance scale; 1 = no guidance"),
    "teacher.resolution": (COUNT, "the image side in pixels"),
    "teacher.max_sequence_length": (T5_TOKENS, "T5 tokens per prompt"),
    "teacher.net_hidden": (COUNT, "the MLP's width"),
    "teacher.net_depth": (COUNT, "the MLP's depth"),
    "teacher.net_time_scale": (POSITIVE, "the scale of the MLP's Fourier time embedding"),
    "teacher.net_steps": (COUNT_OR_ZERO, "DSM pretraining steps of the MLP"),
    "teacher.net_lr": (POSITIVE, "the MLP's DSM learning rate"),
    "teacher.net_batch": (COUNT, "the MLP's DSM batch size"),
    "generator.steps": (COUNT, "student sampling steps"),
    "generator.students": (COUNT, "students of a multi-student generator (MSD); 1 = one generator"),
    "generator.experts": (COUNT, "experts of a phased (Phased DMD) generator, one per step; 1 = one network"),
    "generator.sigma_init": (POSITIVE, "the noise level sigma/alpha the student starts at"),
    "eval.num_samples": (COUNT, "samples per evaluated model"),
}

#: objective fields by name, for every objective that has the field (the objectives check the rest themselves)
OBJECTIVE_RANGES: dict[str, tuple[Range, str]] = {
    "num_scales": (Range(lambda v: v >= 2, "integer >= 2"), "noise levels of the consistency discretization"),
    "rho": (POSITIVE, "the exponent of EDM's rho-grid"),
    "p_std": (POSITIVE, "the std of the lognormal time proposal"),
    "huber_c": (NON_NEGATIVE, "the pseudo-Huber constant"),
    "disc_hidden": (COUNT, "the discriminator head's width"),
    "logvar_hidden": (COUNT, "the log-variance head's width"),
    "logvar_time_scale": (POSITIVE, "the scale of the log-variance head's Fourier embedding"),
    "real_guidance": (NON_NEGATIVE, "SiD-LSG's guidance of the real score"),
    "fake_guidance": (NON_NEGATIVE, "SiD-LSG's guidance of the fake score"),
    "critic_guidance": (NON_NEGATIVE, "SiD-LSG's guidance of the critic's DSM"),
}

#: accelerate's mixed precision modes this trainer supports
MIXED_PRECISION = ("no", "fp16", "bf16")
CHECKPOINT_FORMATS = ("auto", "dcp", "safetensors")
STUDENT_METHODS = ("renoise", "ddim")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: trainer.log_with: accelerate trackers the trainer feeds (onestep/train/tracking.py); auto = tensorboard when
#: installed, else none
TRACKERS = ("auto", "tensorboard", "wandb", "none")


def check_config(cfg) -> None:
    """Every key of a `onestep train` config that can be judged without reading a file."""
    for key, (rng, what) in RANGES.items():
        _check(key, OmegaConf.select(cfg, key), rng, what)
    for name, (rng, what) in OBJECTIVE_RANGES.items():
        if name in cfg.objective:
            _check(f"objective.{name}", cfg.objective[name], rng, what)
    for role in ("generator", "critic"):
        _check_betas(f"trainer.{role}_optim.betas", list(cfg.trainer[f"{role}_optim"].betas))
    for key in ("eval.teacher_steps", "eval.student_steps"):
        steps = list(OmegaConf.select(cfg, key))
        if not steps or not all(s >= 1 for s in steps):
            raise ConfigError(f"{key}={steps} must list step counts >= 1; pass e.g. {key}=[1]")
    student_steps = len(cfg.generator.ts) if cfg.generator.ts is not None else cfg.generator.steps
    for k in OmegaConf.select(cfg, "eval.hybrid_teacher_steps", default=None) or []:
        if not 1 <= k < student_steps:
            raise ConfigError(f"eval.hybrid_teacher_steps={list(cfg.eval.hybrid_teacher_steps)}: the teacher takes k of "
                              f"the student's {student_steps} steps, so each k must be in [1, {student_steps - 1}]; "
                              "hybrid sampling needs a student of 2 or more steps (generator.steps)")
    _choice("trainer.mixed_precision", cfg.trainer.mixed_precision, MIXED_PRECISION)
    _choice("trainer.checkpoint_format", cfg.trainer.checkpoint_format, CHECKPOINT_FORMATS)
    lora = cfg.generator.lora.rank is not None or cfg.critic.lora.rank is not None
    if cfg.trainer.checkpoint_format == "dcp" and lora:
        raise ConfigError("trainer.checkpoint_format=dcp shards full networks; LoRA adapters (generator.lora.rank / "
                          "critic.lora.rank) are small and share one base: pass trainer.checkpoint_format=safetensors")
    _choice("generator.method", cfg.generator.method, STUDENT_METHODS)
    _choice("trainer.compile_mode", cfg.trainer.compile_mode, COMPILE_MODES)
    _choice("eval.teacher_method", cfg.eval.teacher_method, METHODS)
    _check_tracker(cfg.trainer.log_with)
    _check_teacher(cfg.teacher)
    check_data_kind(cfg)
    if cfg.generator.ts is not None:
        try:
            check_ts(list(cfg.generator.ts))
        except ConfigError as e:
            raise ConfigError(f"generator.ts: {e}; pass generator.ts=[t_0, t_1, ...] or generator.ts=null") from None
    check_attention(cfg.generator.attention)
    check_networks(cfg)
    objective = make_objective(cfg.objective, generate=None)  # the objective's own hyperparameter checks
    refusal = objective.accumulation_refusal() if cfg.trainer.grad_accum > 1 else None
    if refusal:
        raise ConfigError(f"trainer.grad_accum={cfg.trainer.grad_accum} with objective={cfg.objective.name}: {refusal}, "
                          "so micro-batches would not add up to one batch; pass trainer.grad_accum=1 (a larger "
                          "trainer.batch_size)")
    for name, path in objective.run_weights().items():  # weights of other runs: the files exist
        generator_weights_file(path, f"objective.{name}")
    for name, folder in objective.data_streams().items():  # an objective's second data stream: captioned stills
        find_image_text_pairs(folder, f"objective.{name}")
    check_generator_keys(type(objective), cfg.generator)  # generator keys another objective's shape reads


def _check(key: str, value, rng: Range, what: str) -> None:
    if value is None:
        return
    if not math.isfinite(value) or not rng.ok(value):
        raise ConfigError(f"{key}={value} is out of range ({what}): pass {key}=<{rng.text}>")


def _check_betas(key: str, betas: list) -> None:
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and DECAY.ok(b) for b in betas):
        raise ConfigError(f"{key}={betas} must be two AdamW betas, each in [0, 1); pass e.g. {key}=[0.9,0.999]")


def _choice(key: str, value: str, options) -> None:
    if value not in options:
        raise ConfigError(f"{key}='{value}' is unknown; choose one of {tuple(options)}")


def _check_tracker(name: str) -> None:
    _choice("trainer.log_with", name, TRACKERS)
    if name in ("tensorboard", "wandb") and importlib.util.find_spec(name) is None:
        raise ConfigError(f"trainer.log_with={name} needs the {name} package, which is not installed: "
                          f"pip install {name}, or pass trainer.log_with=none")


def _check_teacher(tc) -> None:
    fam = teachers.family(tc.kind)
    if tc.resolution is not None and not fam.reads("teacher", "resolution"):
        # only the families whose image size is a choice read teacher.resolution; the others fix it
        raise ConfigError(f"teacher.resolution={tc.resolution} does not apply to teacher.kind={tc.kind} (its data "
                          f"has the teacher's own size); set teacher.resolution=null, or use one of "
                          f"{teachers.with_field('teacher', 'resolution')}")
