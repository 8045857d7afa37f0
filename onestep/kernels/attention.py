"""Attention with an O(N)-memory forward-mode JVP (for sCM / rCM) and O(N)-memory backward.

``attention(q, k, v, mask=None, scale=None, backend="auto")`` computes
``softmax(q k^T * scale + mask) v`` for q (B, H, N, d), k/v (B, H, M, d).  It is a
``torch.autograd.Function`` with new-style ``forward`` / ``setup_context`` / ``backward`` / ``jvp``
and a custom ``vmap`` rule, so all of these work without ever materialising the N x M matrix:

* ``torch.func.jvp`` and ``torch.autograd.forward_ad`` (dual tensors) -> the fused one-pass
  forward+JVP (Triton kernel on CUDA, blockwise PyTorch elsewhere);
* ``loss.backward()``, ``torch.autograd.grad`` and ``torch.func.grad`` / ``vjp`` -> blockwise /
  flash-attention backward recomputing P from the saved logsumexp;
* ``torch.func.vmap`` -> the vmapped dimension is folded into the batch dimension (this works for
  all backends, including Triton, unlike ``generate_vmap_rule=True`` which would need every op of
  the forward to be vmappable and is therefore not used).

Limitations (documented, checked):

* the mask is a constant: a mask that requires grad raises a ValueError, and a mask tangent under
  forward-mode AD raises NotImplementedError (a zero mask tangent, which ``torch.func.jvp``
  passes for constant inputs, is accepted);
* the JVP output O' is not itself differentiable in reverse mode (``backward`` of ``jvp``):
  sCM/rCM use the JVP under a stop-gradient, which is what this supports.  Use ``backend="math"``
  if you need higher-order derivatives;
* fully masked query rows give O = 0 (PyTorch's SDPA gives NaN).

Cost note: under forward-mode AD PyTorch first runs ``forward`` (O, LSE) and then ``jvp``; the jvp
rule runs the fused kernel, which recomputes O on the way (16 N^2 d FLOPs in total instead of the
12 N^2 d of the fused kernel alone).  ``fused_forward_jvp(...)`` calls the fused pass directly.
"""
from __future__ import annotations

import math
import os

import torch

from . import blockwise as _bw

BACKENDS = ("auto", "triton", "blockwise", "math")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# backend helpers
# ---------------------------------------------------------------------------------------------
def _triton_module():
    from . import triton_jvp  # lazy: importing triton kernels must not break CPU-only imports

    return triton_jvp


