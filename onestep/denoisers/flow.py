"""Adapters from flow-matching transformer pipeline folders (SD3: ``sd3``; Flux: ``flux``) to onestep.

A teacher is a local diffusers pipeline folder (what ``StableDiffusion3Pipeline`` / ``FluxPipeline.save_pretrained``
writes); as in denoisers/sd.py, everything is read from the folder.

Time and prediction. Both transformers output the rectified-flow velocity u = dx_t/dt = eps - x0 for
x_t = (1 - t) x0 + t eps (FlowMatchEulerDiscreteScheduler steps x += (sigma_next - sigma) u), i.e. onestep's
``RectifiedFlow`` schedule and prediction "flow", with t = the scheduler's sigma. The network is fed
    sd3   timestep = t N                  (the scheduler's timesteps, sigma N; N = num_train_timesteps = 1000)
    flux  timestep = t N / 1000           (FluxPipeline divides the scheduler's timesteps by 1000; the transformer
                                           multiplies by 1000 again inside)

Shift. ``scheduler/scheduler_config.json`` gives the sampling shift sigma = s u / (1 + (s - 1) u) of a uniform
grid u: ``shift`` (SD3: 3.0), or with ``use_dynamic_shifting`` (Flux) s = exp(mu), mu linear in the image's
token count n from (base_image_seq_len, base_shift) to (max_image_seq_len, max_shift) (the pipelines'
``calculate_shift``; s = mu for time_shift_type "linear"). n is fixed by the resolution, so it is computed once at
load time; it becomes ``RectifiedFlow(shift=s)``, which moves default_ts / t_from_unit only (the denoiser is a
function of t and does not depend on s). Options that only change the pipeline's inference grid (shift_terminal,
use_karras/exponential/beta_sigmas) or its step (stochastic_sampling) are not read: onestep samples on its own grid.

Conditioning. ``FlowTextEncoder`` calls the pipeline's own ``encode_prompt`` (the pipeline class built with only its
text encoders and tokenizers), so the fields equal the library's by construction:
    sd3   prompt_embeds         cat(CLIP-L, CLIP-G penultimate states, zero-padded to T5's width; T5 states)
                                                                           (B, 77 + max_sequence_length, 4096)
          pooled_prompt_embeds  cat(both CLIPs' projected final token)     (B, 2048)
    flux  prompt_embeds         T5 states                                  (B, max_sequence_length, 4096)
          pooled_prompt_embeds  CLIP's pooled output                       (B, 768)
max_sequence_length is the pipelines' call default (SD3 256, Flux 512) unless given. The null row (the CFG branch)
is the encoded negative prompt, "" when none: what StableDiffusion3Pipeline feeds with guidance_scale > 1, and
what FluxPipeline's true CFG (true_cfg_scale > 1, negative_prompt="") feeds; guidance-distilled Flux never uses it.

Guidance. SD3 and Flux without a guidance embedding (schnell, de-distilled checkpoints) get classifier-free guidance
from ``Guided`` (two branches, u + w (c - u)), as their pipelines do. Guidance-distilled Flux
(``transformer.config.guidance_embeds``) was trained to output the guided velocity for the scale it is given, so its
denoiser sets ``embedded_guidance = True`` and ``Guided`` runs the transformer once with guidance = w (the scale
travels as the Cond field ``base.GUIDANCE``, so it passes through any wrapper), as FluxPipeline does with
guidance_scale = w. Without that field (the bare teacher, generators and critics copied from it, and
``guided(denoiser, 1)``, which is the denoiser itself for every kind) the transformer gets ``denoiser.guidance``:
FluxPipeline's default 3.5, or what ``load_flow(guidance=...)`` set; the experiment builder passes teacher.guidance,
so the bare networks and the trainer's ``guided(teacher, teacher.guidance)`` agree.

Latents. SD3 latents are (C, H, W) as the VAE makes them; the transformer patchifies itself. Flux packs each 2x2
patch of the (C, H, W) latents into one token of width 4C, with position ids (0, row, col) per patch and (0, 0, 0)
per text token (FluxPipeline._pack_latents / _prepare_latent_image_ids); the denoiser packs and unpacks, so the rest
of onestep sees (C, H, W) for both. ``LatentCodec`` (sd.py) applies the VAE's scaling_factor and shift_factor.

Features. ``features`` averages the image tokens after the transformer's last block (Flux: the last single-stream
block) into (B, feature_dim = heads x head_dim): what discriminator heads read.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from onestep.denoisers.base import GUIDANCE, Denoiser
from onestep.denoisers.pipeline_folder import (PromptEncoder, check_pipeline_folder, frozen, load_component,
                                               read_scheduler_config, require_prompts, sha1_files)
from onestep.denoisers.sd import LatentCodec, SDParts
from onestep.denoisers.slim import rebuilt_diffusers
from onestep.errors import ConfigError
from onestep.schedules import RectifiedFlow

KINDS = ("sd3", "flux")
#: (text encoder, its tokenizer) sub-folders, in the pipeline's order
TEXT_FOLDERS = {"sd3": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"),
                        ("text_encoder_3", "tokenizer_3")),
                "flux": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))}
#: the pipelines' ``max_sequence_length`` call default: T5 tokens per prompt
MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}
#: FluxPipeline's ``guidance_scale`` default: the embedded guidance of guidance-distilled Flux unless set
FLUX_GUIDANCE = 3.5
#: FluxPipeline.default_sample_size: the latent side when teacher.resolution is not given (Flux's transformer
#: config has no sample_size)
FLUX_SAMPLE_SIZE = 128
#: Flux packs 2x2 latent patches into one token
FLUX_PATCH = 2


def check_flow_folder(path, kind: str) -> Path:
    if kind not in KINDS:
        raise ConfigError(f"teacher '{kind}' is not a flow-transformer kind; use teacher=sd3 or teacher=flux")
    return check_pipeline_folder(path, kind, by_class=True)


def flow_schedule(folder, image_tokens: int) -> tuple[RectifiedFlow, int]:
    """The sampling shift at ``image_tokens`` transformer tokens and num_train_timesteps, from
    scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler)."""
    c, where = read_scheduler_config(folder)
    if c.get("invert_sigmas"):
        raise ConfigError(f"{where} sets invert_sigmas (sigma = 1 - t, Mochi's convention), which onestep does not "
                          "support")
    # absent keys take FlowMatchEulerDiscreteScheduler's defaults, as from_config would
    if c.get("use_dynamic_shifting", False):
        base_n, max_n = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        base_shift, max_shift = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
        # the pipelines' calculate_shift, operation for operation
        m = (max_shift - base_shift) / (max_n - base_n)
        mu = image_tokens * m + (base_shift - m * base_n)
        # FlowMatchEulerDiscreteScheduler.time_shift(mu, 1, u): e^mu / (e^mu + 1/u - 1) (exponential) or
        # mu / (mu + 1/u - 1) (linear), i.e. the shift map with s = e^mu or s = mu
        linear = c.get("time_shift_type", "exponential") == "linear"
        shift = mu if linear else math.exp(mu)
    else:
        shift = float(c.get("shift", 1.0))
    if shift <= 0:
        raise ConfigError(f"{where} gives the shift {shift:.4g} at {image_tokens} image tokens; it must be > 0")
    return RectifiedFlow(shift=shift), int(c.get("num_train_timesteps", 1000))


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 W/2, 4C): FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H/2 W/2, 4C) -> (B, C, H, W): FluxPipeline._unpack_latents on latent (not pixel) sizes."""
    b, _, d = tokens.shape
    return tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Rotary position ids (0, row, col) of the (h/2) x (w/2) packed tokens: FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FlowTransformerDenoiser(Denoiser):
    """A text-conditioned ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` as a Denoiser on (C, H, W) latents
    (see the module docstring)."""

    conditional = True
    prediction = "flow"

    def __init__(self, transformer, schedule: RectifiedFlow, kind: str, latent_size: int, *,
                 num_train_timesteps: int = 1000, guidance: float = FLUX_GUIDANCE):
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"teacher '{kind}' is not a flow-transformer kind; use one of {KINDS}")
        c = transformer.config
        if kind == "flux":
            if c.in_channels % (FLUX_PATCH * FLUX_PATCH):
                raise ConfigError(f"teacher=flux but the transformer takes {c.in_channels} input channels, not 4 x the "
                                  "latent channels of packed 2x2 patches; use a Flux pipeline folder")
            channels, patch = c.in_channels // (FLUX_PATCH * FLUX_PATCH), FLUX_PATCH
        else:
            channels, patch = c.in_channels, c.patch_size
        if latent_size <= 0 or latent_size % patch:
            raise ConfigError(f"teacher={kind}: latent side {latent_size} must be a positive multiple of the "
                              f"transformer's {patch}x{patch} patches; set teacher.resolution accordingly")
        self.transformer, self.schedule, self.kind = transformer, schedule, kind
        self.num_train_timesteps = int(num_train_timesteps)
        self.data_shape = (channels, latent_size, latent_size)
        self.embedded_guidance = kind == "flux" and bool(c.guidance_embeds)
        #: the scale a guidance-embedding transformer gets when the conditioning carries none (``guided`` sets it)
        self.guidance = float(guidance) if self.embedded_guidance else None
        #: width of ``features``: the transformer's hidden size
        self.feature_dim = c.num_attention_heads * c.attention_head_dim

    def with_arch(self, changes: dict, replace: bool = False) -> "FlowTransformerDenoiser":
        """The same adapter on a fresh transformer of another configuration (generator.arch, denoisers/slim.py)."""
        return FlowTransformerDenoiser(rebuilt_diffusers(self.transformer, changes, replace), self.schedule, self.kind,
                                       self.data_shape[-1], num_train_timesteps=self.num_train_timesteps,
                                       guidance=FLUX_GUIDANCE if self.guidance is None else self.guidance)

    def randn_like(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Flux: fresh noise is drawn as packed tokens (B, H/2 W/2, 4C), the layout FluxPipeline's scheduler draws
        it in, then unpacked; so a re-noising student uses the generator's numbers where its pipeline does."""
        if self.kind != "flux":
            return super().randn_like(x, generator)
        b, c, h, w = x.shape
        device = x.device if generator is None else generator.device
        tokens = torch.randn((b, (h // 2) * (w // 2), 4 * c), dtype=x.dtype, device=device, generator=generator)
        return unpack(tokens, h, w).to(x.device)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "sd3":
            return t * self.num_train_timesteps
        return t * (self.num_train_timesteps / 1000)

    def forward(self, x_t, t, cond=None):
        require_prompts(cond, "FlowTextEncoder", self.kind)
        self.check_input(x_t, "x_t")
        t = self._time(t, x_t)
        dtype, dev = self.transformer.dtype, x_t.device
        text = cond["prompt_embeds"].to(dev, dtype)
        pooled = cond["pooled_prompt_embeds"].to(dev, dtype)
        # the timestep keeps t's precision (float32 at least, see _time) under a half-precision transformer, as in
        # sd.py (the model casts it itself); a float64 t stays float64 for a float64 transformer's finite differences
        timestep = self.timestep(t)
        if self.kind == "sd3":
            out = self.transformer(hidden_states=x_t.to(dtype), timestep=timestep, encoder_hidden_states=text,
                                   pooled_projections=pooled, return_dict=False)[0]
            return out.to(x_t.dtype)
        h, w = x_t.shape[-2:]
        guidance = None
        if self.embedded_guidance:
            guidance = cond[GUIDANCE].to(dev, torch.float32) if GUIDANCE in cond else \
                torch.full((x_t.shape[0],), self.guidance, device=dev, dtype=torch.float32)
        out = self.transformer(hidden_states=pack(x_t.to(dtype)), timestep=timestep, guidance=guidance,
                               pooled_projections=pooled, encoder_hidden_states=text,
                               txt_ids=torch.zeros(text.shape[1], 3, device=dev, dtype=dtype),
                               img_ids=image_ids(h, w, dev, dtype), return_dict=False)[0]
        return unpack(out, h, w).to(x_t.dtype)

    def features(self, x_t, t, cond=None) -> torch.Tensor:
        """Image tokens after the last block, averaged (batch, feature_dim). Captured by a forward hook, so the
        whole transformer runs (the output projection is discarded)."""
        blocks = getattr(self.transformer, "single_transformer_blocks", None) or self.transformer.transformer_blocks
        captured = []
        # both models' blocks return (text tokens, image tokens)
        hook = blocks[-1].register_forward_hook(lambda m, args, out: captured.append(out[1]))
        try:
            self(x_t, t, cond)
        finally:
            hook.remove()
        return captured[0].mean(1).to(x_t.dtype)


class FlowTextEncoder(PromptEncoder):
    """The pipeline's own ``encode_prompt`` on its frozen text encoders; returns batch-first float32 fields on the CPU
    (the interface of sd.TextEncoder: name, encode, null_fields, assemble, cond)."""

    def __init__(self, folder, kind: str, device="cpu", dtype=torch.float32, max_sequence_length: int | None = None):
        from diffusers import FluxPipeline, StableDiffusion3Pipeline
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel
        from transformers import T5TokenizerFast

        folder = check_flow_folder(folder, kind)
        n = MAX_SEQUENCE_LENGTH[kind] if max_sequence_length is None else int(max_sequence_length)
        if not 0 < n <= MAX_SEQUENCE_LENGTH["flux"]:
            raise ConfigError(f"max_sequence_length={n} must be in 1..512 T5 tokens (the pipelines' limit)")
        self.kind, self.device, self.max_sequence_length = kind, torch.device(device), n
        classes = {"sd3": ((CLIPTextModelWithProjection, CLIPTokenizer), (CLIPTextModelWithProjection, CLIPTokenizer),
                           (T5EncoderModel, T5TokenizerFast)),
                   "flux": ((CLIPTextModel, CLIPTokenizer), (T5EncoderModel, T5TokenizerFast))}[kind]
        parts = {}
        for (enc, tok), (enc_cls, tok_cls) in zip(TEXT_FOLDERS[kind], classes):
            parts[tok] = load_component(folder, tok, kind, tok_cls)
            parts[enc] = frozen(load_component(folder, enc, kind, enc_cls, dtype=dtype), self.device)
        # the text half of the pipeline: encode_prompt reads nothing else
        cls = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
        self.pipe = cls(transformer=None, vae=None, scheduler=None, **parts)
        # identity of the encoded fields, for caches: the exact tokenizer and encoder bytes and the T5 length
        digest = sha1_files(folder, [f for pair in TEXT_FOLDERS[kind] for f in pair], f"max_sequence_length={n}")
        self.name = f"{kind}-{digest[:16]}"
        self._null: dict[str | None, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        prompts = list(prompts)
        if self.kind == "sd3":
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=self.device,
                                                           do_classifier_free_guidance=False,
                                                           max_sequence_length=self.max_sequence_length)
        else:
            embeds, pooled, _ = self.pipe.encode_prompt(prompts, None, device=self.device,
                                                        max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds.float().cpu(), "pooled_prompt_embeds": pooled.float().cpu()}


def load_flow(folder, kind: str, *, dtype=torch.float32, device="cpu", resolution: int | None = None,
              guidance: float = FLUX_GUIDANCE, max_sequence_length: int | None = None) -> SDParts:
    """A pipeline folder's frozen transformer (as a Denoiser), text encoders and VAE. ``resolution`` (pixels;
    ``teacher.resolution``) overrides the native size (SD3: transformer.config.sample_size; Flux: the pipeline's
    default 128 latents); ``guidance`` is guidance-distilled Flux's embedded scale when no ``guided`` view sets one;
    ``max_sequence_length`` the T5 tokens per prompt (default: the pipeline's)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

    folder = check_flow_folder(folder, kind)
    cls = SD3Transformer2DModel if kind == "sd3" else FluxTransformer2DModel
    transformer = frozen(load_component(folder, "transformer", kind, cls, dtype=dtype), device)
    codec = LatentCodec(frozen(load_component(folder, "vae", kind, AutoencoderKL, dtype=dtype), device))
    c = transformer.config
    channels, patch = (c.in_channels // 4, FLUX_PATCH) if kind == "flux" else (c.in_channels, c.patch_size)
    if channels != codec.latent_channels:
        raise ConfigError(f"teacher.path '{folder}': the transformer takes {c.in_channels} input channels but the vae "
                          f"makes {codec.latent_channels}-channel latents; expected a diffusers {kind} pipeline folder")
    step = codec.downsample * patch
    if resolution is not None:
        if resolution <= 0 or resolution % step:
            raise ConfigError(f"teacher.resolution={resolution} must be a positive multiple of {step} (the VAE's "
                              f"downsampling {codec.downsample} x the transformer's {patch}x{patch} patches)")
        size = resolution // codec.downsample
    else:
        size = c.sample_size if kind == "sd3" else FLUX_SAMPLE_SIZE
    limit = getattr(c, "pos_embed_max_size", None) if kind == "sd3" else None
    if limit and size // patch > limit:
        raise ConfigError(f"teacher.resolution={size * codec.downsample} is larger than the SD3 transformer's "
                          f"position table ({limit * patch * codec.downsample} px); pass a smaller teacher.resolution")
    schedule, steps = flow_schedule(folder, image_tokens=(size // patch) ** 2)
    denoiser = FlowTransformerDenoiser(transformer, schedule, kind, size, num_train_timesteps=steps, guidance=guidance)
    text = FlowTextEncoder(folder, kind, device, dtype, max_sequence_length)
    return SDParts(denoiser, text, codec, image_size=size * codec.downsample)
