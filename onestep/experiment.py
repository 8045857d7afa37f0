"""Assemble an experiment from the config: teacher, the net that initializes generator and critic, data,
and the evaluator. One builder per ``teacher.kind``; the trainer only sees the resulting ``Setup``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from safetensors.torch import load_file, save_file

from onestep.conditioning import Labels
from onestep.denoisers.attention import check_attention, set_attention
from onestep.denoisers.base import Denoiser
from onestep.denoisers.gmm import GMMDenoiser, make_mixture
from onestep.denoisers.nets import MLPDenoiser
from onestep.errors import ConfigError
from onestep.core import Batch
from onestep.schedules import make_schedule
from onestep.pretrain import fit_dsm


class DataSource(Protocol):
    data_shape: tuple[int, ...]

    def batch(self, n: int, device: torch.device) -> Batch: ...


class Evaluator(Protocol):
    #: the metric that ranks models (lower is better), e.g. "sliced_w2" or "fd"
    headline: str

    def metrics(self, x: torch.Tensor, cond: torch.Tensor | None) -> dict: ...

    def plot(self, path: Path, panels: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None: ...


@dataclass
class Setup:
    teacher: Denoiser  # frozen real score, unguided (the trainer applies teacher.guidance)
    #: what generator and critic start from (train/networks.py copies it, or puts LoRA adapters on it); the
    #: teacher object itself when they start from the teacher's network
    student_init: Denoiser
    data: DataSource
    evaluator: Evaluator
    num_classes: int = 0
    #: where evaluation draws its noise and conditioning (e.g. held-out prompts); None = ``data``
    eval_data: DataSource | None = None
    #: latent-space teachers: the VAE codec (``decode``: latents -> images in [-1, 1]); None = pixel space
    codec: object | None = None
    #: text-to-image teachers: prompts -> Cond (data/text.TextConditioner); None = class labels or unconditional
    conditioner: Callable | None = None


class GMMData:
    def __init__(self, mixture):
        self.mixture, self.data_shape = mixture, (mixture.dim,)

    def batch(self, n: int, device) -> Batch:
        labels = self.mixture.sample_labels(n)
        real = self.mixture.sample(n, labels).float()
        noise = torch.randn(n, self.mixture.dim)
        cond = None if labels is None else Labels(labels, self.mixture.num_classes).to(device)
        return Batch(noise=noise.to(device), cond=cond, real=real.to(device))

    def clean(self, n: int):
        cond = self.mixture.sample_labels(n)
        return self.mixture.sample(n, cond).float(), cond


def _mixture(cfg):
    try:
        return make_mixture(cfg.mixture, **cfg.mixture_args)
    except TypeError as e:
        raise ConfigError(f"teacher.mixture_args {dict(cfg.mixture_args)} do not fit mixture '{cfg.mixture}' ({e})") from None


def _schedule(cfg):
    try:
        return make_schedule(cfg.schedule, **cfg.schedule_args)
    except TypeError as e:
        raise ConfigError(f"teacher.schedule_args {dict(cfg.schedule_args)} do not fit schedule '{cfg.schedule}' ({e})") from None


def build_gmm(cfg, run_dir: Path, progress: bool = True) -> Setup:
    from onestep.eval.gmm_eval import GMMEvaluator

    tc = cfg.teacher
    mix, sched = _mixture(tc), _schedule(tc)
    data = GMMData(mix)
    net = MLPDenoiser(sched, mix.dim, hidden=tc.net_hidden, depth=tc.net_depth, num_classes=mix.num_classes,
                      time_scale=tc.net_time_scale)
    cached = Path(run_dir) / "teacher_net.safetensors"
    if cached.exists():
        try:
            net.load_state_dict(load_file(str(cached)))
        except Exception as e:  # noqa: BLE001 - safetensors and load_state_dict raise their own error types
            raise ConfigError(f"'{cached}' (the run's DSM-trained teacher net) is unreadable ({type(e).__name__}); "
                              "delete it and rerun: it is rebuilt from teacher.net_* and the seed") from None
        net.eval().requires_grad_(False)
    else:
        fit_dsm(net, data.clean, steps=tc.net_steps, lr=tc.net_lr, batch=tc.net_batch, seed=cfg.seed,
                progress=progress)
        tmp = cached.with_suffix(".tmp")
        save_file(net.state_dict(), str(tmp))
        tmp.replace(cached)
        print(f"teacher net: {tc.net_steps} DSM steps -> {cached}", flush=True)
    exact = GMMDenoiser(mix, sched)
    teacher = exact if tc.kind == "gmm" else copy.deepcopy(net)
    return Setup(teacher=teacher, student_init=net, data=data, evaluator=GMMEvaluator(mix),
                 num_classes=mix.num_classes)


def build_digits(cfg, run_dir: Path, progress: bool = True) -> Setup:
    """The shipped digits UNet teacher (or teacher.path), digits train split as data, FD against all digits."""
    from onestep.data.digits import DigitsData, load_digits_tensors
    from onestep.denoisers.diffusers import load_unet_denoiser
    from onestep.eval.digits_eval import DigitsEvaluator

    folder = cfg.teacher.path or Path(__file__).resolve().parent / "assets" / "digits_teacher"
    teacher = load_unet_denoiser(folder, "digits teacher", "reinstall onestep, rebuild it with "
                                 "tools/train_digits_teacher.py, or pass teacher.path=<folder>")
    size = teacher.data_shape[-1]
    data = DigitsData("train", size)
    evaluator = DigitsEvaluator(load_digits_tensors("all", size)[0], data.num_classes)
    return Setup(teacher=teacher, student_init=teacher, data=data, evaluator=evaluator,
                 num_classes=teacher.num_classes)


def load_text_to_image(tc, device):
    """The teacher folder's parts (denoiser, text encoder, codec, image size) for a text-to-image teacher kind."""
    if tc.kind in ("sd15", "sdxl"):
        from onestep.denoisers.sd import load_sd

        return load_sd(tc.path, tc.kind, device=device, resolution=tc.resolution)
    if tc.kind in ("sd3", "flux"):
        from onestep.denoisers.flow import load_flow

        # guidance-distilled Flux takes the scale as an input: the bare networks get teacher.guidance too
        return load_flow(tc.path, tc.kind, device=device, resolution=tc.resolution, guidance=tc.guidance,
                         max_sequence_length=tc.max_sequence_length)
    from onestep.denoisers.sana import load_sana

    return load_sana(tc.path, device=device, resolution=tc.resolution)


