"""Tiny random CogVideoX pipeline folders built from diffusers' and transformers' own classes (no hub): 9-frame 32x32
videos, (3, 4, 8, 8) latents (frames first, the pipeline's layout), T5 prompts of ``T5_TOKENS`` tokens from
flow_fixtures' character-level T5 tokenizer, and CogVideoXDDIMScheduler with CogVideoX-2b/5b's table (scaled_linear,
snr_shift_scale 3, zero terminal SNR, v-prediction, trailing spacing). Everything is seeded."""

from __future__ import annotations

from pathlib import Path

import torch
from flow_fixtures import T5_DIM, T5_TOKENS, t5_encoder, t5_tokenizer

#: frames of a generated video: 1 + 4 k, which the VAE's 4x temporal compression turns into 1 + k latent frames
FRAMES = 9
#: (latent frames, latent channels, latent side, latent side)
LATENT_SHAPE = (3, 4, 8, 8)
#: CogVideoX-2b / 5b's scheduler_config.json (the keys that differ from CogVideoXDDIMScheduler's defaults)
SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "set_alpha_to_one": True,
             "snr_shift_scale": 3.0, "timestep_spacing": "trailing"}


def transformer(rotary: bool = True, **options):
    """CogVideoX-5b's layout (3D rotary embeddings) or, ``rotary=False``, 2b's (sin-cos positional embeddings);
    head width 16 so the rotary split (1/4 time, 3/8 height, 3/8 width) is even."""
    from diffusers import CogVideoXTransformer3DModel

    config = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
                  text_embed_dim=T5_DIM, num_layers=2, sample_width=8, sample_height=8, sample_frames=FRAMES,
                  patch_size=2, temporal_compression_ratio=4, max_text_seq_length=T5_TOKENS,
                  use_rotary_positional_embeddings=rotary)
    return CogVideoXTransformer3DModel(**{**config, **options})


def vae():
    """4x spatial and 4x temporal compression (three blocks; the first two halve time), 4 latent channels."""
    from diffusers import AutoencoderKLCogVideoX

    blocks = 3
    return AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * blocks,
                                  up_block_types=("CogVideoXUpBlock3D",) * blocks, block_out_channels=(8,) * blocks,
                                  latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_height=32,
                                  sample_width=32, scaling_factor=0.7)


def scheduler(**options):
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(**{**SCHEDULER, **options})


def make_tiny_cogvideox(folder, rotary: bool = True) -> Path:
    """A CogVideoXPipeline folder: T5 text encoder, 3D causal VAE, CogVideoX transformer, DDIM scheduler."""
    from diffusers import CogVideoXPipeline

    folder = Path(folder)
    torch.manual_seed(0)
    tok = t5_tokenizer(folder / "tokenizer")
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=t5_encoder(len(tok)), vae=vae(),
                             transformer=transformer(rotary), scheduler=scheduler())
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
