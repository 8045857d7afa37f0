"""The objective interface.

An objective is a small class: the networks it trains (``networks``), a typed config (``Config``, a
dataclass registered as a Hydra option of the ``objective`` group), ``generator_loss`` and, when it
trains a critic, ``critic_loss``. Losses return a dict of named scalars: "loss" is optimized, the rest
are logged. The trainer owns optimizers, the update schedule (``critic_updates`` per generator step,
i.e. TTUR), precision, EMA and checkpoints; objectives know nothing of them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields
from typing import Callable, ClassVar

import torch
from torch import nn

from onestep.config import GeneratorConfig, store
from onestep.core import CRITIC_T_DISTS, T_DISTS, Batch, Nets
from onestep.denoisers.base import Denoiser
from onestep.errors import ConfigError

OBJECTIVES: dict[str, type["Objective"]] = {}


def every_step(step: int) -> bool:
    """``Objective.logged`` of a loss called outside the trainer: every step's logs are read."""
    return True


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
    """The critic's DSM update (``check_critic_t_dist`` checks the draw)."""

    #: critic's DSM weighting: edm | eps | x0 | v (onestep.core.dsm_loss)
    critic_weighting: str = "edm"
    #: the critic's DSM noise level: unit (u ~ U[0, 1] through the schedule: log-uniform sigma on EDM) | grid (index
    #: uniform over the 1000-point Karras grid on EDM, DMD2's: tianweiy/DMD2 main/edm/edm_guidance.py:138-145; SD's
    #: timesteps 0..999) | lognormal (sigma = exp(-1.2 + 1.2 N), SiD's: mingyuanzhou/SiD training/sid_loss.py:59-60);
    #: see onestep.core.dsm_t
    critic_t_dist: str = "unit"
    #: the fractions of the schedule's range the unit / grid critic draws read (SiD-LSG's randint(20, 980): 0.02, 0.979,
    #: mingyuanzhou/SiD-LSG training/sid_training_loop.py:172-173, :413)
    critic_t_lo: float = 0.0
    critic_t_hi: float = 1.0


class Objective:
    name: ClassVar[str]
    Config: ClassVar[type] = ObjectiveConfig
    #: trained networks besides the generator; "critic" is a copy of the teacher net (fake score)
    networks: ClassVar[tuple[str, ...]] = ("generator", "critic")
    #: roles the loss differentiates with torch.func.jvp (trainer.compile leaves them eager)
    jvp_networks: ClassVar[tuple[str, ...]] = ()
    #: the generator.<key> fields ``shape_generator`` reads; under any other objective they keep their defaults
    generator_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg, generate):
        """``generate(nets, batch) -> x0`` maps a batch to generator samples with gradients."""
        if cfg.ttur < 1:
            raise ConfigError(f"objective.ttur={cfg.ttur} must be >= 1 (critic updates per generator update)")
        self.cfg, self.generate = cfg, generate

    @classmethod
    def shape_generator(cls, gc, net: Denoiser) -> Denoiser:
        """The network this objective trains, made from one copy of the student init (generator and critic alike):
        several routed students (MSD), one expert per step (Phased DMD), a guidance input (guidance distillation).
        ``gc`` is the generator config; the default trains ``net`` as it is."""
        return net

    @classmethod
    def shaped(cls, gc, net: Denoiser) -> Denoiser:
        """``shape_generator`` after ``check_generator_keys``: what experiment.shape_student applies to each copy of
        the student init for a run of this objective."""
        check_generator_keys(cls, gc)
        return cls.shape_generator(gc, net)

    @classmethod
    def export_refusal(cls, gc) -> str | None:
        """Why the generator ``shape_generator`` makes from ``gc`` has no diffusers pipeline (it routes between
        networks), said as "generator.<key>=<value>: <what the generator does>"; None = it exports."""
        return None

    def accumulation_refusal(self) -> str | None:
        """Why K micro-batches of this objective's losses would not give the loss of their K·B rows together
        (trainer.grad_accum), said as "objective.<key>=<value> <what ties the rows of a batch>": a statistic of the
        whole batch (a normalisation over it), a share of its rows treated differently. None = every loss is a mean of
        per-row terms whose draws the trainer can place (onestep/train/data_parallel.py), so the micro-batches add up."""
        return None

    @property
    def critic_updates(self) -> int:
        return self.cfg.ttur if "critic" in self.networks or self.trains_critic_modules else 0

    #: whether build_modules' modules include one trained by the critic update (``set_run``)
    trains_critic_modules: bool = False
    #: the global batch (images per generator step, every process together; ``set_run``); 0 = unknown, a loss
    #: that counts images (SiDA's GAN start) then counts its own batch
    images_per_step: int = 0

    #: whether the trainer reads the logs of generator step ``step`` (0-based; ``set_run``): a logged value that costs
    #: extra passes (NCT's control accuracy) is computed on those steps only
    logged: Callable[[int], bool] = staticmethod(every_step)

    def set_run(self, modules: dict[str, tuple[nn.Module, str]], images_per_step: int,
                logged: Callable[[int], bool] = every_step) -> None:
        """What the trainer knows once it built the run: the modules ``build_modules`` returned (heads trained by
        the critic update count as critic updates without a critic network), the global batch and which steps
        are log steps (``logged``)."""
        self.trains_critic_modules = any(role == "critic" for _, role in modules.values())
        self.images_per_step = images_per_step
        self.logged = logged

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

    def data_streams(self) -> dict[str, str]:
        """Data this objective draws besides the run's data: its config field -> the folder of captioned still images
        the field gives (MCM's frame discriminator). The layer that runs the objective builds a source per stream with
        the teacher's codec and text encoder (onestep.data.stills) and hands them to ``set_data``."""
        return {}

    def set_data(self, sources: dict) -> None:
        """The sources ``data_streams()`` named, by the same names: objects with ``batch(n, device) -> Batch`` that the
        losses draw from (inside the trainer's per-step RNG, like the run's own data)."""

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


