"""Adapter from CogVideoX pipeline folders (``teacher=cogvideox``) to onestep.

A teacher is a local diffusers pipeline folder (what ``CogVideoXPipeline.save_pretrained`` writes); as in denoisers/sd.py,
everything is read from the folder:
    transformer/   CogVideoXTransformer3DModel: a DiT over the text tokens and the video's 3-D patches
    vae/           AutoencoderKLCogVideoX, the causal 3-D VAE: ``VideoCodec``
    text_encoder/  T5EncoderModel, with tokenizer/
    scheduler/     CogVideoXDDIMScheduler (or CogVideoXDPMScheduler: the same table)

Time and prediction. The scheduler's table is a DDPM table whose SNR is divided by ``snr_shift_scale`` and, in the
published folders, rescaled to zero terminal SNR; sd.scheduler_schedule reads it into a ``VPDiscrete`` (see there),
so t = k / (N - 1) is the scheduler's integer timestep k, which the transformer receives as the pipeline loop passes
it. The transformer predicts v (prediction_type "v_prediction" in the published folders).

Latents. Videos of ``num_frames`` pixel frames (the transformer's sample_frames: 49 for CogVideoX 1.0) at height x
width (sample_height x sample_width times the VAE's spatial downsampling: 480 x 720) are latents (F, C, h, w), frames
first as ``CogVideoXPipeline.prepare_latents`` draws them, with F = (num_frames - 1) / temporal_compression + 1, plus
the pipeline's padding to a multiple of patch_size_t (CogVideoX 1.5), which decoding drops as the pipeline does.
``VideoCodec`` normalises as the pipeline: z = E(x) * scaling_factor, permuted to frames first.

Positions. With ``use_rotary_positional_embeddings`` (CogVideoX-5b, 1.5) the transformer takes 3-D rotary
embeddings; they come from the pipeline's own ``_prepare_rotary_positional_embeddings``, once per latent shape.

Conditioning. ``CogVideoXTextEncoder`` calls CogVideoXPipeline's own ``encode_prompt``:
    prompt_embeds   (B, L, D)   T5's last hidden states, padded to L = max_sequence_length (the pipeline's 226)
The null row is the encoded negative prompt ("" when none); ``Guided`` forms u + w (c - u) as the pipeline does with
``use_dynamic_cfg=False`` (its default; its dynamic scale depends on the step count and is no part of the teacher).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from onestep.denoisers.base import Denoiser
from onestep.denoisers.pipeline_folder import (PromptEncoder, check_pipeline_folder, frozen, load_component,
                                               read_scheduler_config, require_prompts, sha1_files)
from onestep.denoisers.sd import LatentCodec, SDParts, scheduler_schedule
from onestep.errors import ConfigError
from onestep.schedules import VPDiscrete

KIND = "cogvideox"
#: the schedulers CogVideoXPipeline runs; both hold the same table
SCHEDULERS = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")
#: CogVideoXPipeline.__call__'s T5 length
MAX_SEQUENCE_LENGTH = 226


def check_cogvideox_folder(path):
    # by class: a Wan or Sana folder holds the same sub-folders
    return check_pipeline_folder(path, KIND, by_class=True)


def cogvideox_schedule(folder) -> tuple[VPDiscrete, str]:
    """The folder's DDIM table (snr_shift_scale, zero terminal SNR) and the transformer's native prediction."""
    c, where = read_scheduler_config(folder, "a diffusers cogvideox pipeline folder")
    if c.get("_class_name") not in SCHEDULERS:
        raise ConfigError(f"{where} names {c.get('_class_name')}; teacher=cogvideox reads {' or '.join(SCHEDULERS)}, "
                          "the schedulers CogVideoXPipeline runs")
    return scheduler_schedule(folder, zero_snr=True)


class CogVideoXDenoiser(Denoiser):
    """A ``diffusers.CogVideoXTransformer3DModel`` as a Denoiser on (F, C, h, w) latents (see the module docstring)."""

    conditional = True
    frame_axis = 0  # (F, C, h, w)

    def __init__(self, transformer, schedule: VPDiscrete, prediction: str, data_shape: tuple[int, int, int, int]):
        super().__init__()
        c = transformer.config
        frames, channels, h, w = data_shape
        if channels != c.in_channels:
            raise ConfigError(f"teacher=cogvideox: latents have {channels} channels but the transformer takes "
                              f"{c.in_channels}; expected a diffusers cogvideox pipeline folder")
        if h <= 0 or w <= 0 or h % c.patch_size or w % c.patch_size or (c.patch_size_t and frames % c.patch_size_t):
            raise ConfigError(f"teacher=cogvideox: latents {tuple(data_shape)} do not split into the transformer's "
                              f"patches ({c.patch_size_t or 1} frames x {c.patch_size}x{c.patch_size}); set "
                              "teacher.resolution / teacher.num_frames accordingly")
        self.transformer, self.schedule, self.prediction = transformer, schedule, prediction
        self.data_shape = tuple(int(d) for d in data_shape)
        #: width of ``features``: the transformer's hidden size
        self.feature_dim = c.num_attention_heads * c.attention_head_dim
        self._rotary: dict = {}

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.index(t)

    def rotary(self, frames: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pipeline's 3-D rotary embeddings for (frames, h, w) latents, or None without them. The pipeline method
        reads only the transformer's config and the VAE's spatial factor: it runs on a stand-in with that config and
        factor 1, so it is given the latent side directly."""
        from diffusers import CogVideoXPipeline

        if not self.transformer.config.use_rotary_positional_embeddings:
            return None
        key = (frames, h, w, str(device))
        if key not in self._rotary:
            stand_in = SimpleNamespace(vae_scale_factor_spatial=1,
                                       transformer=SimpleNamespace(config=self.transformer.config))
            self._rotary[key] = CogVideoXPipeline._prepare_rotary_positional_embeddings(stand_in, h, w, frames,
                                                                                        torch.device(device))
        return self._rotary[key]

    def _run(self, x_t, t, cond):
        require_prompts(cond, "CogVideoXTextEncoder", KIND)
        self.check_input(x_t, "x_t")
        t = self._time(t, x_t)
        dtype, dev = self.transformer.dtype, x_t.device
        frames, _, h, w = x_t.shape[1:]
        # the timestep keeps t's precision (float32 at least): the transformer's sinusoidal embedding takes it as float
        return self.transformer(hidden_states=x_t.to(dtype), encoder_hidden_states=cond["prompt_embeds"].to(dev, dtype),
                                timestep=self.timestep(t), image_rotary_emb=self.rotary(frames, h, w, dev),
                                return_dict=False)[0]

    def forward(self, x_t, t, cond=None):
        return self._run(x_t, t, cond).to(x_t.dtype)

    def features(self, x_t, t, cond=None) -> torch.Tensor:
        """Video tokens after the last block, averaged (batch, feature_dim). Captured by a forward hook, so the whole
        transformer runs (its output is discarded)."""
        captured = []
        hook = self.transformer.transformer_blocks[-1].register_forward_hook(
            lambda m, a, out: captured.append(out[0]))
        try:
            self._run(x_t, t, cond)
        finally:
            hook.remove()
        return captured[0].mean(1).to(x_t.dtype)


