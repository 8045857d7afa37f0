"""Adapters from Stable Diffusion pipeline folders (SD 1.x/2.x: ``sd15``; SDXL: ``sdxl``) to onestep.

A teacher is a local diffusers pipeline folder (what ``StableDiffusion[XL]Pipeline.save_pretrained`` writes).
Its parts map onto onestep as follows; nothing is hand-set, everything is read from the folder.

Time. ``scheduler/scheduler_config.json`` gives the DDPM table (beta_schedule, beta_start, beta_end,
num_train_timesteps), i.e. a ``VPDiscrete`` schedule. Continuous t in [0, 1] reaches the UNet as
    timestep = schedule.index(t) = t (N - 1)
so t = k / (N - 1) is exactly diffusers' integer timestep k (t = 1 is 999, the noisiest row) and times in
between feed fractional timesteps to the sinusoidal embedding.

Prediction. The scheduler's ``prediction_type`` names the UNet's native output:
    epsilon -> eps,  v_prediction -> v (a eps - s x0),  sample -> x0      (``PREDICTIONS``)

Conditioning. ``TextEncoder`` builds a ``Cond`` with the fields the pipeline's ``encode_prompt`` makes:
    sd15  prompt_embeds         text_encoder(ids)[0]                            (B, 77, 768 | 1024)
    sdxl  prompt_embeds         cat(penultimate hidden states of both encoders)  (B, 77, 2048)
          pooled_prompt_embeds  text_encoder_2's projected final token           (B, 1280)
          add_time_ids          [h, w, 0, 0, h, w] in pixels (original size, crop, target size)
The null row (the unconditional branch of classifier-free guidance) is what the pipeline feeds with
guidance_scale > 1: the encoded negative prompt ("" when none); for SDXL without a negative prompt, zeros
(``force_zeros_for_empty_prompt`` in model_index.json). ``Guided`` then forms u + w (c - u), as the pipelines do.

Latents. ``LatentCodec`` maps images in [-1, 1] to the diffusion data z = (E(x) - shift) * scaling and back,
with scaling_factor / shift_factor from ``vae/config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from onestep.conditioning import Cond
from onestep.denoisers.base import Denoiser
from onestep.denoisers.control import CONTROL, control_adapter, control_residuals
from onestep.denoisers.diffusers import MidBlockFeatures
from onestep.denoisers.slim import rebuilt_diffusers
from onestep.denoisers.pipeline_folder import check_pipeline_folder as check_folder
from onestep.denoisers.pipeline_folder import (PromptEncoder, VAECodec, frozen, load_component, read_scheduler_config,
                                               require_prompts, sha1_files)
from onestep.errors import ConfigError
from onestep.schedules import VPDiscrete

KINDS = ("sd15", "sdxl")
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
#: (text encoder, its tokenizer) sub-folders, in the pipeline's order
TEXT_FOLDERS = {"sd15": (("text_encoder", "tokenizer"),),
                "sdxl": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))}


def check_pipeline_folder(path, kind: str) -> Path:
    if kind not in KINDS:
        raise ConfigError(f"teacher '{kind}' is not a Stable Diffusion kind; use teacher=sd15 (SD 1.x/2.x) "
                          "or teacher=sdxl")
    return check_folder(path, kind)


#: the table keys' values when a scheduler_config.json leaves them out, as from_config would fill them: diffusers'
#: DDPM / DDIM defaults, and CogVideoX's schedulers' (whose table also divides the SNR by ``snr_shift_scale``)
TABLE_DEFAULTS = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
_COGVIDEOX_TABLE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "snr_shift_scale": 3.0}
CLASS_TABLE_DEFAULTS = {"CogVideoXDDIMScheduler": _COGVIDEOX_TABLE, "CogVideoXDPMScheduler": _COGVIDEOX_TABLE}


def scheduler_schedule(folder, zero_snr: bool = False) -> tuple[VPDiscrete, str]:
    """The training noise table and the network's native prediction, from scheduler/scheduler_config.json.
    ``zero_snr``: the caller's pipeline runs zero-terminal-SNR tables (CogVideoX's); SD's adapters refuse them."""
    c, where = read_scheduler_config(folder)
    # absent keys take diffusers' scheduler defaults, as from_config would; snr_shift_scale is CogVideoX's alone
    shifted = c.get("_class_name") in CLASS_TABLE_DEFAULTS
    c = {**CLASS_TABLE_DEFAULTS.get(c.get("_class_name"), TABLE_DEFAULTS), **c}
    beta_schedule = c["beta_schedule"]
    if beta_schedule not in ("linear", "scaled_linear") or c.get("trained_betas") is not None:
        raise ConfigError(f"{where} has beta_schedule '{beta_schedule}'"
                          f"{' with trained_betas' if c.get('trained_betas') is not None else ''}; onestep reads "
                          "only 'linear' and 'scaled_linear' tables")
    if c.get("rescale_betas_zero_snr") and not zero_snr:
        raise ConfigError(f"{where} sets rescale_betas_zero_snr, which onestep does not support")
    prediction_type = c.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTIONS:
        raise ConfigError(f"{where} has prediction_type '{prediction_type}'; expected one of {sorted(PREDICTIONS)}")
    schedule = VPDiscrete(beta_schedule, int(c.get("num_train_timesteps", 1000)), float(c["beta_start"]),
                          float(c["beta_end"]), snr_shift_scale=float(c["snr_shift_scale"]) if shifted else 1.0,
                          zero_terminal_snr=bool(c.get("rescale_betas_zero_snr", False)))
    return schedule, PREDICTIONS[prediction_type]


