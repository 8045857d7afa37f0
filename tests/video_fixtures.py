"""Tiny random Wan 2.1 / 2.2 pipeline folders built from diffusers' and transformers' own classes (no hub): 5-frame
32x32 videos, latents (4, 2, 4, 4) (the VAE's 4x temporal and 8x spatial downsampling), 2x2 patches, UMT5 prompts of
``T5_TOKENS`` tokens from flow_fixtures' character-level T5 tokenizer. Everything is seeded, so a folder's outputs
are deterministic."""

from __future__ import annotations

from pathlib import Path

import torch
from flow_fixtures import T5_TOKENS, t5_tokenizer

#: UMT5 width, the transformer's text_dim
TEXT_DIM = 32
LATENT_CHANNELS = 4
#: pixel frames and side of the tests' videos, and the latents they make
NUM_FRAMES = 5
RESOLUTION = 32
LATENT_SHAPE = (LATENT_CHANNELS, 2, 4, 4)
#: Wan 2.1 480p's flow_shift
SHIFT = 3.0
#: Wan 2.2 A14B's boundary_ratio (its model_index.json): the high-noise expert serves timesteps >= 875
BOUNDARY_RATIO = 0.875
__all__ = ["T5_TOKENS", "make_tiny_wan"]


def wan_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                 in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM,
                                 freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def wan_vae():
    from diffusers import AutoencoderKLWan

    # non-trivial per-channel statistics, so a codec that skipped or inverted the normalisation would differ
    return AutoencoderKLWan(base_dim=4, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.05],
                            latents_std=[1.5, 0.8, 2.0, 1.2])


def umt5_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2,
                                       num_heads=2, relative_attention_num_buckets=8,
                                       relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
                                       decoder_start_token_id=0, feed_forward_proj="gated-gelu"))


def make_tiny_wan(folder, two_experts: bool = False, scheduler: str = "unipc") -> Path:
    """A Wan 2.1-style folder (one transformer), or Wan 2.2 A14B-style (``two_experts``: transformer_2 and
    boundary_ratio); ``scheduler``: "unipc" (what the hub's Wan folders ship) or "euler"."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

    folder = Path(folder)
    torch.manual_seed(0)
    tok = t5_tokenizer(folder / "tokenizer")
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT) \
        if scheduler == "unipc" else FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    pipe = WanPipeline(tokenizer=tok, text_encoder=umt5_encoder(len(tok)), vae=wan_vae(), scheduler=sched,
                       transformer=wan_transformer(1), transformer_2=wan_transformer(2) if two_experts else None,
                       boundary_ratio=BOUNDARY_RATIO if two_experts else None)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
