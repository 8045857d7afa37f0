"""Adapters from diffusers models to the Denoiser interface.

``UNet2DDenoiser`` wraps a ``diffusers.UNet2DModel``: the network predicts ``prediction`` (eps | v | x0)
under ``schedule`` (any VP schedule from onestep.schedules: ``vp_discrete`` for diffusers' DDPM tables,
``vp_cosine``, ``vp_linear``), and receives the diffusers timestep
    timestep = schedule.index(t)           for discrete tables (the table row, 0..N-1),
    timestep = timestep_scale * t          otherwise (a continuous time scaled to the usual 0..1000 range).
Class-conditional models use ``num_class_embeds = num_classes + 1``: the last embedding is the "no label"
token that label dropout trains and classifier-free guidance (``Guided``) feeds.

A model folder is diffusers' ``save_pretrained`` layout (``config.json`` + ``diffusion_pytorch_model.safetensors``)
plus ``onestep.json`` whose ``denoiser`` entry holds this adapter's settings (schedule, prediction, timestep scale).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from onestep.conditioning import Cond, labels_of
from onestep.denoisers.base import SHIFT, Denoiser
from onestep.denoisers.slim import rebuilt_diffusers
from onestep.errors import ConfigError
from onestep.schedules import Schedule, VPDiscrete, make_schedule

PREDICTIONS = ("eps", "v", "x0")
#: continuous t in [0, 1] -> diffusers timestep in [0, 1000], the range the sinusoidal embedding was made for
TIMESTEP_SCALE = 1000.0
ADAPTER_FILE = "onestep.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


class MidBlockFeatures:
    """``features`` and ``spatial_features`` for Denoisers that wrap a diffusers UNet as ``self.unet``."""

    @property
    def spatial_feature_shape(self) -> tuple[int, int, int]:
        """(channels, h, w) of ``spatial_features``: every down block but the last halves the input's size."""
        down = 2 ** (len(self.unet.config.block_out_channels) - 1)
        _, height, width = self.data_shape
        return self.unet.config.block_out_channels[-1], height // down, width // down

    def spatial_features(self, x_t, t, cond=None) -> torch.Tensor:
        """Mid-block activations (batch, feature_dim, h, w), the UNet's bottleneck: what DMD2's conv head reads
        (tianweiy/DMD2 main/sd_guidance.py:161-164). Captured by a forward hook, so the whole UNet runs (the up
        path's output is discarded)."""
        captured = []
        hook = self.unet.mid_block.register_forward_hook(lambda m, args, out: captured.append(out))
        try:
            self(x_t, t, cond)
        finally:
            hook.remove()
        return captured[0].to(x_t.dtype)

    def features(self, x_t, t, cond=None) -> torch.Tensor:
        """Mid-block activations averaged over space (batch, feature_dim): what the MLP heads read."""
        return self.spatial_features(x_t, t, cond).mean((2, 3))


