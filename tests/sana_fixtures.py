"""Tiny random Sana pipeline folders built from diffusers' and transformers' own classes (no hub): 32x32 images,
a 3-stage AutoencoderDC (4x8x8 latents), a 2-block SanaTransformer2DModel, a 2-layer Gemma2Model with a
character-level Gemma tokenizer, and Sana's hub scheduler (DPM-Solver++ on flow sigmas, flow_shift 3).
Everything is seeded, so a folder's weights and therefore its outputs are deterministic."""

from __future__ import annotations

import math
import string
from pathlib import Path

import torch

TEXT_DIM = 32
LATENT_CHANNELS = 4
FLOW_SHIFT = 3.0
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
#: Gemma's normalizer writes spaces as "▁"; every other character is a token of its own (no merges)
CHARS = ("\u2581", *string.ascii_letters, *string.digits, *string.punctuation, "\n")
VOCAB = {tok: i for i, tok in enumerate((*SPECIALS, *CHARS))}


def tokenizer(folder: Path | None = None):
    """Transformers' GemmaTokenizer (a tokenizers-library BPE with Gemma's normalizer and pre-tokenizer) over single
    characters: an empty merges list leaves one token per character. Like Gemma's it starts every sequence with
    <bos>, so the empty prompt is one token, and pads on the left (SanaPipeline switches it to the right)."""
    from transformers import GemmaTokenizerFast

    tok = GemmaTokenizerFast(vocab=VOCAB, merges=[], add_bos_token=True)
    if folder is not None:
        tok.save_pretrained(str(folder))
    return tok


def text_encoder():
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(vocab_size=len(VOCAB), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                          max_position_embeddings=4096, pad_token_id=VOCAB["<pad>"], eos_token_id=VOCAB["<eos>"],
                          bos_token_id=VOCAB["<bos>"])
    return Gemma2Model(config)


def transformer(out_channels: int = LATENT_CHANNELS, *, in_channels: int = LATENT_CHANNELS,
                guidance_embeds: bool = False):
    """Linear self-attention + softmax cross-attention on Gemma's 32-wide tokens, 8x8 latents, 1x1 patches.
    ``out_channels`` = 2 x latent channels is a learned-variance model (the pipeline keeps the first half);
    ``guidance_embeds`` is SANA-Sprint's guidance-scale input."""
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=in_channels, out_channels=out_channels, num_attention_heads=2,
                                  attention_head_dim=8, num_layers=2, num_cross_attention_heads=2,
                                  cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=TEXT_DIM,
                                  sample_size=8, patch_size=1, guidance_embeds=guidance_embeds)


def vae(scaling_factor: float = 0.41407):
    """Downsampling by 4 (three stages, the last with DC-AE's linear-attention EfficientViT block)."""
    from diffusers import AutoencoderDC

    stages = 3
    return AutoencoderDC(in_channels=3, latent_channels=LATENT_CHANNELS, attention_head_dim=4,
                         encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                         decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                         encoder_block_out_channels=(8, 8, 16), decoder_block_out_channels=(8, 8, 16),
                         encoder_layers_per_block=(1,) * stages, decoder_layers_per_block=(1,) * stages,
                         encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                         downsample_block_type="conv", upsample_block_type="interpolate",
                         decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=scaling_factor)


def scheduler(kind: str = "dpm"):
    """``dpm``: the scheduler the hub's Sana folders ship; ``euler``: FlowMatchEulerDiscreteScheduler, same shift."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT,
                                       algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")


def make_tiny_sana(folder, *, out_channels: int = LATENT_CHANNELS, scheduler_kind: str = "dpm") -> Path:
    from diffusers import SanaPipeline

    folder = Path(folder)
    torch.manual_seed(0)
    pipe = SanaPipeline(tokenizer=tokenizer(), text_encoder=text_encoder(), vae=vae(),
                        transformer=transformer(out_channels), scheduler=scheduler(scheduler_kind))
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def sinusoids(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1, max_period=10000):
    """diffusers' get_timestep_embedding in the timesteps' own dtype (diffusers computes it in float32)."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=timesteps.dtype, device=timesteps.device)
    emb = scale * timesteps[:, None] * torch.exp(exponent / (half - downscale_freq_shift))[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return torch.nn.functional.pad(emb, (0, 1, 0, 0)) if embedding_dim % 2 else emb


class LinearAttention64:
    """SanaLinearAttnProcessor2_0 without its cast of q, k, v to float32 (so a float64 model stays float64)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        from torch.nn.functional import pad, relu

        q = relu(attn.to_q(hidden_states).transpose(1, 2).unflatten(1, (attn.heads, -1)))
        k = relu(attn.to_k(hidden_states).transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3))
        v = pad(attn.to_v(hidden_states).transpose(1, 2).unflatten(1, (attn.heads, -1)), (0, 0, 0, 1), value=1.0)
        out = torch.matmul(torch.matmul(v, k), q)
        out = (out[:, :, :-1] / (out[:, :, -1:] + 1e-15)).flatten(1, 2).transpose(1, 2)
        return attn.to_out[1](attn.to_out[0](out))


def float64_throughout(transformer, monkeypatch):
    """A float64 SanaTransformer2DModel computes two pieces in float32 whatever its dtype (the sinusoidal timestep
    embedding and the linear attention): route both through the same math at the input's precision, so finite
    differences can be taken at float64 accuracy."""
    import diffusers.models.embeddings

    monkeypatch.setattr(diffusers.models.embeddings, "get_timestep_embedding", sinusoids)
    for block in transformer.transformer_blocks:
        block.attn1.set_processor(LinearAttention64())
    return transformer