class SDUNetDenoiser(MidBlockFeatures, Denoiser):
    """A text-conditioned ``diffusers.UNet2DConditionModel`` as a Denoiser on latents (see the module docstring)."""

    conditional = True

    def __init__(self, unet, schedule: VPDiscrete, prediction: str, kind: str, latent_size: int):
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"teacher '{kind}' is not a Stable Diffusion kind; use one of {KINDS}")
        c = unet.config
        blocks = (*c.down_block_types, *c.up_block_types, c.mid_block_type or "")
        if c.cross_attention_dim is None or not any("CrossAttn" in b for b in blocks):
            raise ConfigError(f"teacher={kind} needs a text-conditioned UNet, but the folder's unet has no "
                              "cross-attention; pass teacher.path=<a text-to-image pipeline folder>")
        text_time = c.addition_embed_type == "text_time"
        if text_time != (kind == "sdxl"):
            raise ConfigError(f"teacher={kind} but the folder's unet {'takes' if text_time else 'lacks'} SDXL's pooled "
                              f"text and size conditioning; use teacher={'sdxl' if text_time else 'sd15'}")
        if prediction not in PREDICTIONS.values():
            raise ConfigError(f"UNet prediction '{prediction}' is unknown; use one of {tuple(PREDICTIONS.values())}")
        self.unet, self.schedule, self.prediction, self.kind = unet, schedule, prediction, kind
        #: a ControlNet adapter (``add_control``; objective=nct), run when the conditioning carries CONTROL
        self.controlnet = None
        self.data_shape = (c.in_channels, latent_size, latent_size)
        #: width of ``features``: the mid-block's channels
        self.feature_dim = c.block_out_channels[-1]

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.index(t)

    def with_arch(self, changes: dict, replace: bool = False) -> "SDUNetDenoiser":
        """The same adapter on a fresh UNet of another configuration (generator.arch, denoisers/slim.py)."""
        return SDUNetDenoiser(rebuilt_diffusers(self.unet, changes, replace), self.schedule, self.prediction, self.kind,
                              self.data_shape[-1])

    def add_control(self, source: str) -> None:
        """A ControlNet on this UNet (denoisers/control.py): built from it (``"unet"``) or from a local folder."""
        net = control_adapter(self.unet, source)
        self.controlnet = (net if net.dtype == self.unet.dtype else net.to(dtype=self.unet.dtype)).to(self.unet.device)

    def forward(self, x_t, t, cond=None):
        require_prompts(cond, "TextEncoder", self.kind)
        self.check_input(x_t, "x_t")
        t = self._time(t, x_t)
        dtype, dev = self.unet.dtype, x_t.device
        extra = None
        if self.kind == "sdxl":
            extra = {"text_embeds": cond["pooled_prompt_embeds"].to(dev, dtype),
                     "time_ids": cond["add_time_ids"].to(dev, dtype)}
        text = cond["prompt_embeds"].to(dev, dtype)
        # the timestep stays float32 under a half-precision UNet: fp16's spacing near 999 is 0.5
        residuals = {}
        if self.controlnet is not None and CONTROL in cond:
            residuals = control_residuals(self.controlnet, x_t.to(dtype), self.timestep(t).float(), text, extra,
                                          cond[CONTROL], self.data_shape[-1])
        out = self.unet(x_t.to(dtype), self.timestep(t).float(), encoder_hidden_states=text,
                        added_cond_kwargs=extra, **residuals).sample
        return out.to(x_t.dtype)


