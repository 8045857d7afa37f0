"""Assemble an experiment from the config: the teacher family's parts (teacher, the net that initializes
generator and critic, codec, text encoding) and the data. The family comes from the registry
(onestep.teachers); the trainer only sees the resulting ``Setup``, and eval builds its evaluator from it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from onestep import teachers
from onestep.denoisers.attention import check_attention, set_attention
from onestep.denoisers.base import Denoiser
from onestep.denoisers.slim import student_of
from onestep.data.setup import Setup
from onestep.errors import ConfigError
from onestep.pretrain import fit_dsm

#: the data kinds of text-to-image runs (data.eval_path: held-out prompts for evaluation)
TEXT_DATA = ("prompts", "image_text", "digits_text", "video_text", "moving_digits_text", "webdataset")


def device_of(cfg) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not cfg.trainer.cpu else "cpu")


def cache_root(cfg) -> Path:
    """Where text embeddings and image latents are cached (data.cache, default <out_root>/cache)."""
    return Path(cfg.data.cache or Path(cfg.out_root) / "cache")


def load_teacher(cfg, run_dir: Path, progress: bool = True) -> Setup:
    """The teacher family's parts, without data (no data file is read, no embedding cache filled)."""
    from onestep.data.text import EmbeddingCache, TextConditioner

    tc = cfg.teacher
    # network inits (and the DSM fit's draws) are a function of the seed alone, whatever ran before in this process
    torch.manual_seed(cfg.seed)
    parts = teachers.family(tc.kind).load(cfg, tc.kind, device_of(cfg))
    init = parts.student_init if parts.student_init is not None else parts.denoiser
    if parts.fit_on is not None:
        _fit_or_read(init, parts.fit_on, cfg, Path(run_dir), progress)
    teacher = parts.denoiser if parts.denoiser is not None else copy.deepcopy(init)
    generator_init = _generator_init(cfg, init) if cfg.generator.arch else None
    conditioner = None
    if parts.text is not None:
        cache = EmbeddingCache(parts.text, cache_root(cfg), progress)
        conditioner = TextConditioner(parts.text, cache, tc.negative_prompt, parts.image_size)
    return Setup(teacher=teacher, student_init=init, generator_init=generator_init, data=None, num_classes=parts.num_classes, codec=parts.codec,
                 conditioner=conditioner, distribution=parts.distribution)


def _generator_init(cfg, init: Denoiser) -> Denoiser:
    """generator.arch's network, initialised from the (fitted) student init where shapes allow. Its fresh tensors are
    drawn from the seed alone (with or without a DSM fit before it, on every process alike: FSDP shards them)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net, copied, fresh = student_of(init, cfg.generator.arch)
    count = sum(p.numel() for p in net.parameters())
    print(f"generator.arch '{cfg.generator.arch}': {count / 1e6:.3f}M params (teacher network "
          f"{sum(p.numel() for p in init.parameters()) / 1e6:.3f}M); {copied} tensors copied from the teacher, "
          f"{fresh} fresh", flush=True)
    return net


def _fit_or_read(net: Denoiser, clean, cfg, run_dir: Path, progress: bool) -> None:
    """The family's own net, fitted by DSM once per run folder (teacher.net_*) and read back afterwards."""
    tc = cfg.teacher
    cached = run_dir / "teacher_net.safetensors"
    if cached.exists():
        try:
            net.load_state_dict(load_file(str(cached)))
        except Exception as e:  # noqa: BLE001 - safetensors and load_state_dict raise their own error types
            raise ConfigError(f"'{cached}' (the run's DSM-trained teacher net) is unreadable ({type(e).__name__}); "
                              "delete it and rerun: it is rebuilt from teacher.net_* and the seed") from None
        net.eval().requires_grad_(False)
        return
    fit_dsm(net, clean, steps=tc.net_steps, lr=tc.net_lr, batch=tc.net_batch, seed=cfg.seed, progress=progress)
    tmp = cached.with_suffix(".tmp")
    save_file(net.state_dict(), str(tmp))
    tmp.replace(cached)
    print(f"teacher net: {tc.net_steps} DSM steps -> {cached}", flush=True)


