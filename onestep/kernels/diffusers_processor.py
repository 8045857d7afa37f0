"""Diffusers attention processor routing attention through :func:`onestep.kernels.attention`.

``JVPFlashAttnProcessor`` is a drop-in replacement for diffusers' ``AttnProcessor2_0`` /
``JointAttnProcessor2_0`` / ``FluxAttnProcessor`` that calls our attention (O(N)-memory forward,
backward and forward-mode JVP) instead of ``F.scaled_dot_product_attention``, so that
``torch.func.jvp`` of a whole diffusers model (sCM / rCM) does not materialise N x N matrices.

Covered (one processor instance dispatches on the module it is attached to):

* ``diffusers.models.attention_processor.Attention`` used as plain self / cross attention --
  ``UNet2DModel`` (mid-block / AttnDownBlock attention, with ``group_norm``, ``residual_connection``,
  ``rescale_output_factor``), ``UNet2DConditionModel`` (``Transformer2DModel`` /
  ``BasicTransformerBlock`` self- and cross-attention, ``norm_cross``, ``attention_mask`` /
  ``encoder_attention_mask`` preparation), ``spatial_norm`` (VAE decoder), ``norm_q`` / ``norm_k``.
  The logic mirrors ``AttnProcessor2_0`` step by step, including its use of the SDPA default
  scale 1/sqrt(head_dim) (``attn.scale`` is ignored by ``AttnProcessor2_0`` too).
* SD3-style joint attention (``Attention`` with ``added_kv_proj_dim`` and ``context_pre_only`` set,
  i.e. ``JointTransformerBlock`` of ``SD3Transformer2DModel``), mirroring ``JointAttnProcessor2_0``
  (which, like the original, ignores ``attention_mask``).
* ``FluxAttention`` (``FluxTransformer2DModel`` double and single stream blocks), mirroring
  ``FluxAttnProcessor`` (fused or unfused projections, RMS q/k norms, rotary embeddings).
* ``WanAttention`` (``WanTransformer3DModel`` self- and cross-attention), mirroring ``WanAttnProcessor``
  (fused or unfused projections, RMS q/k norms across heads, the 3D rotary embedding of q and k, the I2V
  image context's added K/V attended separately and summed). ``attention_mask`` is passed on with SDPA's
  meaning; the processor's diffusers attention backend and context-parallel settings (``_attention_backend``,
  ``_parallel_config``) do not apply: the kernel is the backend, on one device.

Not covered (raises ``NotImplementedError`` instead of computing something different): the
``AttnAddedKVProcessor`` family (``UNet2DSimpleCrossAttn``-style added K/V without joint
attention), and IP-adapter processors.

GroupNorm and non-contiguous tangents: on the torch 2.11 GPU stack ``torch.func.jvp`` through
``F.group_norm`` was observed to fail with "view size is not compatible with input tensor's size and
stride" when the input (and thus its tangent) is a non-contiguous view.  (It does not reproduce with
torch 2.14 on CPU, so the fix below is defensive there.)  The processor owns the ``group_norm`` call
of the attention block and the ``norm_cross`` GroupNorm and feeds them a contiguous tensor.
GroupNorms elsewhere (ResNet blocks, ``Transformer2DModel.norm``, output norms) are outside the
processor: in the diffusers UNets their inputs are contiguous conv / linear outputs, but if you run
the *reference* ``AttnProcessor2_0`` under ``torch.func.jvp`` (it calls ``group_norm`` on a
transposed view) or feed non-contiguous inputs, call :func:`make_jvp_safe` (``set_jvp_attention``
does it by default), which registers a forward pre-hook making every ``nn.GroupNorm`` input
contiguous.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import BACKENDS, attention


def _is_attention_class(attn, name: str) -> bool:
    # by class name: these classes live in model files that older diffusers releases do not have
    return any(c.__name__ == name for c in type(attn).__mro__)


def _is_flux_attention(attn) -> bool:
    return _is_attention_class(attn, "FluxAttention")


def _is_wan_attention(attn) -> bool:
    return _is_attention_class(attn, "WanAttention")


#: WanAttnProcessor's text context length: an I2V cross-attention's context is the image tokens followed by this
#: many text tokens (hardcoded there as well)
WAN_TEXT_CONTEXT = 512


def _wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """WanAttnProcessor's rotary embedding of x (B, N, H, D): each pair (x1, x2) of channels (2i, 2i + 1) is rotated
    by the angle whose cos / sin sit at 2i / 2i + 1 of the (1, N, 1, D) tables. Diffusers writes the two halves into
    an empty tensor in place; stacking them computes the same numbers (in the tables' float64 before the cast back)
    with ops every autograd mode has a rule for."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def _contig_group_norm_pre_hook(module, args):
    if args and isinstance(args[0], torch.Tensor):
        return (args[0].contiguous(),) + tuple(args[1:])
    return None


def make_jvp_safe(model: nn.Module) -> nn.Module:
    """Make every ``nn.GroupNorm`` in ``model`` call ``.contiguous()`` on its input (idempotent).

    Needed for ``torch.func.jvp`` through GroupNorms that receive non-contiguous views (e.g. the
    stock diffusers ``AttnProcessor2_0``'s ``attn.group_norm(hidden_states.transpose(1, 2))``).
    Returns the model.
    """
    for m in model.modules():
        if isinstance(m, nn.GroupNorm) and not getattr(m, "_onestep_jvp_safe", False):
            m.register_forward_pre_hook(_contig_group_norm_pre_hook)
            m._onestep_jvp_safe = True
    return model


class JVPFlashAttnProcessor:
    """Diffusers attention processor using :func:`onestep.kernels.attention`.

    Args:
        backend: "auto" | "triton" | "blockwise" | "math" (see :func:`onestep.kernels.attention`).
    """

    def __init__(self, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"JVPFlashAttnProcessor: backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def __repr__(self) -> str:
        return f"JVPFlashAttnProcessor(backend={self.backend!r})"

    def _attend(self, q, k, v, mask=None):
        return attention(q, k, v, mask=mask, backend=self.backend)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        temb: torch.Tensor | None = None,
        image_rotary_emb=None,
        **kwargs,
    ):
        # The 5th positional argument is `temb` for `Attention` (AttnProcessor2_0 signature) but
        # `image_rotary_emb` for `FluxAttention` and `rotary_emb` for `WanAttention`, whose forwards pass it
        # positionally.
        rotary = _is_flux_attention(attn) or _is_wan_attention(attn)
        if args:
            if rotary:
                image_rotary_emb = args[0]
            else:
                temb = args[0]
        if _is_wan_attention(attn):
            return self._wan(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if _is_flux_attention(attn):
            return self._flux(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if getattr(attn, "add_k_proj", None) is not None:
            if getattr(attn, "context_pre_only", None) is not None:
                return self._joint(attn, hidden_states, encoder_hidden_states)
            raise NotImplementedError(
                "JVPFlashAttnProcessor: attention with added K/V projections outside SD3-style joint "
                "attention (AttnAddedKVProcessor family) is not supported"
            )
        return self._default(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    # ---- AttnProcessor2_0 ---------------------------------------------------------------------
    def _default(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # (batch * heads, 1 | N, M) -> (batch, heads, 1 | N, M)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            # contiguous: F.group_norm's forward-mode rule needs a contiguous tangent
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2).contiguous()).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            if isinstance(attn.norm_cross, nn.GroupNorm):
                encoder_hidden_states = attn.norm_cross(
                    encoder_hidden_states.transpose(1, 2).contiguous()
                ).transpose(1, 2)
            else:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        hidden_states = self._attend(query, key, value, attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    # ---- JointAttnProcessor2_0 (SD3) ----------------------------------------------------------
    def _joint(self, attn, hidden_states, encoder_hidden_states):
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ek = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ev = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)

        hidden_states = self._attend(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states

    # ---- FluxAttnProcessor --------------------------------------------------------------------
    def _flux(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            eq = ek = ev = None
            if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            eq = ek = ev = None
            if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
                eq = attn.add_q_proj(encoder_hidden_states)
                ek = attn.add_k_proj(encoder_hidden_states)
                ev = attn.add_v_proj(encoder_hidden_states)

        # (B, N, H, D) layout as in FluxAttnProcessor
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None and eq is not None:
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([eq, query], dim=1)
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        out = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states

    # ---- WanAttnProcessor ---------------------------------------------------------------------
    def _wan(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
        context_img = None
        if attn.add_k_proj is not None:
            # I2V: the image tokens precede the text tokens in the context
            n_img = encoder_hidden_states.shape[1] - WAN_TEXT_CONTEXT
            context_img = encoder_hidden_states[:, :n_img]
            encoder_hidden_states = encoder_hidden_states[:, n_img:]

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if getattr(attn, "fused_projections", False):
            if attn.is_cross_attention:
                query = attn.to_q(hidden_states)
                key, value = attn.to_kv(context).chunk(2, dim=-1)
            else:
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)

        # RMS norms across all heads, before the split into heads; (B, N, H, D) layout as in WanAttnProcessor
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rotary(query, *rotary_emb)
            key = _wan_rotary(key, *rotary_emb)

        out_img = None
        if context_img is not None:
            if getattr(attn, "fused_projections", False):
                key_img, value_img = attn.to_added_kv(context_img).chunk(2, dim=-1)
            else:
                key_img, value_img = attn.add_k_proj(context_img), attn.add_v_proj(context_img)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            out_img = self._attend(query.transpose(1, 2), key_img.transpose(1, 2), value_img.transpose(1, 2))
            out_img = out_img.transpose(1, 2).flatten(2, 3).type_as(query)

        out = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask)
        hidden_states = out.transpose(1, 2).flatten(2, 3).type_as(query)
        if out_img is not None:
            hidden_states = hidden_states + out_img

        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def _set_processor_recursive(model: nn.Module, processor) -> int:
    n = 0
    for m in model.modules():
        if hasattr(m, "set_processor") and hasattr(m, "processor"):
            m.set_processor(processor)
            n += 1
    return n


def set_jvp_attention(model: nn.Module, backend: str = "auto", jvp_safe_group_norm: bool = True) -> nn.Module:
    """Route every diffusers attention module of ``model`` through :func:`onestep.kernels.attention`.

    Uses ``model.set_attn_processor(JVPFlashAttnProcessor(backend))`` when the model has it
    (``ModelMixin`` UNets / transformers), otherwise sets the processor on every submodule with
    ``set_processor`` (e.g. a bare ``BasicTransformerBlock``).  With ``jvp_safe_group_norm`` (default)
    also applies :func:`make_jvp_safe`.  Returns the model.
    """
    proc = JVPFlashAttnProcessor(backend)
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(proc)
    else:
        if _set_processor_recursive(model, proc) == 0:
            raise ValueError(
                f"set_jvp_attention: {type(model).__name__} has no diffusers attention modules "
                f"(no set_attn_processor and no submodule with set_processor)"
            )
    if jvp_safe_group_norm:
        make_jvp_safe(model)
    return model