class VideoCodec(LatentCodec):
    """Videos (B, C, F, H, W) in [-1, 1] <-> latents (B, F', C', h, w) through a frozen AutoencoderKLCogVideoX, as
    CogVideoXPipeline normalises them (z = E(x) * scaling_factor, frames first). ``pad``: leading latent frames the
    pipeline adds to reach a multiple of patch_size_t and drops before decoding."""

    def __init__(self, vae, pad: int = 0):
        super().__init__(vae)
        self.temporal_downsample = int(vae.config.temporal_compression_ratio)
        self.pad = int(pad)

    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        if self.pad:
            raise ConfigError(f"teacher=cogvideox: this frame count needs {self.pad} padding latent frame(s) before the "
                              "video's own (patch_size_t), which no encoded video has; choose teacher.num_frames so "
                              "the latent frames are a multiple of the transformer's patch_size_t")
        return super().encode(videos).transpose(1, 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return super().decode(latents[:, self.pad:].transpose(1, 2))


class CogVideoXTextEncoder(PromptEncoder):
    """CogVideoXPipeline's own ``encode_prompt`` on its frozen T5; float32 batch-first fields on the CPU (the interface
    of sd.TextEncoder: name, encode, null_fields, assemble, cond)."""

    def __init__(self, folder, device="cpu", dtype=torch.float32, max_sequence_length: int | None = None):
        from diffusers import CogVideoXPipeline
        from transformers import AutoTokenizer, T5EncoderModel

        folder = check_cogvideox_folder(folder)
        self.device = torch.device(device)
        length = MAX_SEQUENCE_LENGTH if max_sequence_length is None else int(max_sequence_length)
        if length <= 0:
            raise ConfigError(f"teacher.max_sequence_length={length} must be a positive number of T5 tokens")
        self.max_sequence_length = length
        tokenizer = load_component(folder, "tokenizer", KIND, AutoTokenizer)
        encoder = frozen(load_component(folder, "text_encoder", KIND, T5EncoderModel, dtype=dtype), self.device)
        # the text half of the pipeline: encode_prompt reads nothing else
        self.pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None,
                                      scheduler=None)
        # identity of the encoded fields, for caches: the exact tokenizer and encoder bytes and the length
        digest = sha1_files(folder, ("text_encoder", "tokenizer"), json.dumps({"max_sequence_length": length}))
        self.name = f"{KIND}-{digest[:16]}"
        self._null: dict[str | None, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length, device=self.device)
        return {"prompt_embeds": embeds.float().cpu()}