class UNet2DDenoiser(MidBlockFeatures, Denoiser):
    def __init__(self, unet, schedule: Schedule, prediction: str = "eps", timestep_scale: float = TIMESTEP_SCALE):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ConfigError(f"UNet prediction '{prediction}' is unknown; use one of {PREDICTIONS}")
        self.unet, self.schedule, self.prediction, self.timestep_scale = unet, schedule, prediction, timestep_scale
        c = unet.config
        size = c.sample_size if isinstance(c.sample_size, (tuple, list)) else (c.sample_size, c.sample_size)
        self.data_shape = (c.in_channels, *size)
        self.num_classes = (c.num_class_embeds - 1) if c.num_class_embeds else 0
        #: width of ``features``: the mid-block's channels
        self.feature_dim = c.block_out_channels[-1]
        self.shift_embed: torch.nn.Parameter | None = None

    def add_shift_input(self) -> None:
        """A shifted-condition branch (APEX, objectives/apex.py): rows whose conditioning carries ``SHIFT`` = 1 get a
        learned vector, zero at the start, added to the UNet's time embedding (where the class embedding is added too).
        It lives beside ``unet``, so a saved or exported UNet is the unshifted network."""
        self.shift_embed = torch.nn.Parameter(torch.zeros(self.unet.time_embedding.linear_2.out_features))

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(self.schedule, VPDiscrete):
            return self.schedule.index(t)
        return t * self.timestep_scale

    def forward(self, x_t, t, cond=None):
        self.check_input(x_t, "x_t")
        t = self._time(t, x_t)
        labels = None
        if self.num_classes:
            labels = torch.full_like(t, self.num_classes, dtype=torch.long) if cond is None else labels_of(cond).long()
        shift = self.shift_embed
        if shift is None or not (isinstance(cond, Cond) and SHIFT in cond):
            return self.unet(x_t, self.timestep(t), class_labels=labels).sample
        flags = cond[SHIFT]
        if flags.shape != t.shape:
            raise ConfigError(f"the shift input has shape {tuple(flags.shape)}, the batch {tuple(t.shape)}: one "
                              "flag per row (denoisers/base.py with_shift)")
        hook = self.unet.time_embedding.register_forward_hook(
            lambda module, args, emb: emb + flags.to(emb)[:, None] * shift.to(emb))
        try:
            return self.unet(x_t, self.timestep(t), class_labels=labels).sample
        finally:
            hook.remove()

    def with_arch(self, changes: dict, replace: bool = False) -> "UNet2DDenoiser":
        """The same adapter on a fresh UNet of another configuration (generator.arch, denoisers/slim.py)."""
        return UNet2DDenoiser(rebuilt_diffusers(self.unet, changes, replace), self.schedule, self.prediction,
                              self.timestep_scale)

    def adapter_config(self) -> dict:
        s = self.schedule
        return {"schedule": s.name, "schedule_args": schedule_args(s), "prediction": self.prediction,
                "timestep_scale": self.timestep_scale}


def schedule_args(s: Schedule) -> dict:
    """The constructor arguments that rebuild ``s`` with make_schedule (for the schedules UNets use)."""
    if isinstance(s, VPDiscrete):
        return {"beta_schedule": s.beta_schedule, "num_steps": s.num_steps,
                "beta_start": s.beta_start, "beta_end": s.beta_end}
    if s.name == "vp_cosine":
        return {"s": s.s, "t_min": s.t_min, "t_max": s.t_max}
    if s.name == "vp_linear":
        return {"beta_min": s.b0, "beta_max": s.b1, "t_min": s.t_min}
    raise ConfigError(f"schedule '{s.name}' cannot be saved with a UNet2DModel folder; use vp_discrete, "
                      "vp_cosine or vp_linear")


def save_unet_denoiser(denoiser: UNet2DDenoiser, folder: str | Path, extra: dict | None = None) -> None:
    """diffusers' save_pretrained (safetensors) plus onestep.json {"denoiser": adapter settings, **extra}."""
    folder = Path(folder)
    denoiser.unet.save_pretrained(str(folder), safe_serialization=True)
    tmp = folder / (ADAPTER_FILE + ".tmp")
    tmp.write_text(json.dumps({"denoiser": denoiser.adapter_config(), **(extra or {})}, indent=2) + "\n")
    tmp.replace(folder / ADAPTER_FILE)


def load_unet_denoiser(folder: str | Path, what: str = "UNet folder",
                       fix: str = "rebuild it with the tool that wrote it") -> UNet2DDenoiser:
    """Load a folder written by save_unet_denoiser; a missing or corrupt file is a one-line ConfigError."""
    from diffusers import UNet2DModel

    folder = Path(folder)
    for name in ("config.json", WEIGHTS_FILE, ADAPTER_FILE):
        if not (folder / name).is_file():
            raise ConfigError(f"{what} '{folder}' has no {name}; {fix}")
    try:
        spec = json.loads((folder / ADAPTER_FILE).read_text())["denoiser"]
        schedule = make_schedule(spec["schedule"], **spec.get("schedule_args", {}))
        unet = UNet2DModel.from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - json, safetensors and diffusers each raise their own types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{what} '{folder}' is corrupt ({type(e).__name__}: {first[:200]}); {fix}") from None
    return UNet2DDenoiser(unet, schedule, spec.get("prediction", "eps"),
                          spec.get("timestep_scale", TIMESTEP_SCALE)).eval().requires_grad_(False)