def _interpret_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True if the Triton kernels can run here (CUDA GPU present, or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or _interpret_on()


def _triton_head_dim_ok(d: int) -> bool:
    return 1 <= d <= 128 and (d & (d - 1)) == 0


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if (
            q.is_cuda
            and q.dtype in _TRITON_DTYPES
            and _triton_head_dim_ok(q.shape[-1])
            and triton_available()
        ):
            return "triton"
        return "blockwise"
    if backend == "triton":
        if q.dtype not in _TRITON_DTYPES:
            raise ValueError(
                f"attention(backend='triton'): dtype {q.dtype} not supported; expected one of "
                f"{_TRITON_DTYPES} (use backend='blockwise' for float64)"
            )
        if not _triton_head_dim_ok(q.shape[-1]):
            raise ValueError(
                f"attention(backend='triton'): head dim d={q.shape[-1]} not supported; expected a "
                f"power of two <= 128 (use backend='blockwise')"
            )
        if not q.is_cuda and not _interpret_on():
            raise ValueError(
                "attention(backend='triton') got CPU tensors but TRITON_INTERPRET is not set: set the "
                "environment variable TRITON_INTERPRET=1 *before* importing onestep.kernels (to run "
                "the Triton kernels in the interpreter), move the tensors to a CUDA device, or use "
                "backend='blockwise'"
            )
    return backend


def _impl_forward(backend, q, k, v, mask, scale, qd=None, kd=None, vd=None):
    if backend == "triton":
        tj = _triton_module()
        with torch.no_grad():  # see the note on the custom ops in triton_jvp.py
            if qd is None and kd is None and vd is None:
                o, lse = tj.op_fwd(q, k, v, mask, scale)
                return o, lse, None, None
            qd = torch.zeros_like(q) if qd is None else qd
            kd = torch.zeros_like(k) if kd is None else kd
            vd = torch.zeros_like(v) if vd is None else vd
            return tj.op_fwd_jvp(q, k, v, mask, scale, qd, kd, vd)
    return _bw.blockwise_forward(q, k, v, mask, scale, qd, kd, vd)


def _impl_backward(backend, q, k, v, mask, scale, o, lse, do, dlse):
    if backend == "triton":
        if do is None:
            do = torch.zeros_like(o)
        with torch.no_grad():  # see the note on the custom ops in triton_jvp.py
            return _triton_module().op_bwd(q, k, v, mask, scale, o, lse, do, dlse)
    return _bw.blockwise_backward(q, k, v, mask, scale, o, lse, do, dlse)


# ---------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------
class JVPAttentionFunction(torch.autograd.Function):
    """(q, k, v, mask, scale, backend) -> (O, LSE).  Backend is "triton" or "blockwise"."""

    @staticmethod
    def forward(q, k, v, mask, scale, backend):
        o, lse, _, _ = _impl_forward(backend, q, k, v, mask, scale)
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, scale, backend = inputs
        o, lse = output
        ctx.scale = scale
        ctx.backend = backend
        ctx.has_mask = mask is not None
        saved = (q, k, v, o, lse) + ((mask,) if mask is not None else ())
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(q, k, v, *(((mask,) if mask is not None else ())))

    @staticmethod
    def backward(ctx, do, dlse):
        saved = ctx.saved_tensors
        q, k, v, o, lse = saved[:5]
        mask = saved[5] if ctx.has_mask else None
        if do is None and dlse is None:
            return None, None, None, None, None, None
        dq, dk, dv = _impl_backward(ctx.backend, q, k, v, mask, ctx.scale, o, lse, do, dlse)
        return dq, dk, dv, None, None, None

    @staticmethod
    def jvp(ctx, q_t, k_t, v_t, mask_t, scale_t, backend_t):
        # torch.func.jvp hands a materialised zero tangent for inputs that have none
        if mask_t is not None and bool((mask_t != 0).any()):
            raise NotImplementedError(
                "attention: the mask is treated as a constant; forward-mode AD through the mask is "
                "not supported (detach the mask or use backend='math')"
            )
        saved = ctx.saved_tensors
        q, k, v = saved[:3]
        mask = saved[3] if ctx.has_mask else None
        if q_t is None and k_t is None and v_t is None:
            B, H, N, _ = q.shape
            return torch.zeros_like(q), q.new_zeros((B, H, N), dtype=_lse_dtype(q.dtype))
        _, _, o_t, lse_t = _impl_forward(ctx.backend, q, k, v, mask, ctx.scale, q_t, k_t, v_t)
        return o_t, lse_t

    @staticmethod
    def vmap(info, in_dims, q, k, v, mask, scale, backend):
        # fold the vmapped dimension into the batch dimension B
        X = info.batch_size

        def front(t, d):
            if d is None:
                return t.unsqueeze(0).expand(X, *t.shape)
            return t.movedim(d, 0)

        qx, kx, vx = front(q, in_dims[0]), front(k, in_dims[1]), front(v, in_dims[2])
        B, H, N, D = qx.shape[1:]
        M = kx.shape[3]
        qf = qx.reshape(X * B, H, N, D)
        kf = kx.reshape(X * B, H, M, kx.shape[-1])
        vf = vx.reshape(X * B, H, M, vx.shape[-1])
        mf = mask
        if mask is not None:
            if in_dims[3] is None and mask.shape[0] == 1:
                mf = mask  # broadcasts over the folded batch as it is
            else:
                mx = front(mask, in_dims[3])  # (X, b, h, n, m)
                mx = mx.expand(X, B, *mx.shape[2:])
                mf = mx.reshape(X * B, *mx.shape[2:])
        o, lse = JVPAttentionFunction.apply(qf, kf, vf, mf, scale, backend)
        return (o.reshape(X, B, H, N, o.shape[-1]), lse.reshape(X, B, H, N)), (0, 0)


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# validation + public API
# ---------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"attention: {name} must have shape (B, H, N, d), got {tuple(t.shape)} ({t.dim()} dims)"
            )
        if not t.is_floating_point():
            raise ValueError(f"attention: {name} must be a floating tensor, got dtype {t.dtype}")
    B, H, N, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(
            f"attention: k must have shape (B, H, M, d) = ({B}, {H}, M, {D}) to match q "
            f"{tuple(q.shape)}, got {tuple(k.shape)}"
        )
    M = k.shape[2]
    if v.shape[:3] != (B, H, M):
        raise ValueError(
            f"attention: v must have shape ({B}, {H}, {M}, d_v) to match q {tuple(q.shape)} and "
            f"k {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    if v.shape[3] != D:
        raise ValueError(
            f"attention: v head dim must equal q/k head dim {D}, got v of shape {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"attention: q, k, v must be on the same device, got q on {q.device}, k on {k.device}, "
            f"v on {v.device}"
        )
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"attention: mask must be a tensor or None, got {type(mask).__name__}")
        if mask.device != q.device:
            raise ValueError(f"attention: mask is on {mask.device} but q is on {q.device}")
        if mask.dim() > 4:
            raise ValueError(
                f"attention: mask must be broadcastable to (B, H, N, M) = ({B}, {H}, {N}, {M}), got "
                f"{tuple(mask.shape)}"
            )
        try:
            torch.broadcast_shapes(tuple(mask.shape), (B, H, N, M))
            ok = torch.broadcast_shapes(tuple(mask.shape), (B, H, N, M)) == (B, H, N, M)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"attention: mask must be broadcastable to (B, H, N, M) = ({B}, {H}, {N}, {M}), got "
                f"{tuple(mask.shape)}"
            )
        if mask.requires_grad:
            raise ValueError(
                "attention: mask requires grad, but the mask is treated as a constant; pass "
                "mask.detach() (or use backend='math' for gradients w.r.t. the mask)"
            )