def read_data_files(dc):
    """The data's own files (prompts, captioned images or videos), read before any model loads."""
    from onestep.data.text import find_image_text_pairs, read_prompts
    from onestep.data.video_text import find_video_text_pairs

    if dc.kind == "prompts":
        return read_prompts(dc.path)
    if dc.kind == "image_text":
        return find_image_text_pairs(dc.path)
    if dc.kind == "webdataset":
        from onestep.data.shards import expand

        return expand(dc.path)
    if dc.kind == "video_text":
        return find_video_text_pairs(dc.path)
    return None


def add_data(cfg, setup: Setup, files=None, progress: bool = True) -> Setup:
    """``setup`` with its training (and evaluation) data; ``files``: what ``read_data_files`` read, if it ran."""
    from onestep.data.text import ImageTextData, PromptData, read_prompts

    dc, shape = cfg.data, tuple(setup.teacher.data_shape)
    files = read_data_files(dc) if files is None else files
    if dc.kind == "gmm":
        from onestep.data.gmm import GMMData

        setup.data = GMMData(setup.distribution)
    elif dc.kind == "digits":
        from onestep.data.digits import DigitsData

        setup.data = DigitsData("train", shape[-1])
    elif dc.kind == "prompts":
        setup.data = PromptData(files, setup.conditioner, shape)
    elif dc.kind == "image_text":
        setup.data = ImageTextData.from_folder(files, setup.conditioner, setup.codec, setup.conditioner.size,
                                               cache_root(cfg), shape, progress)
    elif dc.kind == "video_text":
        from onestep.data.video_text import video_text_data

        setup.data = video_text_data(files, setup.teacher, setup.codec, setup.conditioner, cache_root(cfg), progress)
    elif dc.kind == "digits_text":
        from onestep.data.digits_text import captioned_latents

        setup.data = ImageTextData(*captioned_latents(setup.codec, setup.conditioner.size), setup.conditioner, shape)
    elif dc.kind == "moving_digits_text":
        from onestep.data.moving_digits import captioned_latents

        setup.data = ImageTextData(*captioned_latents(setup.codec), setup.conditioner, shape)
    elif dc.kind == "webdataset":
        from onestep.data.shards import ShardStream, WebData

        dist = torch.distributed
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        setup.data = WebData(ShardStream(files, cfg.seed, rank, world), setup.conditioner, setup.codec,
                             setup.conditioner.size, shape)
    else:  # a family that lists a data kind no source here builds
        raise ConfigError(f"data.kind '{dc.kind}' has no data source; use data=gmm, digits, prompts, image_text, "
                          "digits_text, video_text, moving_digits_text or webdataset (the family of teacher.kind "
                          "names the ones it trains on)")
    if dc.kind in TEXT_DATA and dc.eval_path:
        setup.eval_data = PromptData(read_prompts(dc.eval_path, "data.eval_path"), setup.conditioner, shape)
    position = setup.data.state_dict() if hasattr(setup.data, "state_dict") else None
    probe = setup.data.batch(2, torch.device("cpu"))
    if position is not None:  # a streamed source: the probe must not move the position training starts from
        setup.data.load_state_dict(position)
    if tuple(probe.noise.shape[1:]) != shape:
        raise ConfigError(f"data '{dc.kind}' gives samples of shape {tuple(probe.noise.shape[1:])} but the "
                          f"teacher expects {shape}; pick matching data= and teacher=")
    return setup


def check_data_kind(cfg) -> None:
    fam, kind = teachers.family(cfg.teacher.kind), cfg.data.kind
    if kind not in fam.data_kinds:
        raise ConfigError(f"teacher={cfg.teacher.kind} trains on {fam.data_hint}, not data={kind}")


def build(cfg, run_dir: Path, progress: bool = True) -> Setup:
    from onestep.rewards.registry import build_reward

    check_data_kind(cfg)
    check_attention(cfg.generator.attention)  # before any teacher pretraining
    files = read_data_files(cfg.data)
    setup = add_data(cfg, load_teacher(cfg, run_dir, progress), files, progress)
    reward = build_reward(cfg.reward) if getattr(cfg, "reward", None) is not None else None
    setup.reward = reward.to(device_of(cfg)) if reward is not None else None
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
