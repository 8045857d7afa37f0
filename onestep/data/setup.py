"""What an experiment is made of (``Setup``): the teacher family's parts and the data, as experiment.py
assembles them. It sits with the data sources so that the layers above experiment (runs, eval, train) can name
it without importing the assembly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from onestep.core import Batch
from onestep.denoisers.base import Denoiser


class DataSource(Protocol):
    data_shape: tuple[int, ...]

    def batch(self, n: int, device: torch.device) -> Batch: ...


@dataclass
class Setup:
    teacher: Denoiser  # frozen real score, unguided (the trainer applies teacher.guidance)
    #: what generator and critic start from (networks.Networks copies it, or puts LoRA adapters on it); the
    #: teacher object itself when they start from the teacher's network
    student_init: Denoiser
    #: training data; None in a setup made by ``load_teacher`` (a run loaded for export or sampling)
    data: DataSource | None
    num_classes: int = 0
    #: what the generator starts from when generator.arch gives it an architecture of its own (denoisers/slim.py:
    #: initialised from ``student_init`` where shapes allow); None = ``student_init``, as the critic always does
    generator_init: Denoiser | None = None
    #: where evaluation draws its noise and conditioning (e.g. held-out prompts); None = ``data``
    eval_data: DataSource | None = None
    #: latent-space teachers: the VAE codec (``decode``: latents -> images in [-1, 1]); None = pixel space
    codec: object | None = None
    #: text-to-image teachers: prompts -> Cond (data/text.TextConditioner); None = class labels or unconditional
    conditioner: Callable | None = None
    #: the exact data distribution when the family knows it (a GaussianMixture): data and exact metrics
    distribution: object | None = None
    #: ``reward=``'s reward (onestep/rewards/registry.py), built with the training data on the teacher's device: what
    #: reward-tuning objectives read (``build_modules``) and the evaluation reports; None = reward=none
    reward: torch.nn.Module | None = None

    @property
    def generator_start(self) -> Denoiser:
        """The network the generator is a copy of: ``generator_init``, else ``student_init``."""
        return self.generator_init if self.generator_init is not None else self.student_init
