"""Tiny random Stable Diffusion 1.5 / SDXL pipeline folders built from diffusers' and transformers' own
classes (no hub): 16x16 images, 4x8x8 latents, 16-token prompts, a character-level CLIP tokenizer.
Everything is seeded, so a folder's weights and therefore its outputs are deterministic."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

TEXT_DIM = 32
MAX_TOKENS = 16
#: a character vocabulary: every character alone and word-final ("</w>"), then CLIP's two special tokens
CHARS = string.ascii_lowercase + string.digits + string.punctuation
TOKENS = [*CHARS, *(c + "</w>" for c in CHARS), "<|startoftext|>", "<|endoftext|>"]
SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


def tokenizer(folder: Path):
    """A CLIPTokenizer over single characters: an empty merges list leaves BPE at one token per character."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(TOKENS)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_TOKENS)


def text_encoder(projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=TEXT_DIM, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                            max_position_embeddings=MAX_TOKENS, vocab_size=len(TOKENS), projection_dim=TEXT_DIM,
                            bos_token_id=len(TOKENS) - 2, eos_token_id=len(TOKENS) - 1,
                            pad_token_id=len(TOKENS) - 1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def unet(cross_attention_dim: int | None = TEXT_DIM, sdxl: bool = False):
    from diffusers import UNet2DConditionModel

    if cross_attention_dim is None:  # no text conditioning at all: plain ResNet blocks only
        blocks = {"down_block_types": ("DownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "UpBlock2D"),
                  "mid_block_type": None}
    else:
        blocks = {"down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                  "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": cross_attention_dim}
    extra = {}
    if sdxl:  # pooled text (TEXT_DIM) + 6 size/crop numbers, each embedded in addition_time_embed_dim
        extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                 "projection_class_embeddings_input_dim": 6 * 8 + TEXT_DIM, "transformer_layers_per_block": 1}
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, attention_head_dim=8, **blocks, **extra)


def vae(scaling_factor: float = 0.18215, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=16, scaling_factor=scaling_factor,
                         shift_factor=shift_factor)


def scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER, prediction_type=prediction_type, clip_sample=False, steps_offset=1)


def make_tiny_sd15(folder, *, prediction_type: str = "epsilon", cross_attention: bool = True) -> Path:
    """An SD 1.x-style pipeline folder; ``cross_attention=False`` gives a UNet that cannot read text."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=unet(TEXT_DIM if cross_attention else None), vae=vae(), text_encoder=text_encoder(),
        tokenizer=tokenizer(folder / "tokenizer"), scheduler=scheduler(prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_tiny_sdxl(folder) -> Path:
    """An SDXL-style pipeline folder: two text encoders (32 + 32 = 64-wide tokens), pooled text and size ids."""
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        unet=unet(2 * TEXT_DIM, sdxl=True), vae=vae(), text_encoder=text_encoder(),
        text_encoder_2=text_encoder(projection=True), tokenizer=tokenizer(folder / "tokenizer"),
        tokenizer_2=tokenizer(folder / "tokenizer_2"), scheduler=scheduler())
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_prompts(path, prompts) -> Path:
    """One prompt per line, the format of a prompt file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(p + "\n" for p in prompts))
    return path


def write_captioned_images(folder, prompts, size=(16, 16), prefix: str = "") -> Path:
    """Random RGB images (seeded) with same-name .txt captions, one per prompt: the data=image_text folder format."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i, prompt in enumerate(prompts):
        Image.fromarray((torch.rand(*size, 3, generator=g) * 255).to(torch.uint8).numpy()).save(folder / f"{prefix}{i}.png")
        (folder / f"{prefix}{i}.txt").write_text(prompt + "\n")
    return folder