def check_critic_t_dist(cfg) -> None:
    """objective.critic_t_dist names one of onestep.core.CRITIC_T_DISTS and critic_t_lo / critic_t_hi are a range (fails
    when the objective is built)."""
    if cfg.critic_t_dist not in CRITIC_T_DISTS:
        raise ConfigError(f"objective.critic_t_dist='{cfg.critic_t_dist}' is unknown; choose one of {CRITIC_T_DISTS}")
    check_t_range(cfg, "critic_t_lo", "critic_t_hi")


def load_generator_weights(net: nn.Module, weights: dict[str, torch.Tensor], key: str, path: str, fix: str) -> None:
    """Copy another run's generator weights (``prepare``'s ``weights[name]``) into ``net`` in place; every parameter must
    be there with its shape, else a one-line ConfigError naming ``key`` = ``path`` and ``fix``."""
    own = dict(net.named_parameters())
    bad = sorted(n for n, p in own.items() if n not in weights or weights[n].shape != p.shape)
    if bad:
        raise ConfigError(f"{key}: '{path}' does not fit this run's generator ({len(bad)} of {len(own)} parameters "
                          f"missing or of another shape, e.g. {bad[0]}); {fix}")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(weights[n].to(p))


def register_objective(cls: type[Objective]) -> type[Objective]:
    OBJECTIVES[cls.name] = cls
    store(group="objective", name=cls.name, node=cls.Config)
    return cls


def objective_class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ConfigError(f"objective '{name}' is unknown; choose objective=<one of {sorted(OBJECTIVES)}>")
    return OBJECTIVES[name]


def make_objective(cfg, generate) -> Objective:
    return objective_class(cfg.name)(cfg, generate)


def check_generator_keys(cls: type[Objective], gc) -> None:
    """The generator.<key> fields another objective's ``shape_generator`` reads are at their defaults: this
    objective would not read them, and a run that sets one meant that objective."""
    defaults = {f.name: f.default for f in fields(GeneratorConfig) if f.default is not MISSING}
    for other in sorted(OBJECTIVES.values(), key=lambda c: c.name):
        for key in other.generator_keys:
            if key not in cls.generator_keys and getattr(gc, key) != defaults[key]:
                raise ConfigError(f"generator.{key}={getattr(gc, key)} shapes the generator of objective={other.name}, and "
                                  f"objective={cls.name} does not read it: pass objective={other.name} or leave "
                                  f"generator.{key} at {defaults[key]}")

