"""Adapter from Wan 2.1 / 2.2 text-to-video pipeline folders (``teacher=wan``) to onestep.

A teacher is a local diffusers pipeline folder (what ``WanPipeline.save_pretrained`` writes); as in denoisers/sd.py,
everything is read from the folder:
    transformer/     WanTransformer3DModel (Wan 2.2 A14B: the high-noise expert)
    transformer_2/   Wan 2.2 A14B only: the low-noise expert, with model_index.json's ``boundary_ratio``
    vae/             AutoencoderKLWan: the causal 3-D VAE, per-channel latents_mean / latents_std
    text_encoder/    UMT5EncoderModel, with tokenizer/ (T5's)
    scheduler/       UniPCMultistepScheduler on flow sigmas (the hub's Wan folders) or FlowMatchEulerDiscreteScheduler

Time and prediction. The transformer outputs the rectified-flow velocity u = eps - x0 for x_t = (1 - t) x0 + t eps
(both schedulers step on it as a flow prediction), i.e. onestep's ``RectifiedFlow`` and prediction "flow" with
t = the scheduler's sigma, and is fed
    timestep = t N                    (the scheduler's timesteps, sigma N; N = num_train_timesteps = 1000)
FlowMatchEulerDiscreteScheduler passes sigma N as it is; UniPCMultistepScheduler truncates it to an integer (its
sigma stays exact), so a Wan pipeline on that scheduler feeds floor(sigma N) where onestep feeds sigma N.

Shift. The scheduler's ``flow_shift`` (UniPC with use_flow_sigmas; Wan 2.1 480p: 3.0, 720p: 5.0) or ``shift`` (Euler)
maps a uniform grid u to t = s u / (1 + (s - 1) u); it becomes ``RectifiedFlow(shift=s)``, which moves default_ts /
t_from_unit only.

Two experts (Wan 2.2 A14B). WanPipeline runs ``transformer`` at the steps whose timestep is >= boundary_ratio N and
``transformer_2`` below; ``WanDenoiser`` routes each row the same way, comparing the timestep it feeds (t N) with
boundary_ratio N, so every row meets the expert the pipeline's loop would give it. Both experts take the one CFG scale
of ``Guided`` (the pipeline's guidance_scale_2 defaults to guidance_scale). Folders with ``expand_timesteps`` (Wan 2.2
TI2V-5B: a timestep per token, the first frame kept clean for image conditioning) are refused.

Latents. Videos of ``num_frames`` pixel frames (WanPipeline's default 81) at height = width = ``resolution`` (square:
one side, as every other onestep teacher; the pipeline's default 480 x 832 is not square, so the side defaults to
its height 480) are latents (C, F, h, w) with F = (num_frames - 1) / scale_factor_temporal + 1 and
h = w = resolution / scale_factor_spatial: the shape WanPipeline.prepare_latents draws, so noise drawn as
``torch.randn((n, *data_shape))`` equals the pipeline's for the same generator. ``WanCodec`` normalises them as the
pipeline does: decode(z) = VAE.decode(z / (1 / latents_std) + latents_mean), encode the inverse on the posterior mean.

Conditioning. ``WanTextEncoder`` calls the pipeline's own ``encode_prompt`` (WanPipeline built with only its text
encoder and tokenizer), so the field equals the library's by construction:
    prompt_embeds   (B, L, D)   UMT5's last hidden states of the cleaned prompt, zeroed after its tokens
                                (L = max_sequence_length, WanPipeline's call default 512)
The null row (CFG's unconditional branch) is the encoded negative prompt, "" when none, as the pipeline encodes it.

Features. ``features`` averages the video tokens after the last transformer block into (B, feature_dim =
heads x head_dim), as flow.py does for SD3 / Flux: what discriminator heads read.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import cached_property
from pathlib import Path

import torch

from onestep.denoisers.base import Denoiser
from onestep.denoisers.pipeline_folder import (PromptEncoder, check_pipeline_folder, frozen, load_component,
                                               read_scheduler_config, require_prompts, sha1_files)
from onestep.denoisers.sd import SDParts
from onestep.errors import ConfigError
from onestep.schedules import RectifiedFlow

KIND = "wan"
#: WanPipeline.__call__ defaults: UMT5 tokens per prompt, pixel frames, height (its width, 832, is not square)
MAX_SEQUENCE_LENGTH = 512
NUM_FRAMES = 81
RESOLUTION = 480
#: WanPipeline.check_inputs: height and width must be multiples of 16
PIXEL_MULTIPLE = 16
#: the schedulers Wan folders ship, and the config key of each one's shift
SHIFT_KEYS = {"UniPCMultistepScheduler": "flow_shift", "FlowMatchEulerDiscreteScheduler": "shift"}


def check_wan_folder(path) -> Path:
    # by class: a CogVideoX folder has the same sub-folders
    return check_pipeline_folder(path, KIND, by_class=True)


def wan_schedule(folder) -> tuple[RectifiedFlow, int]:
    """The sampling shift and num_train_timesteps, from scheduler/scheduler_config.json."""
    c, where = read_scheduler_config(folder, "a diffusers wan pipeline folder")
    name = c.get("_class_name")
    if name not in SHIFT_KEYS:
        raise ConfigError(f"{where} names {name}; teacher=wan reads UniPCMultistepScheduler (use_flow_sigmas) or "
                          "FlowMatchEulerDiscreteScheduler, the schedulers WanPipeline runs")
    # absent keys take the schedulers' defaults, as from_config would
    if name == "UniPCMultistepScheduler" and not (c.get("use_flow_sigmas", False)
                                                  and c.get("prediction_type") == "flow_prediction"):
        raise ConfigError(f"{where} is a UniPCMultistepScheduler without use_flow_sigmas and prediction_type "
                          "'flow_prediction'; a Wan transformer predicts the flow on flow sigmas")
    if name == "FlowMatchEulerDiscreteScheduler" and (c.get("use_dynamic_shifting", False)
                                                      or c.get("invert_sigmas", False)):
        raise ConfigError(f"{where} sets use_dynamic_shifting or invert_sigmas, which WanPipeline cannot run (it "
                          "passes no mu); set a fixed shift")
    shift = float(c.get(SHIFT_KEYS[name], 1.0))
    if shift <= 0:
        raise ConfigError(f"{where} has {SHIFT_KEYS[name]}={shift:.4g}; it must be > 0")
    return RectifiedFlow(shift=shift), int(c.get("num_train_timesteps", 1000))


def read_model_index(folder: Path) -> dict:
    try:
        return json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher.path '{folder}': model_index.json cannot be read ({type(e).__name__}); expected "
                          "a diffusers wan pipeline folder") from None


class WanDenoiser(Denoiser):
    """One ``WanTransformer3DModel`` (Wan 2.1), or two experts switched at ``boundary_ratio`` (Wan 2.2 A14B), as a
    Denoiser on (C, F, h, w) latents (see the module docstring)."""

    conditional = True
    prediction = "flow"
    frame_axis = 1  # (C, F, h, w)

    def __init__(self, transformer, schedule: RectifiedFlow, data_shape: tuple[int, int, int, int], *,
                 transformer_2=None, boundary_ratio: float | None = None, num_train_timesteps: int = 1000):
        super().__init__()
        if (transformer_2 is None) != (boundary_ratio is None):
            raise ConfigError("a two-expert Wan denoiser needs both transformer_2 and boundary_ratio")
        c = transformer.config
        _, frames, h, w = data_shape
        p_t, p_h, p_w = c.patch_size
        if frames % p_t or h % p_h or w % p_w:
            raise ConfigError(f"teacher=wan: latents {tuple(data_shape)} are not whole {tuple(c.patch_size)} "
                              "patches of the transformer; set teacher.resolution / teacher.num_frames accordingly")
        self.transformer, self.transformer_2, self.schedule = transformer, transformer_2, schedule
        self.num_train_timesteps = int(num_train_timesteps)
        #: WanPipeline's boundary_timestep: timesteps >= it go to ``transformer``
        self.boundary = None if boundary_ratio is None else boundary_ratio * self.num_train_timesteps
        self.data_shape = tuple(int(d) for d in data_shape)
        #: width of ``features``: the transformer's hidden size
        self.feature_dim = c.num_attention_heads * c.attention_head_dim

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.num_train_timesteps

    def _routed(self, run, x_t, t, cond) -> torch.Tensor:
        """``run(transformer, x_t, timestep, text)`` on each row's expert, put back in row order."""
        require_prompts(cond, "WanTextEncoder", KIND)
        self.check_input(x_t, "x_t")
        t = self._time(t, x_t)
        text = cond["prompt_embeds"].to(x_t.device, self.transformer.dtype)
        # the timestep keeps t's precision (float32 at least) under a half-precision transformer, as in the pipeline
        timestep = self.timestep(t)
        if self.transformer_2 is None:
            return run(self.transformer, x_t, timestep, text)
        high = timestep >= self.boundary
        out = None
        for net, rows in ((self.transformer, high), (self.transformer_2, ~high)):
            rows = rows.nonzero().flatten()
            if rows.numel() == 0:
                continue
            y = run(net, x_t[rows], timestep[rows], text[rows])
            out = y.new_zeros((x_t.shape[0], *y.shape[1:])) if out is None else out
            out = out.index_copy(0, rows, y)
        return out

    @staticmethod
    def _predict(net, x_t, timestep, text) -> torch.Tensor:
        out = net(hidden_states=x_t.to(net.dtype), timestep=timestep, encoder_hidden_states=text.to(net.dtype),
                  return_dict=False)[0]
        return out.to(x_t.dtype)

    def forward(self, x_t, t, cond=None):
        return self._routed(self._predict, x_t, t, cond)

    def features(self, x_t, t, cond=None) -> torch.Tensor:
        """Video tokens after the last block, averaged (batch, feature_dim). Captured by a forward hook, so the
        whole transformer runs (the output projection is discarded)."""
        def run(net, x, timestep, text):
            captured = []
            hook = net.blocks[-1].register_forward_hook(lambda m, args, out: captured.append(out))
            try:
                self._predict(net, x, timestep, text)
            finally:
                hook.remove()
            return captured[0].mean(1).to(x.dtype)

        return self._routed(run, x_t, t, cond)


