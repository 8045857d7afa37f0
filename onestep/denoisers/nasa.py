"""Negative-Away Steer Attention (NASA; Nguyen et al. 2024, "SNOOPI: Supercharged One-step Diffusion Distillation
with Proper Guidance", arXiv:2412.02687 — Sec. 4.2 of v1; Sec. 5.1-5.2, eqs. (7)-(9) of v3, "Supercharged One-step
Text-to-Image Diffusion Models with Negative Prompts", ICCV 2025). No official code is public.

A negative prompt for a one- or few-step text student, where classifier-free guidance cannot work (one pass: CFG's
output-space extrapolation blends the two images). NASA moves the guidance into every cross-attention layer l of the
network. With the layer's queries Q = Z_l W_q from the image tokens and the projections of the positive text
features c+ and the negative text features c- through the layer's own W_k, W_v:

    Z+ = softmax(Q (K+)^T / sqrt(d)) V+,    K+ = c+ W_k,  V+ = c+ W_v          (eq. 7)
    Z- = softmax(Q (K-)^T / sqrt(d)) V-,    K- = c- W_k,  V- = c- W_v          (eq. 8)
    Z_NASA = Z+ - alpha Z-                                                     (eq. 9)

per attention head, before the layer's output projection (Z is the attention output softmax(QK^T/sqrt d)V, which
the block then projects with W_o as usual). No normalization, no extra parameters, every cross-attention layer
(the paper selects none); the queries are computed once, so the cost is one more softmax(QK^T)V per layer.
alpha is the "NASA scale": ``DEFAULT_SCALE`` = 0.1 is the paper's NASA-I setting for SDv1.5-based students
(Sec. 6.1; 0.2 for SDv2.1-based, 0.5 for PixArt-alpha-based; its Fig. 7 sweeps 0 to 1.5: too large a scale lets
the negative features dominate). alpha = 0 is the plain network.

``nasa_attention(model, negative_states, scale)`` installs the processor on every diffusers cross-attention module
inside ``model`` (a Denoiser, a UNet2DConditionModel, a pipeline's ``unet``) and restores the previous processors on
exit. ``negative_states`` are the encoder hidden states the negative prompt gives (``prompt_embeds``: what the
UNet's attn2 layers read; SD1.x/2.x and SDXL feed them to attn2 unchanged), one row (broadcast to the batch) or one
per row.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from onestep.errors import ConfigError

#: SNOOPI Sec. 6.1: alpha = 0.1 for SDv1.5-based models (NASA-I, the training-free setting)
DEFAULT_SCALE = 0.1


def check_scale(scale: float, key: str = "nasa_scale") -> float:
    scale = float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise ConfigError(f"{key}={scale} must be a finite number >= 0 (NASA's alpha: 0 = no steering, SNOOPI's "
                          f"default for SD1.5 students {DEFAULT_SCALE}); pass e.g. {key}={DEFAULT_SCALE}")
    return scale


class NASAProcessor:
    """A diffusers attention processor for one cross-attention module: eqs. (7)-(9), then the module's own output
    projection, residual and rescaling (the steps diffusers' AttnProcessor2_0 takes around the attention)."""

    def __init__(self, negative_states: torch.Tensor, scale: float):
        self.negative = negative_states
        self.scale = check_scale(scale)

    def _heads(self, attn, x: torch.Tensor, batch: int, head_dim: int) -> torch.Tensor:
        return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise ConfigError("NASA is installed on a cross-attention layer that got no encoder hidden states "
                              "(text features); run the model with its prompt embeddings")
        if attention_mask is not None:
            # a text mask belongs to the positive tokens; the negative prompt would need its own
            raise ConfigError("NASA does not take an encoder attention mask (the SD1.x/2.x and SDXL UNets use "
                              "none); run the model without encoder_attention_mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        negative = self.negative.to(encoder_hidden_states.device, encoder_hidden_states.dtype)
        if negative.shape[0] not in (1, batch):
            raise ConfigError(f"NASA's negative text features have {negative.shape[0]} rows for a batch of {batch}; "
                              "give one row (shared) or one per row")
        negative = negative.expand(batch, *negative.shape[1:])
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            negative = attn.norm_encoder_hidden_states(negative)

        query = attn.to_q(hidden_states)
        head_dim = query.shape[-1] // attn.heads
        query = self._heads(attn, query, batch, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        z = []
        # eqs. (7) and (8): the same queries against the positive and the negative keys / values
        for text in (encoder_hidden_states, negative):
            key = self._heads(attn, attn.to_k(text), batch, head_dim)
            value = self._heads(attn, attn.to_v(text), batch, head_dim)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            z.append(F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False,
                                                    scale=attn.scale))
        # eq. (9): Z_NASA = Z+ - alpha Z-  (per head, before the output projection W_o)
        z_nasa = z[0] - self.scale * z[1]
        hidden_states = z_nasa.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if four_d:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every diffusers cross-attention module in ``model`` (a UNet's attn2 layers)."""
    return [(name, m) for name, m in model.named_modules()
            if getattr(m, "is_cross_attention", False) and hasattr(m, "set_processor") and hasattr(m, "processor")]


def check_nasa_model(model: nn.Module, what: str = "this model") -> list[tuple[str, nn.Module]]:
    layers = cross_attention_modules(model)
    if not layers:
        raise ConfigError(f"negative_prompt (NASA) steers cross-attention, and {what} has no cross-attention "
                          "layers; use a text student with a cross-attention UNet (teacher=sd15 or sdxl)")
    projected = [name for name, m in model.named_modules() if getattr(m, "encoder_hid_proj", None) is not None]
    if projected:
        # its attn2 layers read projected text, which the raw negative prompt embeddings are not
        raise ConfigError(f"negative_prompt (NASA): {what} projects its text features ({projected[0]}."
                          "encoder_hid_proj) before cross-attention; NASA supports UNets that read the prompt "
                          "embeddings directly (SD1.x/2.x, SDXL)")
    return layers


@contextmanager
def nasa_attention(model: nn.Module, negative_states: torch.Tensor, scale: float = DEFAULT_SCALE,
                   what: str = "this model"):
    """Every cross-attention layer of ``model`` runs NASA (eqs. 7-9) with ``negative_states`` and ``scale`` inside
    the context; the previous processors are back afterwards (also after an exception)."""
    scale = check_scale(scale)
    layers = check_nasa_model(model, what)
    if negative_states.ndim != 3:
        raise ConfigError(f"NASA's negative text features must be (rows, tokens, width), got "
                          f"{tuple(negative_states.shape)}")
    previous = [m.processor for _, m in layers]
    processor = NASAProcessor(negative_states, scale)
    try:
        for _, m in layers:
            m.set_processor(processor)
        yield processor
    finally:
        for (_, m), p in zip(layers, previous):
            m.set_processor(p)
