"""A finished (or checkpointed) `onestep train` run folder, loaded for sampling, export, evaluation and bench:
its resolved config (the run's plugins imported first), its teacher family's parts and the newest checkpoint's
generator (EMA by default), through the Networks seam (networks.load_generator), never through the trainer.
The training data are built only when asked (``Run.data``): export and sample read neither the prompt file nor
the embedding cache, and no evaluator is built here (eval.evaluators builds one from ``run.data()``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from onestep import checkpoint, experiment, plugins
from onestep.config import BenchConfig, CriticConfig, EvalConfig, GeneratorConfig, TrainerConfig
from onestep.data.setup import Setup
from onestep.errors import ConfigError
from onestep.experiment import shape_student
from onestep.generator import Student
from onestep.networks import EMA, load_generator
from onestep.objectives import objective_class


@dataclass
class Run:
    path: Path
    cfg: object  # the run's resolved config
    #: the teacher's parts; ``setup.data`` is None until ``data()`` builds it
    setup: Setup
    generator: torch.nn.Module
    step: int
    progress: bool = False

    @property
    def finished(self) -> bool:
        return self.step >= int(self.cfg.trainer.steps)

    def student(self) -> Student:
        gc = self.cfg.generator
        return Student.from_config(self.setup.teacher.schedule, gc)

    def at_checkpoint(self, step: int, device: torch.device, role: str = EMA) -> "Run":
        """The same run with the generator of its newest readable checkpoint of step <= ``step`` (the teacher is not
        loaded again: what an evaluator following a run's checkpoints needs)."""
        generator, got = load_generator(self.cfg, self.setup, self.path, role=role, device=device,
                                        shape=partial(shape_student, self.cfg.generator,
                                                      objective=objective_class(self.cfg.objective.name)),
                                        upto=step)
        return replace(self, generator=generator, step=got)

    def data(self) -> Setup:
        """The setup with the run's data (built on the first call: reads data.path, fills the caches)."""
        if self.setup.data is None:
            experiment.check_data_kind(self.cfg)
            experiment.add_data(self.cfg, self.setup, progress=self.progress)
        return self.setup


def run_config(path: str | Path, key: str, fix: str):
    """The run folder's resolved config; fields added to the schemas after the run was made take their defaults."""
    run = Path(path)
    if not run.is_dir():
        raise ConfigError(f"{key}: '{path}' is not a folder; {fix}")
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{key}: '{path}' has no config.yaml, so it is not a onestep run folder; {fix}")
    config = OmegaConf.load(run / "config.yaml")
    plugins.load(config.get(plugins.KEY))  # what the run's own command imported (families, objectives)
    defaults = {"generator": GeneratorConfig, "critic": CriticConfig, "trainer": TrainerConfig, "eval": EvalConfig,
                "bench": BenchConfig}
    return OmegaConf.merge(OmegaConf.create({k: OmegaConf.structured(v) for k, v in defaults.items()}),
                           config)


def load_run(path: str | Path, device: torch.device, key: str = "bench.runs",
             fix: str = "pass bench.runs=[<run folder of onestep train>, ...]", role: str = EMA,
             progress: bool = False, frozen_dtype: str | None = None, eval_cfg=None) -> Run:
    """A `onestep train` run folder -> its config, teacher and newest checkpoint's ``role`` (generator_ema).
    ``frozen_dtype`` overrides the run's trainer.frozen_dtype (sampling and export use fp32: a LoRA student's base
    then runs in the precision its merged export has); ``eval_cfg`` replaces its eval section (the bench's
    protocol)."""
    run = Path(path)
    cfg = run_config(run, key, fix)
    if frozen_dtype is not None:
        cfg.trainer.frozen_dtype = frozen_dtype
    if eval_cfg is not None:
        cfg.eval = eval_cfg
    if not checkpoint.list_checkpoints(run):
        raise ConfigError(f"{key}: '{path}' has no checkpoint yet; train it (onestep train run_dir={path}) first")
    setup = experiment.load_teacher(cfg, run, progress=progress)
    try:
        generator, step = load_generator(cfg, setup, run, role=role, device=device,
                                         shape=partial(shape_student, cfg.generator,
                                                       objective=objective_class(cfg.objective.name)))
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}; train it further or {fix}") from None
    return Run(run, cfg, setup, generator, step, progress)


def config_setup(cfg, folder: str | Path, progress: bool = True) -> Setup:
    """The experiment a config describes, with its data, when there is no trained run to load (the teacher's
    curves of `onestep bench`)."""
    return experiment.build(cfg, Path(folder), progress=progress)