def _prepare_mask(mask, q):
    if mask is None:
        return None
    if mask.dtype == torch.bool:  # SDPA convention: True = attend
        m = torch.zeros(mask.shape, dtype=_lse_dtype(q.dtype), device=mask.device)
        mask = m.masked_fill(~mask, -math.inf)
    elif q.dtype == torch.float64:
        mask = mask.to(torch.float64)
    else:
        mask = mask.to(torch.float32)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def math_attention(q, k, v, mask=None, scale=None):
    """Reference attention with plain torch ops (materialises the N x M matrix).

    Every autograd mode (reverse, forward, higher order, vmap) works through it by construction.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.to(s.dtype)
    p = torch.softmax(s, dim=-1)
    return p @ v


def attention(q, k, v, mask=None, scale=None, backend: str = "auto"):
    """softmax(q k^T * scale + mask) v with an O(N)-memory JVP and backward.

    Args:
        q: (B, H, N, d) queries; k, v: (B, H, M, d) keys / values (M may differ from N).
        mask: None, or an additive float mask broadcastable to (B, H, N, M) (e.g. (1, 1, N, M),
            (B, 1, 1, M)); a bool mask follows the SDPA convention (True = attend).  Constant.
        scale: softmax scale, default 1/sqrt(d).
        backend: "auto" (Triton on CUDA tensors with d a power of two <= 128, blockwise
            otherwise), "triton" (CUDA, or CPU with TRITON_INTERPRET=1), "blockwise" (pure PyTorch
            fallback, any device) or "math" (plain torch reference, O(N*M) memory).

    Returns:
        (B, H, N, d) tensor, same dtype as q.
    """
    _check_inputs(q, k, v, mask)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scale = float(scale)
    be = _resolve_backend(backend, q)
    mask = _prepare_mask(mask, q)
    if be == "math":
        return math_attention(q, k, v, mask, scale)
    o, _ = JVPAttentionFunction.apply(q, k, v, mask, scale, be)
    return o


def attention_with_lse(q, k, v, mask=None, scale=None, backend: str = "auto"):
    """Like :func:`attention` but also returns the row logsumexp (B, H, N) (differentiable)."""
    _check_inputs(q, k, v, mask)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    be = _resolve_backend(backend, q)
    mask = _prepare_mask(mask, q)
    if be == "math":
        s = (q @ k.transpose(-1, -2)) * float(scale)
        if mask is not None:
            s = s + mask.to(s.dtype)
        return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)
    return JVPAttentionFunction.apply(q, k, v, mask, float(scale), be)


@torch.no_grad()
def fused_forward_jvp(q, k, v, q_dot, k_dot, v_dot, mask=None, scale=None, backend: str = "auto"):
    """One fused pass returning (O, O'), without autograd bookkeeping (no graph is recorded).

    This is what the ``jvp`` rule runs; exposed for benchmarks and for callers that want the
    primal and tangent from a single kernel launch.
    """
    _check_inputs(q, k, v, mask)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    be = _resolve_backend(backend, q)
    mask = _prepare_mask(mask, q)
    if be == "math":
        return torch.func.jvp(
            lambda a, b, c: math_attention(a, b, c, mask, float(scale)), (q, k, v), (q_dot, k_dot, v_dot)
        )
    o, _, o_dot, _ = _impl_forward(be, q, k, v, mask, float(scale), q_dot, k_dot, v_dot)
    return o, o_dot