def build_sd(cfg, run_dir: Path, progress: bool = True) -> Setup:
    """A local text-to-image pipeline folder (SD1.x/2.x, SDXL, SD3, Flux, Sana): its UNet / transformer as teacher
    and student init (the Networks copy it or put LoRA adapters on it), prompts or captioned images as data
    (embeddings / latents cached), decoded-image eval."""
    from onestep.data.text import (EmbeddingCache, ImageTextData, PromptData, TextConditioner,
                                   find_image_text_pairs, read_prompts)
    from onestep.eval.t2i_eval import TextImageEvaluator

    tc, dc = cfg.teacher, cfg.data
    if dc.kind not in ("prompts", "image_text", "digits_text"):
        raise ConfigError(f"teacher={tc.kind} trains on text: use data=prompts (data.path=<prompts.txt>), "
                          f"data=image_text (data.path=<folder of images + .txt captions>) or data=digits_text "
                          f"(captioned digits, for the shipped digits_t2i teacher), not data={dc.kind}")
    # the data's files first: a bad data.path fails before the models load
    source = read_prompts(dc.path) if dc.kind == "prompts" else \
        find_image_text_pairs(dc.path) if dc.kind == "image_text" else None
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.trainer.cpu else "cpu")
    parts = load_text_to_image(tc, device)
    teacher, size = parts.denoiser, parts.image_size
    cache_root = Path(dc.cache or Path(cfg.out_root) / "cache")
    conditioner = TextConditioner(parts.text, EmbeddingCache(parts.text, cache_root, progress), tc.negative_prompt, size)
    if dc.kind == "prompts":
        data = PromptData(source, conditioner, teacher.data_shape)
    elif dc.kind == "image_text":
        data = ImageTextData.from_folder(source, conditioner, parts.codec, size, cache_root, teacher.data_shape,
                                         progress)
    else:
        from onestep.data.digits_text import captioned_latents

        data = ImageTextData(*captioned_latents(parts.codec, size), conditioner, teacher.data_shape)
    eval_data = PromptData(read_prompts(dc.eval_path, "data.eval_path"), conditioner, teacher.data_shape) \
        if dc.eval_path else None
    if cfg.eval.features == "digits":
        from onestep.eval.digits_eval import DigitsTextEvaluator

        evaluator = DigitsTextEvaluator(parts.codec)
    else:
        evaluator = TextImageEvaluator(parts.codec, cfg.eval, cfg.out_root, device)
    return Setup(teacher=teacher, student_init=teacher, data=data, evaluator=evaluator, eval_data=eval_data,
                 codec=parts.codec, conditioner=conditioner)


BUILDERS: dict[str, Callable[..., Setup]] = {"gmm": build_gmm, "gmm_learned": build_gmm, "digits": build_digits,
                                             "sd15": build_sd, "sdxl": build_sd, "sd3": build_sd, "flux": build_sd,
                                             "sana": build_sd}


def build(cfg, run_dir: Path, progress: bool = True) -> Setup:
    kind = cfg.teacher.kind
    if kind not in BUILDERS:
        raise ConfigError(f"teacher.kind '{kind}' is unknown; choose one of {sorted(BUILDERS)}")
    check_attention(cfg.generator.attention)  # before any teacher pretraining
    setup = BUILDERS[kind](cfg, run_dir, progress)
    probe = setup.data.batch(2, torch.device("cpu"))
    if tuple(probe.noise.shape[1:]) != tuple(setup.teacher.data_shape):
        raise ConfigError(f"data '{cfg.data.kind}' gives samples of shape {tuple(probe.noise.shape[1:])} but the "
                          f"teacher expects {tuple(setup.teacher.data_shape)}; pick matching data= and teacher=")
    return setup


def shape_student(gc, net: Denoiser, objective) -> Denoiser:
    """generator.attention, the run's objective's shape (``objective``: its class, whose ``shaped(gc, net)`` reads
    the generator keys it owns: routed students, phase experts, a guidance input) and generator.consistency_boundary
    applied to a generator / critic network (the ``shape`` that networks.Networks applies to each copy of
    ``setup.student_init``)."""
    from onestep.denoisers.consistency import ConsistencyBoundary

    set_attention(net, gc.attention)
    net = objective.shaped(gc, net)
    return ConsistencyBoundary(net) if gc.consistency_boundary else net
