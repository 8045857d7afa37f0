"""What a teacher family is: one object that knows how to load, encode for, evaluate and export one kind of
teacher. Each family file (gmm.py, digits.py, sd.py, ...) subclasses ``Family``, fills in what applies, and
registers one instance (``onestep.teachers.register``). The layers above ask the instance; none names a family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from onestep.denoisers.base import Denoiser
from onestep.denoisers.pipeline_folder import Layout


@dataclass
class Parts:
    """What a family's ``load`` gives a run."""

    #: the frozen teacher, unguided; None = the DSM-fitted ``student_init`` itself (a copy of it)
    denoiser: Denoiser | None
    #: what generator and critic start from; None = ``denoiser``
    student_init: Denoiser | None = None
    #: a sampler of clean data ``n -> (x0, labels | None)`` on which ``student_init`` is first fitted by denoising
    #: score matching (cached in the run folder); None = it is ready as loaded
    fit_on: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]] | None = None
    num_classes: int = 0
    #: latent-space teachers: the VAE codec (``decode``: latents -> images in [-1, 1]); None = pixel space
    codec: object | None = None
    #: text-to-image teachers: the prompt encoder (``encode``, ``assemble``; pipeline_folder.PromptEncoder)
    text: object | None = None
    #: generated image side in pixels (text-to-image teachers)
    image_size: int | None = None
    #: the exact data distribution when the family knows it (a GaussianMixture): data and exact metrics
    distribution: object | None = None


@dataclass(frozen=True)
class SingleFile:
    """How a pipeline folder is written as one original-layout (LDM) safetensors file (export/single_file.py)."""

    #: the subfolders whose weights go into the file
    subfolders: tuple[str, ...]
    #: key prefix of the first (transformers-layout) CLIP text encoder
    clip_prefix: str
    #: whether text_encoder_2 goes in too, in OpenCLIP layout (SDXL)
    open_clip: bool = False


class Family:
    """One teacher family. Class attributes describe it; ``load`` reads its folder."""

    #: the ``teacher.kind`` values this family serves (one file may serve several: sd15 and sdxl)
    kinds: tuple[str, ...] = ()
    #: Hydra ``teacher=<name>`` presets: name -> TeacherConfig fields
    presets: dict[str, dict] = {}
    #: config fields this family reads beyond the ones every family reads, by section ("teacher", "eval",
    #: "generator"); a field some family lists is shown by --help only for the families that list it (and
    #: validate refuses a set teacher.resolution elsewhere)
    fields: dict[str, tuple[str, ...]] = {}
    #: diffusers pipeline folders: kind -> the folder's sub-folders, the pipeline classes that write it (the first
    #: is the one its students export to) and the phrase a hint names it by (denoisers/pipeline_folder.py checks
    #: folders against them)
    layouts: dict[str, Layout] = {}
    #: the ``data.kind`` values it trains on, and the phrase of the error that names them
    data_kinds: tuple[str, ...] = ()
    data_hint: str = ""
    #: the evaluation protocol eval/ builds for it (eval.evaluators.PROTOCOLS)
    evaluation: str = ""
    #: the pipeline component that holds the denoising network
    network: str = "unet"
    #: the stock scheduler that reproduces a student's sampling: "table" (LCM / DDIM on a discrete table),
    #: "flow" (FlowMatchEulerDiscreteScheduler on the student's sigmas), "flow_steps" (the same scheduler's own k-step
    #: grid, for pipelines whose call takes no sigmas), "class" (the export's own class-conditional pipeline.py)
    export_scheduler: str | None = None
    #: the stock scheduler class that runs a ddim student on the family's discrete table (export_scheduler "table"),
    #: made from the teacher folder's scheduler config
    ddim_scheduler: str = "DDIMScheduler"
    #: the pipeline does not pass its ``generator`` to ``scheduler.step``: a stochastic scheduler's re-noising
    #: draws come from torch's global RNG (callers reseed it; `onestep sample` draws them from a second generator)
    reseed_global: bool = False
    #: single-file (LDM layout) export of the folder, per kind; absent kinds have none
    single_file: dict[str, SingleFile] = {}
    #: whether its students read prompt embeddings in diffusers cross-attention layers (NASA's place)
    nasa: bool = False

    def reads(self, section: str, name: str) -> bool:
        return name in self.fields.get(section, ())

    def load(self, cfg, kind: str, device: torch.device) -> Parts:
        raise NotImplementedError(f"teacher family {type(self).__name__} must define load(cfg, kind, device) -> Parts")

    def pipeline(self, kind: str) -> str | None:
        """The diffusers pipeline class its students export to (None: no stock pipeline)."""
        return None

    def pipeline_kwargs(self, kind: str) -> dict:
        """Extra keyword arguments of the pipeline's ``from_pretrained`` at export."""
        return {}

    def call_extras(self, tc) -> dict:
        """Extra keyword arguments of the exported pipeline's call (what the pipeline would otherwise change)."""
        return {}

    def student_components(self, net) -> dict:
        """The pipeline components a student network fills, when it holds several diffusers models (component name
        -> model); {} = the one model it holds, as the component ``network``."""
        return {}


class TextToImage(Family):
    """A local diffusers text-to-image pipeline folder (``layouts``): prompts or captioned images as data,
    decoded-image evaluation."""

    fields = {"teacher": ("path", "negative_prompt", "resolution"),
              "eval": ("features", "inception_path", "reference", "stats_cache", "clip", "rewards"),
              "generator": ("attention",)}
    data_kinds = ("prompts", "image_text", "webdataset", "digits_text")
    data_hint = ("text: use data=prompts (data.path=<prompts.txt>), data=image_text (data.path=<folder of images + "
                 ".txt captions>), data=webdataset (data.path='shards/{00000..00099}.tar') or data=digits_text "
                 "(captioned digits, for the shipped digits_t2i teacher)")
    evaluation = "text_images"
    network = "transformer"
    export_scheduler = "flow"

    def pipeline(self, kind: str) -> str:
        return self.layouts[kind].pipelines[0]
