"""Adapter from Sana pipeline folders (``teacher=sana``) to onestep.

A teacher is a local diffusers pipeline folder (what ``SanaPipeline.save_pretrained`` writes); as in denoisers/sd.py,
everything is read from the folder:
    transformer/   SanaTransformer2DModel: linear self-attention (ReLU kernels), softmax cross-attention on the
                   Gemma tokens, Mix-FFN (GLUMBConv: 1x1 conv, depthwise 3x3 conv, SiLU gate)
    vae/           AutoencoderDC (deep-compression autoencoder): ``LatentCodec`` (sd.py), z = E(x) * scaling_factor
    text_encoder/  Gemma2Model, with tokenizer/ (Gemma's)
    scheduler/     DPMSolverMultistepScheduler on flow sigmas (what the hub's Sana folders ship) or
                   FlowMatchEulerDiscreteScheduler

Time and prediction. Both schedulers treat the transformer's output as the rectified-flow velocity
u = dx_t/dt = eps - x0 for x_t = (1 - sigma) x0 + sigma eps (DPM-Solver: x0 = x_t - sigma u; Euler:
x += (sigma_next - sigma) u), i.e. onestep's ``RectifiedFlow`` and prediction "flow" with t = sigma. The transformer
is fed
    timestep = t N timestep_scale       (the schedulers' timesteps sigma N, N = num_train_timesteps = 1000, times the
                                         transformer's ``timestep_scale``, as SanaPipeline.__call__ does)
FlowMatchEulerDiscreteScheduler passes sigma N as it is; DPMSolverMultistepScheduler truncates it to an integer (its
sigma stays exact), so a Sana pipeline on that scheduler feeds floor(sigma N) where onestep feeds sigma N.
A transformer with out_channels = 2 x in_channels (learned variance) is cut to its first half, as the pipeline does.

Shift. The scheduler's ``flow_shift`` (DPM-Solver) or ``shift`` (Euler) maps a uniform grid u to
t = s u / (1 + (s - 1) u); it becomes ``RectifiedFlow(shift=s)``, which moves default_ts / t_from_unit only.

Conditioning. ``SanaTextEncoder`` calls the pipeline's own ``encode_prompt`` (SanaPipeline built with only its text
encoder and tokenizer) with ``SanaPipeline.__call__``'s defaults, so the fields equal the library's by construction:
    prompt_embeds          (B, L, D)  Gemma's last hidden states of complex_human_instruction + the lower-cased
                                      prompt, right-padded, cut to <bos> + the last L - 1 tokens (L = 300)
    prompt_attention_mask  (B, L)     1 on tokens, 0 on padding (int64): the cross-attention's key mask
The null row is the pipeline's unconditional branch: the negative prompt ("" by default) encoded without the
instruction. ``Guided`` forms u + w (c - u) as the pipeline does (before its learned-variance cut, which commutes).

Features. ``features`` averages the image tokens after the transformer's last block into (B, feature_dim =
heads x head_dim), as flow.py does for SD3 / Flux: what discriminator heads read.

Forward-mode AD. ``torch.func.jvp`` runs through the whole transformer (linear attention, depthwise convs, GLU,
LayerNorm / RMSNorm, sinusoidal time embedding) with stock diffusers code; only the cross-attention's SDPA needs
its MATH backend (``attention.jvp_attention``), as for every diffusers model on the CPU.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from onestep.denoisers.base import Denoiser
from onestep.denoisers.pipeline_folder import (PromptEncoder, check_pipeline_folder, frozen, load_component,
                                               read_scheduler_config, require_prompts, sha1_files)
from onestep.denoisers.sd import LatentCodec, SDParts
from onestep.errors import ConfigError
from onestep.schedules import RectifiedFlow

KIND = "sana"
#: the schedulers SanaPipeline runs, and the config key of each one's shift
SHIFT_KEYS = {"DPMSolverMultistepScheduler": "flow_shift", "FlowMatchEulerDiscreteScheduler": "shift"}


def check_sana_folder(path) -> Path:
    # by class: an SD3 folder holds every sub-folder Sana needs
    return check_pipeline_folder(path, KIND, by_class=True)


def sana_schedule(folder) -> tuple[RectifiedFlow, int]:
    """The sampling shift and num_train_timesteps, from scheduler/scheduler_config.json."""
    c, where = read_scheduler_config(folder, "a diffusers sana pipeline folder")
    name = c.get("_class_name")
    if name not in SHIFT_KEYS:
        raise ConfigError(f"{where} names {name}; teacher=sana reads DPMSolverMultistepScheduler (use_flow_sigmas) "
                          "or FlowMatchEulerDiscreteScheduler, the schedulers SanaPipeline runs")
    # absent keys take the schedulers' defaults, as from_config would
    if name == "DPMSolverMultistepScheduler" and not (c.get("use_flow_sigmas", False)
                                                      and c.get("prediction_type") == "flow_prediction"):
        raise ConfigError(f"{where} is a DPMSolverMultistepScheduler without use_flow_sigmas and prediction_type "
                          "'flow_prediction'; a Sana transformer predicts the flow on flow sigmas")
    if name == "FlowMatchEulerDiscreteScheduler":
        if c.get("use_dynamic_shifting", False):
            raise ConfigError(f"{where} sets use_dynamic_shifting, which SanaPipeline cannot run (it passes no mu); "
                              "set a fixed shift")
        if c.get("invert_sigmas", False):
            raise ConfigError(f"{where} sets invert_sigmas (sigma = 1 - t, Mochi's convention), which onestep does "
                              "not support")
    shift = float(c.get(SHIFT_KEYS[name], 1.0))
    if shift <= 0:
        raise ConfigError(f"{where} has {SHIFT_KEYS[name]}={shift:.4g}; it must be > 0")
    return RectifiedFlow(shift=shift), int(c.get("num_train_timesteps", 1000))


class SanaDenoiser(Denoiser):
    """A ``diffusers.SanaTransformer2DModel`` as a Denoiser on (C, H, W) latents (see the module docstring)."""

    conditional = True
    prediction = "flow"

    def __init__(self, transformer, schedule: RectifiedFlow, latent_size: int, *, num_train_timesteps: int = 1000):
        super().__init__()
        c = transformer.config
        if c.guidance_embeds:
            raise ConfigError("teacher=sana but the folder's transformer embeds a guidance scale (SANA-Sprint), which "
                              "SanaPipeline cannot run; pass teacher.path=<a SanaPipeline folder>")
        if latent_size <= 0 or latent_size % c.patch_size:
            raise ConfigError(f"teacher=sana: latent side {latent_size} must be a positive multiple of the "
                              f"transformer's {c.patch_size}x{c.patch_size} patches; set teacher.resolution "
                              "accordingly")
        self.transformer, self.schedule = transformer, schedule
        self.num_train_timesteps = int(num_train_timesteps)
        self.data_shape = (c.in_channels, latent_size, latent_size)
        #: SanaPipeline's "learned sigma" rule: keep the first half of a 2 x in_channels output
        self.learned_variance = (c.out_channels or c.in_channels) // 2 == c.in_channels
        #: width of ``features``: the transformer's hidden size
        self.feature_dim = c.num_attention_heads * c.attention_head_dim

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        # in the pipeline's order: the scheduler's timestep sigma N, then the transformer's timestep_scale
        return t * self.num_train_timesteps * self.transformer.config.timestep_scale

    def forward(self, x_t, t, cond=None):
        require_prompts(cond, "SanaTextEncoder", "sana", ("prompt_embeds", "prompt_attention_mask"))
        self.check_input(x_t, "x_t")
        t = self._time(t, x_t)
        dtype, dev = self.transformer.dtype, x_t.device
        # the timestep keeps t's precision (float32 at least) under a half-precision transformer, as in the pipeline
        out = self.transformer(x_t.to(dtype), encoder_hidden_states=cond["prompt_embeds"].to(dev, dtype),
                               encoder_attention_mask=cond["prompt_attention_mask"].to(dev),
                               timestep=self.timestep(t), return_dict=False)[0]
        if self.learned_variance:
            out = out.chunk(2, dim=1)[0]
        return out.to(x_t.dtype)

    def features(self, x_t, t, cond=None) -> torch.Tensor:
        """Image tokens after the last block, averaged (batch, feature_dim). Captured by a forward hook, so the
        whole transformer runs (the output projection is discarded)."""
        captured = []
        hook = self.transformer.transformer_blocks[-1].register_forward_hook(lambda m, a, out: captured.append(out))
        try:
            self(x_t, t, cond)
        finally:
            hook.remove()
        return captured[0].mean(1).to(x_t.dtype)


class SanaTextEncoder(PromptEncoder):
    """SanaPipeline's own ``encode_prompt`` on its frozen Gemma; batch-first fields on the CPU: float32 embeddings
    and the int64 token mask (the interface of sd.TextEncoder: name, encode, null_fields, assemble, cond)."""

    def __init__(self, folder, device="cpu", dtype=torch.float32):
        from diffusers import SanaPipeline
        from transformers import AutoTokenizer, Gemma2Model

        folder = check_sana_folder(folder)
        self.device = torch.device(device)
        tokenizer = load_component(folder, "tokenizer", KIND, AutoTokenizer)
        encoder = frozen(load_component(folder, "text_encoder", KIND, Gemma2Model, dtype=dtype), self.device)
        # the text half of the pipeline: encode_prompt reads nothing else
        self.pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)
        # what SanaPipeline.__call__ encodes with when called with a prompt alone
        defaults = inspect.signature(SanaPipeline.__call__).parameters
        self.options = {k: defaults[k].default for k in ("max_sequence_length", "clean_caption",
                                                         "complex_human_instruction")}
        # identity of the encoded fields, for caches: the exact tokenizer and encoder bytes and the call defaults
        digest = sha1_files(folder, ("text_encoder", "tokenizer"), json.dumps(self.options, sort_keys=True))
        self.name = f"{KIND}-{digest[:16]}"
        self._null: dict[str | None, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode(self, prompts: list[str], negative_prompt: str | None = None) -> dict[str, torch.Tensor]:
        embeds, mask, neg, neg_mask = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=negative_prompt is not None, negative_prompt=negative_prompt,
            device=self.device, **self.options)
        if negative_prompt is not None:
            embeds, mask = neg[:1], neg_mask[:1]
        return {"prompt_embeds": embeds.float().cpu(), "prompt_attention_mask": mask.cpu()}

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self._encode(list(prompts))

    def null_row(self, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        """The pipeline's unconditional branch, one row: ``negative_prompt`` ("" when none, the pipeline's default)
        encoded the way encode_prompt encodes negative prompts (without the complex human instruction)."""
        # encode_prompt's own negative branch (its positive output, one empty prompt, is discarded)
        return self._encode([""], negative_prompt or "")


def load_sana(folder, *, dtype=torch.float32, device="cpu", resolution: int | None = None) -> SDParts:
    """A Sana pipeline folder's frozen transformer (as a Denoiser), Gemma text encoder and DC-AE. ``resolution``
    (pixels; ``teacher.resolution``) overrides the transformer's native sample_size."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel

    folder = check_sana_folder(folder)
    schedule, steps = sana_schedule(folder)
    transformer = frozen(load_component(folder, "transformer", KIND, SanaTransformer2DModel, dtype=dtype), device)
    codec = LatentCodec(frozen(load_component(folder, "vae", KIND, AutoencoderDC, dtype=dtype), device))
    c = transformer.config
    if c.in_channels != codec.latent_channels:
        raise ConfigError(f"teacher.path '{folder}': the transformer takes {c.in_channels} input channels but the vae "
                          f"makes {codec.latent_channels}-channel latents; expected a diffusers sana pipeline folder")
    size = c.sample_size
    if resolution is not None:
        step = codec.downsample * c.patch_size
        if resolution <= 0 or resolution % step:
            raise ConfigError(f"teacher.resolution={resolution} must be a positive multiple of {step} (the VAE's "
                              f"downsampling {codec.downsample} x the transformer's {c.patch_size}x{c.patch_size} "
                              "patches)")
        size = resolution // codec.downsample
    denoiser = SanaDenoiser(transformer, schedule, int(size), num_train_timesteps=steps)
    return SDParts(denoiser, SanaTextEncoder(folder, device, dtype), codec, image_size=int(size) * codec.downsample)
