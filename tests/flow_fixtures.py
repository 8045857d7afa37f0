"""Tiny random SD3 / Flux pipeline folders built from diffusers' and transformers' own classes (no hub): 16x16 images,
4x8x8 latents, 16-token CLIP prompts (sd_fixtures' character-level tokenizer), T5 prompts of ``T5_TOKENS`` tokens
from a character-level Unigram T5 tokenizer. Everything is seeded, so a folder's outputs are deterministic."""

from __future__ import annotations

from pathlib import Path

import torch
from sana_fixtures import sinusoids
from sd_fixtures import CHARS, TEXT_DIM, text_encoder, tokenizer, vae

#: T5 width, also the transformers' joint_attention_dim; wider than SD3's two CLIPs together (2 x 32), so SD3's
#: zero padding of the CLIP states to T5's width is exercised
T5_DIM = 48 + 2 * TEXT_DIM
#: the T5 length the tests encode with (the pipelines' max_sequence_length)
T5_TOKENS = 16
#: SD3's latent shift (3.0 in SD3 / SD3.5's scheduler configs)
SD3_SHIFT = 3.0
#: Flux's dynamic shift, on token counts of tiny images: 16 tokens (16 px) and 64 tokens (32 px) give different shifts
FLUX_SHIFT = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 4,
              "max_image_seq_len": 256}


def t5_tokenizer(folder: Path):
    """A T5 tokenizer (transformers' tokenizers-backed T5TokenizerFast) over single characters: Unigram pieces for
    every character alone and word-initial ("▁" + c), after T5's <pad> = 0, </s> = 1, <unk> = 2."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in CHARS] + [("▁" + c, -2.5) for c in CHARS]
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tok.save_pretrained(str(folder))
    return T5TokenizerFast.from_pretrained(str(folder))


def t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=T5_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0, feed_forward_proj="gated-gelu")
    return T5EncoderModel(config)


def sd3_transformer(**options):
    """SD3's layout; ``options`` override the config (SD3.5: qk_norm="rms_norm", dual_attention_layers)."""
    from diffusers import SD3Transformer2DModel

    config = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=T5_DIM, caption_projection_dim=16,
                  pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=16)
    return SD3Transformer2DModel(**{**config, **options})


def flux_transformer(guidance_embeds: bool = True):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
                                  pooled_projection_dim=TEXT_DIM, guidance_embeds=guidance_embeds,
                                  axes_dims_rope=(2, 2, 4))


def make_tiny_sd3(folder) -> Path:
    """An SD3-style pipeline folder: CLIP-L, CLIP-G (both with projection) and T5; joint attention; shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    folder = Path(folder)
    torch.manual_seed(0)
    tok3 = t5_tokenizer(folder / "tokenizer_3")
    pipe = StableDiffusion3Pipeline(
        transformer=sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT),
        vae=vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=text_encoder(projection=True), tokenizer=tokenizer(folder / "tokenizer"),
        text_encoder_2=text_encoder(projection=True), tokenizer_2=tokenizer(folder / "tokenizer_2"),
        text_encoder_3=t5_encoder(len(tok3)), tokenizer_3=tok3)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_tiny_flux(folder, guidance_embeds: bool = True) -> Path:
    """A Flux-style pipeline folder: CLIP (pooled) and T5; 2x2-packed latents; dynamic shift; with the guidance
    embedding of guidance-distilled Flux (dev) or without it (schnell-like)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    folder = Path(folder)
    torch.manual_seed(0)
    tok2 = t5_tokenizer(folder / "tokenizer_2")
    pipe = FluxPipeline(
        transformer=flux_transformer(guidance_embeds), scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SHIFT),
        vae=vae(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder(), tokenizer=tokenizer(folder / "tokenizer"),
        text_encoder_2=t5_encoder(len(tok2)), tokenizer_2=tok2)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _rms_norm64(self, hidden_states):
    """diffusers' RMSNorm (no NPU, float32 or float64 weights) with the mean square at the input's precision (diffusers
    takes it in float32)."""
    square = hidden_states.to(torch.promote_types(hidden_states.dtype, torch.float32)).pow(2)
    hidden_states = hidden_states * torch.rsqrt(square.mean(-1, keepdim=True) + self.eps)
    if self.weight is None:
        return hidden_states
    hidden_states = hidden_states * self.weight
    return hidden_states if self.bias is None else hidden_states + self.bias


def _rotary64(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
    """diffusers' apply_rotary_emb on Flux's path (real cos / sin, interleaved pairs) in x's dtype (diffusers rotates
    x.float())."""
    if not use_real or use_real_unbind_dim != -1:
        raise NotImplementedError("only Flux's rotary layout (use_real, interleaved pairs) is rerouted")
    cos, sin = freqs_cis
    shape = (1, -1, 1, cos.shape[-1]) if sequence_dim == 1 else (1, 1, -1, cos.shape[-1])
    cos, sin = cos.to(x).reshape(shape), sin.to(x).reshape(shape)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return x * cos + torch.stack([-imag, real], dim=-1).flatten(3) * sin


def float64_throughout(monkeypatch):
    """A float64 SD3 / Flux transformer computes three pieces in float32 whatever its dtype (the sinusoidal timestep
    embedding, diffusers' RMSNorm's mean square (SD3.5's q/k norm), Flux's rotary embedding of q and k): route them
    through the same math at the input's precision, so finite differences can be taken at float64 accuracy. Flux's
    q/k norms are torch.nn.RMSNorm and need nothing."""
    import diffusers.models.embeddings
    import diffusers.models.normalization
    import diffusers.models.transformers.transformer_flux

    monkeypatch.setattr(diffusers.models.embeddings, "get_timestep_embedding", sinusoids)
    monkeypatch.setattr(diffusers.models.normalization.RMSNorm, "forward", _rms_norm64)
    # FluxAttnProcessor's name and the one onestep.kernels' processor imports when it runs
    monkeypatch.setattr(diffusers.models.transformers.transformer_flux, "apply_rotary_emb", _rotary64)
    monkeypatch.setattr(diffusers.models.embeddings, "apply_rotary_emb", _rotary64)
