"""Attention kernels with an O(N)-memory Jacobian-vector product (issue 6).

Public API:

* :func:`attention` -- ``softmax(q k^T * scale + mask) v`` as a ``torch.autograd.Function`` that
  supports ``torch.func.jvp`` / ``torch.autograd.forward_ad`` (fused one-pass forward+JVP),
  ordinary backward, ``torch.func.grad`` and ``torch.func.vmap``; backends "auto", "triton",
  "blockwise", "math".
* :class:`JVPFlashAttnProcessor`, :func:`set_jvp_attention`, :func:`make_jvp_safe` -- route a
  diffusers model's attention through :func:`attention`.
* :func:`triton_available` -- whether the Triton kernels can run here.

The Triton module is imported lazily (only when the "triton" backend is actually used), so
importing this package works on machines without a GPU driver.
"""
from .attention import (
    BACKENDS,
    JVPAttentionFunction,
    attention,
    attention_with_lse,
    fused_forward_jvp,
    math_attention,
    triton_available,
)
from .diffusers_processor import JVPFlashAttnProcessor, make_jvp_safe, set_jvp_attention

__all__ = [
    "BACKENDS",
    "JVPAttentionFunction",
    "JVPFlashAttnProcessor",
    "attention",
    "attention_with_lse",
    "fused_forward_jvp",
    "make_jvp_safe",
    "math_attention",
    "set_jvp_attention",
    "triton_available",
]
