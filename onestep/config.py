"""Typed config schemas, registered in Hydra's ConfigStore. Defaults live here and only here.

Groups: teacher/ generator/ objective/ data/ trainer/ eval/ (dataclass nodes, so a wrong key fails at
compose time) and experiment/ (yaml files under configs/experiment that pick options and override fields).
Objectives register their own Config dataclass (see objectives/base.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

_cs = ConfigStore.instance()


def store(group: str | None, name: str, node) -> None:
    _cs.store(group=group, name=name, node=node)


@dataclass
class TeacherConfig:
    #: gmm = exact mixture score; gmm_learned = an MLP trained by DSM on that mixture
    kind: str = "gmm"
    mixture: str = "ring"
    mixture_args: dict[str, Any] = field(default_factory=dict)
    schedule: str = "vp_linear"
    schedule_args: dict[str, Any] = field(default_factory=dict)
    #: classifier-free guidance scale of the real score (1 = no guidance)
    guidance: float = 1.0
    #: the DSM-trained MLP: learned teacher, and the init of generator and critic for GMM experiments
    net_hidden: int = 256
    net_depth: int = 3
    net_steps: int = 2000
    net_lr: float = 2e-3
    net_batch: int = 1024


@dataclass
class GeneratorConfig:
    #: number of student steps; the t-list is ``ts`` if given, else the schedule's default t-list
    steps: int = 1
    ts: Optional[list[float]] = None
    #: start the t-list where sigma/alpha equals this (SiD's sigma_init) instead of at t_max; the generator
    #: then maps sigma(t_0) z, and a teacher-initialized generator already outputs coarse structure
    sigma_init: Optional[float] = None
    #: multi-step student sampling: renoise (consistency / DMD2 style) or ddim
    method: str = "renoise"


@dataclass
class DataConfig:
    kind: str = "gmm"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0


@dataclass
class TrainerConfig:
    steps: int = 1000
    batch_size: int = 512
    generator_optim: OptimConfig = field(default_factory=OptimConfig)
    critic_optim: OptimConfig = field(default_factory=OptimConfig)
    grad_clip: float = 10.0
    ema_decay: float = 0.99
    #: no | fp16 | bf16 (accelerate's mixed precision)
    mixed_precision: str = "no"
    cpu: bool = False
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 25
    #: evaluate the student every N steps (0 = only at the end)
    eval_every: int = 0
    sample_every: int = 0
    #: consecutive non-finite losses tolerated (the step is skipped) before the run stops
    max_bad_steps: int = 10
    progress: bool = True


@dataclass
class EvalConfig:
    num_samples: int = 10000
    teacher_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    teacher_method: str = "ddim"
    student_steps: list[int] = field(default_factory=lambda: [1])
    plot: bool = True


@dataclass
class Config:
    teacher: Any = None
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    objective: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    #: run folder; the CLI fills it from the experiment name and overrides (the run's identity)
    run_dir: Optional[str] = None
    out_root: str = "runs"


store(None, "base_config", Config)
store("teacher", "gmm_ring", TeacherConfig(mixture="ring"))
store("teacher", "gmm_grid", TeacherConfig(mixture="grid"))
store("teacher", "gmm_classes", TeacherConfig(mixture="class_mixture", guidance=2.0))
store("teacher", "gmm_ring_learned", TeacherConfig(kind="gmm_learned", mixture="ring"))
store("generator", "default", GeneratorConfig)
store("data", "gmm", DataConfig)
store("trainer", "default", TrainerConfig)
store("eval", "gmm", EvalConfig)