class WanCodec:
    """Videos (B, 3, F, H, W) in [-1, 1] <-> latents (B, C, F', h, w) normalised as WanPipeline does, via a frozen
    ``diffusers.AutoencoderKLWan`` (encode: its posterior mean)."""

    def __init__(self, vae):
        c = vae.config
        self.vae = vae
        self.latent_channels = c.z_dim
        self.downsample, self.temporal_downsample = int(c.scale_factor_spatial), int(c.scale_factor_temporal)
        shape = (1, c.z_dim, 1, 1, 1)
        self.mean = torch.tensor(c.latents_mean, dtype=torch.float32).view(shape)
        #: WanPipeline's ``latents_std``: the reciprocal of the config's
        self.inv_std = 1.0 / torch.tensor(c.latents_std, dtype=torch.float32).view(shape)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @cached_property
    def name(self) -> str:
        """Identity for latent caches: sha1 of the normalisation and every weight's bytes."""
        h = hashlib.sha1(f"mean={self.mean.flatten().tolist()} inv_std={self.inv_std.flatten().tolist()}".encode())
        for key, w in self.vae.state_dict().items():
            h.update(key.encode() + b"\0")
            h.update(w.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return f"wanvae-{h.hexdigest()[:16]}"

    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        # the posterior mean, not a sample (as LatentCodec): cached latents stay reproducible
        mean = self.vae.encode(videos.to(self.vae.dtype)).latent_dist.mean
        return ((mean - self.mean.to(mean)) * self.inv_std.to(mean)).to(videos.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype)
        # WanPipeline, operation for operation: latents / latents_std + latents_mean with latents_std = 1 / std
        z = z / self.inv_std.to(z) + self.mean.to(z)
        return self.vae.decode(z, return_dict=False)[0].clamp(-1, 1).to(latents.dtype)


class WanTextEncoder(PromptEncoder):
    """WanPipeline's own ``encode_prompt`` on its frozen UMT5; batch-first float32 fields on the CPU (the interface of
    sd.TextEncoder: name, encode, null_fields, assemble, cond)."""

    def __init__(self, folder, device="cpu", dtype=torch.float32, max_sequence_length: int | None = None):
        from diffusers import WanPipeline
        from transformers import AutoTokenizer, UMT5EncoderModel

        folder = check_wan_folder(folder)
        n = MAX_SEQUENCE_LENGTH if max_sequence_length is None else int(max_sequence_length)
        if n <= 0:
            raise ConfigError(f"teacher.max_sequence_length={n} must be >= 1 UMT5 tokens")
        self.device, self.max_sequence_length = torch.device(device), n
        tokenizer = load_component(folder, "tokenizer", KIND, AutoTokenizer)
        encoder = frozen(load_component(folder, "text_encoder", KIND, UMT5EncoderModel, dtype=dtype), self.device)
        # the text half of the pipeline: encode_prompt reads nothing else
        self.pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, scheduler=None)
        # identity of the encoded fields, for caches: the exact tokenizer and encoder bytes and the token count
        self.name = f"{KIND}-{sha1_files(folder, ('text_encoder', 'tokenizer'), f'max_sequence_length={n}')[:16]}"
        self._null: dict[str | None, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False, device=self.device,
                                            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds.float().cpu()}


