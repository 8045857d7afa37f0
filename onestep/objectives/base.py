"""The objective interface.

An objective is a small class: the networks it trains (``networks``), a typed config (``Config``, a
dataclass registered as a Hydra option of the ``objective`` group), ``generator_loss`` and, when it
trains a critic, ``critic_loss``. Losses return a dict of named scalars: "loss" is optimized, the rest
are logged. The trainer owns optimizers, the update schedule (``critic_updates`` per generator step,
i.e. TTUR), precision, EMA and checkpoints; objectives know nothing of them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from onestep.config import store
from onestep.core import T_DISTS, Batch, Nets
from onestep.errors import ConfigError

OBJECTIVES: dict[str, type["Objective"]] = {}


@dataclass
class ObjectiveConfig:
    name: str = "?"
    #: critic (fake-score) updates per generator update: the TTUR ratio (DMD2 uses 5)
    ttur: int = 1


@dataclass
class TimeRange:
    """The noise levels a loss draws t from, shared by the objectives' configs (``check_t_range`` checks them). A
    config redeclares a field only to change its default or to document its paper's choice."""

    #: the loss's noise level t within [t_lo, t_hi] (fractions of the schedule's time range)
    t_lo: float = 0.02
    t_hi: float = 0.98


@dataclass
class TimeDraw(TimeRange):
    #: how t is drawn in [t_lo, t_hi]: unit (u ~ U[t_lo, t_hi] through the schedule: log-uniform sigma on EDM) | grid
    #: (integer index uniform on the 1000-point Karras grid on EDM, or on SD's timestep table) | karras (continuous on
    #: the Karras ramp); see onestep.core.sample_t (``check_t_dist`` checks it)
    t_dist: str = "unit"


@dataclass
class CriticWeighting:
    #: critic's DSM weighting: edm | eps | x0 | v (onestep.core.dsm_loss)
    critic_weighting: str = "edm"


class Objective:
    name: ClassVar[str]
    Config: ClassVar[type] = ObjectiveConfig
    #: trained networks besides the generator; "critic" is a copy of the teacher net (fake score)
    networks: ClassVar[tuple[str, ...]] = ("generator", "critic")
    #: roles the loss differentiates with torch.func.jvp (trainer.compile leaves them eager)
    jvp_networks: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg, generate):
        """``generate(nets, batch) -> x0`` maps a batch to generator samples with gradients."""
        if cfg.ttur < 1:
            raise ConfigError(f"objective.ttur={cfg.ttur} must be >= 1 (critic updates per generator update)")
        self.cfg, self.generate = cfg, generate

    @property
    def critic_updates(self) -> int:
        return self.cfg.ttur if "critic" in self.networks or self.trains_critic_modules else 0

    #: set by the trainer when build_modules returned modules trained by the critic update
    trains_critic_modules: bool = False
    #: set by the trainer: the global batch (images per generator step, every process together); 0 = unknown, a
    #: loss that counts images (SiDA's GAN start) then counts its own batch
    images_per_step: int = 0

    def build_modules(self, setup) -> dict[str, tuple[nn.Module, str]]:
        """Extra trained modules (GAN heads, log-variance heads...): name -> (module, "generator" | "critic"),
        the second item naming the update (and optimizer) that trains it. The trainer moves them to the
        device, checkpoints them and passes them in ``Nets.modules``. ``setup`` is the experiment Setup."""
        return {}

    def targets(self) -> dict[str, float]:
        """Non-optimized copies of the generator this objective reads (``Nets.targets``): name -> EMA decay. The
        trainer creates them equal to the generator, moves them after every generator step
        (target <- decay * target + (1 - decay) * generator) and checkpoints them."""
        return {}

    def run_weights(self) -> dict[str, str]:
        """Generator weights this objective reads from other runs: its config field -> the path the field gives (a
        run folder, a checkpoint folder or a .safetensors file). The layer that runs the objective resolves the paths
        (objectives know no checkpoint layout: onestep.checkpoint.read_run_weights) and hands the weights to
        ``prepare``."""
        return {}

    def prepare(self, nets: Nets, weights: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        """Build what the objective derives once, before the first step (DMD's regression pairs). Under several
        processes the trainer runs it on the main process first and on the others after, so that a file written
        here is read by them, not rebuilt. ``weights``: the state dicts ``run_weights()`` named, by the same names."""

    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"objective {self.name} must define generator_loss")

    def critic_loss(self, nets: Nets, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"objective {self.name} trains a critic and must define critic_loss")


@contextmanager
def frozen(*modules: nn.Module | None):
    """Parameters stop requiring grad for the duration: the generator loss back-propagates *through* the
    critic and its heads (to their inputs) without leaving gradients on them for the next critic update."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def check_t_range(cfg, lo: str = "t_lo", hi: str = "t_hi") -> None:
    """The fractions of the schedule's time range an objective samples t from: 0 <= lo < hi <= 1."""
    a, b = getattr(cfg, lo), getattr(cfg, hi)
    if not 0 <= a < b <= 1:
        raise ConfigError(f"objective.{lo}={a}, objective.{hi}={b} must satisfy 0 <= {lo} < {hi} <= 1 (fractions of "
                          f"the schedule's time range); pass e.g. objective.{lo}=0.02 objective.{hi}=0.98")


def check_t_dist(cfg) -> None:
    """objective.t_dist names one of onestep.core.T_DISTS (fails when the objective is built, not at the first step)."""
    if cfg.t_dist not in T_DISTS:
        raise ConfigError(f"objective.t_dist='{cfg.t_dist}' is unknown; choose one of {T_DISTS}")


def register_objective(cls: type[Objective]) -> type[Objective]:
    OBJECTIVES[cls.name] = cls
    store(group="objective", name=cls.name, node=cls.Config)
    return cls


def make_objective(cfg, generate) -> Objective:
    if cfg.name not in OBJECTIVES:
        raise ConfigError(f"objective '{cfg.name}' is unknown; choose objective=<one of {sorted(OBJECTIVES)}>")
    return OBJECTIVES[cfg.name](cfg, generate)