class TextEncoder(PromptEncoder):
    """The pipeline's prompt encoding, frozen; returns batch-first float32 fields on the CPU."""

    def __init__(self, folder, kind: str, device="cpu", dtype=torch.float32):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        folder = check_pipeline_folder(folder, kind)
        self.kind, self.device = kind, torch.device(device)
        self.tokenizers, self.encoders = [], []
        for (enc, tok), cls in zip(TEXT_FOLDERS[kind], (CLIPTextModel, CLIPTextModelWithProjection)):
            self.tokenizers.append(load_component(folder, tok, kind, CLIPTokenizer))
            self.encoders.append(frozen(load_component(folder, enc, kind, cls, dtype=dtype), self.device))
        index = json.loads((folder / "model_index.json").read_text())
        #: SDXL's unconditional branch is all zeros when there is no negative prompt (the pipeline's default)
        self.zeros_for_empty = kind == "sdxl" and bool(index.get("force_zeros_for_empty_prompt", True))
        # identity of the encoded fields, for caches: the exact tokenizer and encoder bytes and the null rule
        digest = sha1_files(folder, [f for pair in TEXT_FOLDERS[kind] for f in pair], f"zeros={self.zeros_for_empty}")
        self.name = f"{kind}-{digest[:16]}"
        self._null: dict[str | None, dict[str, torch.Tensor]] = {}

    def _run(self, i: int, prompts: list[str]):
        tok, enc = self.tokenizers[i], self.encoders[i]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        mask = ids.attention_mask.to(self.device) if getattr(enc.config, "use_attention_mask", False) else None
        return enc(ids.input_ids.to(self.device), attention_mask=mask, output_hidden_states=self.kind == "sdxl")

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        prompts = list(prompts)
        if self.kind == "sd15":
            return {"prompt_embeds": self._run(0, prompts)[0].float().cpu()}
        # SDXL reads the penultimate layer of both encoders; the pooled vector is text_encoder_2's
        # projection of the final token (CLIPTextModelWithProjection.text_embeds)
        one, two = self._run(0, prompts), self._run(1, prompts)
        return {"prompt_embeds": torch.cat([one.hidden_states[-2], two.hidden_states[-2]], -1).float().cpu(),
                "pooled_prompt_embeds": two[0].float().cpu()}

    def null_row(self, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        fields = self.encode([negative_prompt or ""])
        if self.zeros_for_empty and negative_prompt is None:
            fields = {k: torch.zeros_like(v) for k, v in fields.items()}
        return fields

    def time_ids(self, height: int, width: int) -> torch.Tensor | None:
        """SDXL's micro-conditioning with the pipeline's defaults: original size = target size, no crop."""
        if self.kind != "sdxl":
            return None
        return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)

    def assemble(self, prompts: list[str], fields: dict[str, torch.Tensor], negative_prompt: str | None = None,
                 height: int | None = None, width: int | None = None) -> Cond:
        """The Cond of encoded ``fields`` (fresh from ``encode`` or from a cache): the null row of
        ``negative_prompt`` and, for SDXL, the size ids on every row and on the null row."""
        fields, null = dict(fields), self.null_fields(negative_prompt)
        if self.kind == "sdxl":
            if height is None or width is None:
                raise ConfigError("SDXL conditioning needs the image height and width in pixels (add_time_ids); "
                                  "pass height= and width= (SDParts.image_size)")
            ids = self.time_ids(height, width)
            fields["add_time_ids"], null["add_time_ids"] = ids.repeat(len(prompts), 1), ids
        return Cond(fields, null=null, texts=prompts, null_text=negative_prompt or "")