def _latent_shape(transformer, codec: WanCodec, resolution: int | None, num_frames: int | None) -> tuple:
    step = math.lcm(PIXEL_MULTIPLE, codec.downsample * transformer.config.patch_size[1])
    side = RESOLUTION if resolution is None else int(resolution)
    if side <= 0 or side % step:
        raise ConfigError(f"teacher.resolution={side} must be a positive multiple of {step} (WanPipeline's 16 and the "
                          f"VAE's downsampling {codec.downsample} x the transformer's patches)")
    frames = NUM_FRAMES if num_frames is None else int(num_frames)
    if frames <= 0 or (frames - 1) % codec.temporal_downsample:
        raise ConfigError(f"teacher.num_frames={frames} must be 1 + a multiple of {codec.temporal_downsample} (the "
                          f"VAE's temporal downsampling), e.g. {4 * codec.temporal_downsample + 1}")
    latent_frames = (frames - 1) // codec.temporal_downsample + 1
    return codec.latent_channels, latent_frames, side // codec.downsample, side // codec.downsample


def load_wan(folder, *, dtype=torch.float32, device="cpu", resolution: int | None = None,
             num_frames: int | None = None, max_sequence_length: int | None = None) -> SDParts:
    """A Wan pipeline folder's frozen transformer(s) (as one Denoiser), UMT5 text encoder and video VAE.
    ``resolution``: the square side in pixels (default 480); ``num_frames``: pixel frames (default 81);
    ``max_sequence_length``: UMT5 tokens per prompt (default 512)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    folder = check_wan_folder(folder)
    index = read_model_index(folder)
    if index.get("expand_timesteps"):
        raise ConfigError(f"teacher.path '{folder}' sets expand_timesteps (Wan 2.2 TI2V-5B: one timestep per token), "
                          "which teacher=wan does not support; use a Wan 2.1 or Wan 2.2 A14B text-to-video folder")
    ratio = index.get("boundary_ratio")
    if ratio is not None and not (folder / "transformer_2").is_dir():
        raise ConfigError(f"teacher.path '{folder}': model_index.json sets boundary_ratio={ratio} but there is no "
                          "transformer_2/ (the low-noise expert); expected a Wan 2.2 A14B pipeline folder")
    schedule, steps = wan_schedule(folder)
    transformer = frozen(load_component(folder, "transformer", KIND, WanTransformer3DModel, dtype=dtype), device)
    # without boundary_ratio WanPipeline runs transformer alone, whatever else the folder holds
    transformer_2 = None if ratio is None else frozen(
        load_component(folder, "transformer_2", KIND, WanTransformer3DModel, dtype=dtype), device)
    codec = WanCodec(frozen(load_component(folder, "vae", KIND, AutoencoderKLWan, dtype=dtype), device))
    c = transformer.config
    if c.in_channels != codec.latent_channels:
        raise ConfigError(f"teacher.path '{folder}': the transformer takes {c.in_channels} input channels but the vae "
                          f"makes {codec.latent_channels}-channel latents; expected a diffusers wan pipeline folder")
    shape = _latent_shape(transformer, codec, resolution, num_frames)
    denoiser = WanDenoiser(transformer, schedule, shape, transformer_2=transformer_2,
                           boundary_ratio=None if ratio is None else float(ratio), num_train_timesteps=steps)
    text = WanTextEncoder(folder, device, dtype, max_sequence_length)
    return SDParts(denoiser, text, codec, image_size=shape[-1] * codec.downsample)