def latent_shape(transformer, codec: VideoCodec, num_frames: int | None, resolution: int | None):
    """(F, C, h, w) with F padded as the pipeline pads it, and the padding; defaults are the pipeline's call defaults
    (the transformer's sample_frames, sample_height x sample_width latents)."""
    c = transformer.config
    frames = c.sample_frames if num_frames is None else int(num_frames)
    if frames <= 0 or (frames - 1) % codec.temporal_downsample:
        raise ConfigError(f"teacher.num_frames={frames} must be 1 + a multiple of {codec.temporal_downsample} (the "
                          "VAE's temporal compression)")
    if resolution is None:
        h, w = c.sample_height, c.sample_width
    else:
        if resolution <= 0 or resolution % codec.downsample:
            raise ConfigError(f"teacher.resolution={resolution} must be a positive multiple of the VAE's "
                              f"downsampling {codec.downsample}")
        h = w = resolution // codec.downsample
    latent_frames = (frames - 1) // codec.temporal_downsample + 1
    pad = -latent_frames % c.patch_size_t if c.patch_size_t else 0
    return (latent_frames + pad, c.in_channels, h, w), pad


def load_cogvideox(folder, *, dtype=torch.float32, device="cpu", num_frames: int | None = None,
                   resolution: int | None = None, max_sequence_length: int | None = None) -> SDParts:
    """A CogVideoX pipeline folder's frozen transformer (as a Denoiser), T5 text encoder and 3-D VAE. ``num_frames``:
    pixel frames; ``resolution``: a square side in pixels (default: the pipeline's sample_height x sample_width);
    ``max_sequence_length``: T5 tokens per prompt (default 226). ``image_size`` is the frame width in pixels."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    folder = check_cogvideox_folder(folder)
    schedule, prediction = cogvideox_schedule(folder)
    transformer = frozen(load_component(folder, "transformer", KIND, CogVideoXTransformer3DModel, dtype=dtype), device)
    codec = VideoCodec(frozen(load_component(folder, "vae", KIND, AutoencoderKLCogVideoX, dtype=dtype), device))
    shape, codec.pad = latent_shape(transformer, codec, num_frames, resolution)
    denoiser = CogVideoXDenoiser(transformer, schedule, prediction, shape)
    text = CogVideoXTextEncoder(folder, device, dtype, max_sequence_length)
    return SDParts(denoiser, text, codec, image_size=shape[-1] * codec.downsample)