class LatentCodec(VAECodec):
    """Images in [-1, 1] <-> diffusion data z = (E(x) - shift) * scaling, via a frozen ``diffusers.AutoencoderKL``
    (E = its posterior mean) or ``diffusers.AutoencoderDC`` (Sana's deterministic deep-compression autoencoder)."""

    def __init__(self, vae):
        c = vae.config
        if getattr(c, "latents_mean", None) is not None or getattr(c, "latents_std", None) is not None:
            raise ConfigError("the folder's vae has per-channel latents_mean / latents_std, which LatentCodec does not "
                              "apply; use a pipeline whose vae has only scaling_factor (and shift_factor)")
        self.scaling = float(c.scaling_factor)
        self.shift = float(getattr(c, "shift_factor", None) or 0.0)
        self.force_upcast = bool(getattr(c, "force_upcast", False))
        if self.force_upcast and vae.dtype in (torch.float16, torch.bfloat16):
            vae = vae.float()  # the VAE overflows in half precision (diffusers' force_upcast); keep it in fp32
        self.vae = vae
        self.latent_channels = c.latent_channels
        #: AutoencoderKL encodes to a posterior (``latent_dist``), AutoencoderDC to the latent itself (``latent``)
        self.posterior = not hasattr(c, "encoder_block_out_channels")
        stages = c.block_out_channels if self.posterior else c.encoder_block_out_channels
        self.downsample = 2 ** (len(stages) - 1)

    @property
    def normalisation(self) -> str:
        return f"scaling={self.scaling} shift={self.shift}"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        # the posterior mean, not a sample: a deterministic encoding keeps cached latents and reference
        # statistics reproducible, and the SD VAEs' posterior std is small next to the latents' spread
        out = self.vae.encode(images.to(self.vae.dtype))
        mean = out.latent_dist.mean if self.posterior else out.latent
        return ((mean - self.shift) * self.scaling).to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode((latents / self.scaling + self.shift).to(self.vae.dtype)).sample
        return images.clamp(-1, 1).to(latents.dtype)


@dataclass
class SDParts:
    """What a teacher folder gives a run (``load_sd``; ``flow.load_flow`` for SD3 / Flux)."""
    denoiser: Denoiser
    #: TextEncoder, or flow.FlowTextEncoder (the same interface: name, encode, null_fields, assemble, cond)
    text: TextEncoder
    codec: LatentCodec
    #: generated image side in pixels: the network's latent side * the VAE's downsampling
    image_size: int


def load_sd(folder, kind: str, *, dtype=torch.float32, device="cpu", resolution: int | None = None) -> SDParts:
    """A pipeline folder's frozen UNet (as a Denoiser), text encoder(s) and VAE. ``resolution`` (pixels, a
    multiple of the VAE's downsampling; ``teacher.resolution``) overrides the unet's native sample_size."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = check_pipeline_folder(folder, kind)
    schedule, prediction = scheduler_schedule(folder)
    unet = frozen(load_component(folder, "unet", kind, UNet2DConditionModel, dtype=dtype), device)
    codec = LatentCodec(frozen(load_component(folder, "vae", kind, AutoencoderKL, dtype=dtype), device))
    size = unet.config.sample_size
    if resolution is not None:
        if resolution <= 0 or resolution % codec.downsample:
            raise ConfigError(f"teacher.resolution={resolution} must be a positive multiple of the VAE's "
                              f"downsampling {codec.downsample}")
        size = resolution // codec.downsample
    if size is None:
        raise ConfigError(f"teacher.path '{folder}': the unet config has no sample_size; pass "
                          "teacher.resolution=<image side in pixels>")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"teacher.path '{folder}': the unet's sample_size {tuple(size)} is not square; "
                              "onestep generates square images")
        size = size[0]
    denoiser = SDUNetDenoiser(unet, schedule, prediction, kind, latent_size=int(size))
    return SDParts(denoiser, TextEncoder(folder, kind, device, dtype), codec, image_size=int(size) * codec.downsample)
