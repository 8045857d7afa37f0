"""Triton flash-attention kernels with a fused forward-mode JVP.

One kernel (``_attn_fwd_jvp_kernel``) computes, in a single pass over key blocks, the attention
output O, the row logsumexp LSE and -- when tangents are given (``HAS_TANGENT``) -- the tangent
O' and LSE'.  Two standard flash-attention backward kernels (``_attn_bwd_dkdv_kernel`` and
``_attn_bwd_dq_kernel``) give the gradients of (O, LSE) w.r.t. q, k, v by recomputing the
probabilities from the saved LSE, so ordinary training through the primal works with O(N) memory.

Math (per batch b, head h; ``o`` = elementwise product; primes are tangents)::

    S  = Q K^T * scale + mask,    P = softmax(S),    O = P V
    S' = (Q' K^T + Q K'^T) * scale
    O' = P V' + (P o S') V - rowsum(P o S') o O

Online-softmax form kept per query block (all fp32 accumulators)::

    m_new = max(m, rowmax(S_j));   alpha = exp(m - m_new);   P~_j = exp(S_j - m_new)
    l   = alpha * l   + rowsum(P~_j)
    acc = alpha * acc + P~_j V_j
    A   = alpha * A   + P~_j V'_j
    B   = alpha * B   + (P~_j o S'_j) V_j
    r   = alpha * r   + rowsum(P~_j o S'_j)
    end:  O = acc / l,  LSE = m + log l,  O' = (A + B) / l - (r / l) o O,  LSE' = r / l

Backward (Delta = rowsum(dO o O) - dLSE, P_j = exp(S_j - LSE))::

    dV_j = sum_i P_ij dO_i          dP = dO V^T          dS = P o (dP - Delta)
    dK_j = scale * dS^T Q           dQ = scale * dS K

Layout: q (B, H, N, d), k/v (B, H, M, d), made contiguous by the wrappers; the additive mask is
read through its (possibly zero, i.e. broadcast) strides, so a (1, 1, N, M) or (B, 1, 1, M) mask is
never expanded in memory.  Any N, M (edges masked); d padded to the next power of two >= 16
(d itself must be a power of two <= 128).  fp16 / bf16 / fp32 inputs, fp32 accumulation; fp32 dots
use ``input_precision="ieee"`` (no TF32) so fp32 results match a float64 reference to ~1e-6.

Autotuning over a few block configurations is used only when a CUDA GPU is present and the
interpreter is off; otherwise (``TRITON_INTERPRET=1`` on CPU) one fixed small configuration is
used.  ``TRITON_INTERPRET`` is read when this module is imported (kernel decoration), so it must be
set in the environment before the first import of ``onestep.kernels.triton_jvp``.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_USE_AUTOTUNE = (not INTERPRET) and torch.cuda.is_available()

# Fixed configuration when not autotuning (interpreter / no GPU).
_FIXED_FWD = dict(BLOCK_M=16, BLOCK_N=16)
_FIXED_BWD = dict(BLOCK_M=16, BLOCK_N=16)

SUPPORTED_HEAD_DIMS = (1, 2, 4, 8, 16, 32, 64, 128)


def _fwd_configs():
    cfgs = []
    for bm, bn, w, s in [
        (128, 64, 8, 2),
        (128, 32, 8, 2),
        (64, 64, 4, 2),
        (64, 64, 4, 3),
        (64, 32, 4, 2),
        (32, 32, 4, 1),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return cfgs


def _bwd_configs():
    cfgs = []
    for bm, bn, w, s in [
        (64, 64, 4, 2),
        (64, 128, 8, 2),
        (128, 64, 8, 2),
        (32, 64, 4, 2),
        (32, 32, 4, 1),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return cfgs


def _maybe_autotune(configs_fn, key):
    def deco(fn):
        if _USE_AUTOTUNE:
            return triton.autotune(configs=configs_fn(), key=key)(fn)
        return fn

    return deco


# --------------------------------------------------------------------------------------------
# forward (+ JVP) kernel
# --------------------------------------------------------------------------------------------
@_maybe_autotune(_fwd_configs, key=["N", "M", "BLOCK_D", "HAS_MASK", "HAS_TANGENT", "IS_FP32"])
@triton.jit
def _attn_fwd_jvp_kernel(
    Q, K, V, QD, KD, VD, MASK,
    O, LSE, OD, LSED,
    sm_scale,
    N, M, D, H,
    s_mb, s_mh, s_mn, s_mm,
    HAS_MASK: tl.constexpr,
    HAS_TANGENT: tl.constexpr,
    IS_FP32: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    d_ok = offs_d < D

    q_off = bh * N * D + offs_m[:, None] * D + offs_d[None, :]
    q_msk = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off, mask=q_msk, other=0.0)
    kv_base = bh * M * D

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max m
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running normaliser l
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum P~ V
    if HAS_TANGENT:
        qd = tl.load(QD + q_off, mask=q_msk, other=0.0)
        acc_a = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # A = sum P~ V'
        acc_b = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # B = sum (P~ o S') V
        r_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # r = sum rowsum(P~ o S')

    for start_n in range(0, M, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < M
        # K^T tile (BLOCK_D, BLOCK_N) and V tile (BLOCK_N, BLOCK_D)
        kt_off = kv_base + cols[None, :] * D + offs_d[:, None]
        kt_msk = col_ok[None, :] & d_ok[:, None]
        v_off = kv_base + cols[:, None] * D + offs_d[None, :]
        v_msk = col_ok[:, None] & d_ok[None, :]
        kt = tl.load(K + kt_off, mask=kt_msk, other=0.0)
        v = tl.load(V + v_off, mask=v_msk, other=0.0)

        # S_j = Q K_j^T * scale (+ mask)
        if IS_FP32:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * sm_scale
        if HAS_MASK:
            mk_off = b * s_mb + h * s_mh + offs_m[:, None].to(tl.int64) * s_mn + cols[None, :] * s_mm
            mk = tl.load(MASK + mk_off, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            s = s + mk.to(tl.float32)
        s = tl.where(col_ok[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows that saw only -inf so far keep reference 0 (exp -> 0 instead of NaN)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)  # exp(m_old - m_new)
        p = tl.exp(s - m_safe[:, None])  # P~_j
        l_i = l_i * alpha + tl.sum(p, 1)
        if IS_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

        if HAS_TANGENT:
            kdt = tl.load(KD + kt_off, mask=kt_msk, other=0.0)
            vd = tl.load(VD + v_off, mask=v_msk, other=0.0)
            # S'_j = (Q' K_j^T + Q K'_j^T) * scale
            if IS_FP32:
                sd = tl.dot(qd, kt, input_precision="ieee") + tl.dot(q, kdt, input_precision="ieee")
            else:
                sd = tl.dot(qd, kt) + tl.dot(q, kdt)
            sd = sd * sm_scale
            ps = p * sd  # P~_j o S'_j  (0 on masked / out-of-range columns since p = 0 there)
            if IS_FP32:
                acc_a = acc_a * alpha[:, None] + tl.dot(p, vd, input_precision="ieee")  # A += P~ V'
                acc_b = acc_b * alpha[:, None] + tl.dot(ps, v, input_precision="ieee")  # B += (P~ o S') V
            else:
                acc_a = acc_a * alpha[:, None] + tl.dot(p.to(vd.dtype), vd)
                acc_b = acc_b * alpha[:, None] + tl.dot(ps.to(v.dtype), v)
            r_i = r_i * alpha + tl.sum(ps, 1)  # r += rowsum(P~ o S')
        m_i = m_new

    empty = l_i == 0.0  # fully masked rows -> O = 0, LSE = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]  # O = acc / l
    lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))  # LSE = m + log l
    tl.store(O + q_off, o.to(O.dtype.element_ty), mask=q_msk)
    row_off = bh * N + offs_m
    tl.store(LSE + row_off, lse, mask=row_ok)
    if HAS_TANGENT:
        lse_dot = r_i / l_safe  # LSE' = r / l
        od = (acc_a + acc_b) / l_safe[:, None] - lse_dot[:, None] * o  # O' = (A+B)/l - (r/l) o O
        tl.store(OD + q_off, od.to(OD.dtype.element_ty), mask=q_msk)
        tl.store(LSED + row_off, lse_dot, mask=row_ok)


# --------------------------------------------------------------------------------------------
# backward kernels
# --------------------------------------------------------------------------------------------
@_maybe_autotune(_bwd_configs, key=["N", "M", "BLOCK_D", "HAS_MASK", "IS_FP32"])
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, MASK, DO, LSE, DELTA,
    DK, DV,
    sm_scale,
    N, M, D, H,
    s_mb, s_mh, s_mn, s_mm,
    HAS_MASK: tl.constexpr,
    IS_FP32: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # one program per (key block, batch*head); loops over query blocks
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < M
    d_ok = offs_d < D

    kv_off = bh * M * D + cols[:, None] * D + offs_d[None, :]
    kv_msk = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + kv_off, mask=kv_msk, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + kv_off, mask=kv_msk, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = bh * N * D

    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m0
        row_ok = rows < N
        qt_off = q_base + rows[None, :] * D + offs_d[:, None]  # Q^T tile (BLOCK_D, BLOCK_M)
        qt_msk = row_ok[None, :] & d_ok[:, None]
        qt = tl.load(Q + qt_off, mask=qt_msk, other=0.0)
        do_off = q_base + rows[:, None] * D + offs_d[None, :]
        do_msk = row_ok[:, None] & d_ok[None, :]
        do = tl.load(DO + do_off, mask=do_msk, other=0.0)  # (BLOCK_M, BLOCK_D)
        lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)

        # S^T_j = K_j Q^T * scale (+ mask^T)   (BLOCK_N, BLOCK_M)
        if IS_FP32:
            st = tl.dot(k, qt, input_precision="ieee")
        else:
            st = tl.dot(k, qt)
        st = st * sm_scale
        if HAS_MASK:
            mk_off = b * s_mb + h * s_mh + rows[None, :].to(tl.int64) * s_mn + cols[:, None] * s_mm
            mk = tl.load(MASK + mk_off, mask=row_ok[None, :] & col_ok[:, None], other=0.0)
            st = st + mk.to(tl.float32)
        pt = tl.exp(st - lse[None, :])  # P^T = exp(S^T - LSE)
        pt = tl.where(row_ok[None, :] & col_ok[:, None], pt, 0.0)
        # dV_j += P^T dO
        if IS_FP32:
            dv += tl.dot(pt, do, input_precision="ieee")
        else:
            dv += tl.dot(pt.to(do.dtype), do)
        # dP^T = V dO^T ;  dS^T = P^T o (dP^T - Delta)
        dot_ = tl.trans(do)
        if IS_FP32:
            dpt = tl.dot(v, dot_, input_precision="ieee")
        else:
            dpt = tl.dot(v, dot_)
        dst = pt * (dpt - delta[None, :])
        # dK_j += dS^T Q  (scale applied at the end)
        q = tl.trans(qt)
        if IS_FP32:
            dk += tl.dot(dst, q, input_precision="ieee")
        else:
            dk += tl.dot(dst.to(q.dtype), q)

    dk = dk * sm_scale
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_msk)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_msk)


@_maybe_autotune(_bwd_configs, key=["N", "M", "BLOCK_D", "HAS_MASK", "IS_FP32"])
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, MASK, DO, LSE, DELTA,
    DQ,
    sm_scale,
    N, M, D, H,
    s_mb, s_mh, s_mn, s_mm,
    HAS_MASK: tl.constexpr,
    IS_FP32: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # one program per (query block, batch*head); loops over key blocks
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = offs_d < D

    q_off = bh * N * D + rows[:, None] * D + offs_d[None, :]
    q_msk = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off, mask=q_msk, other=0.0)
    do = tl.load(DO + q_off, mask=q_msk, other=0.0)
    lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_base = bh * M * D

    for start_n in range(0, M, BLOCK_N):
        cols = start_n + offs_n0
        col_ok = cols < M
        kt_off = kv_base + cols[None, :] * D + offs_d[:, None]
        kt_msk = col_ok[None, :] & d_ok[:, None]
        kt = tl.load(K + kt_off, mask=kt_msk, other=0.0)  # (BLOCK_D, BLOCK_N)
        vt = tl.load(V + kt_off, mask=kt_msk, other=0.0)
        if IS_FP32:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * sm_scale
        if HAS_MASK:
            mk_off = b * s_mb + h * s_mh + rows[:, None].to(tl.int64) * s_mn + cols[None, :] * s_mm
            mk = tl.load(MASK + mk_off, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            s = s + mk.to(tl.float32)
        p = tl.exp(s - lse[:, None])  # P = exp(S - LSE)
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        # dP = dO V^T ; dS = P o (dP - Delta) ; dQ += dS K
        if IS_FP32:
            dp = tl.dot(do, vt, input_precision="ieee")
        else:
            dp = tl.dot(do, vt)
        ds = p * (dp - delta[:, None])
        k = tl.trans(kt)
        if IS_FP32:
            dq += tl.dot(ds, k, input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)

    dq = dq * sm_scale
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=q_msk)


# --------------------------------------------------------------------------------------------
# Python wrappers
# --------------------------------------------------------------------------------------------
def _block_d(d: int) -> int:
    if d > 128 or d < 1 or (d & (d - 1)) != 0:
        raise ValueError(
            f"triton JVP attention: head dim d={d} is not supported; expected a power of two <= 128 "
            f"(one of {SUPPORTED_HEAD_DIMS}). Use backend='blockwise' for other head dims."
        )
    return max(16, d)


def _mask_args(mask: torch.Tensor | None, B: int, H: int, N: int, M: int, ref: torch.Tensor):
    if mask is None:
        return ref, (0, 0, 0, 0), False  # dummy pointer, never read (HAS_MASK=False)
    mb = mask.expand(B, H, N, M)  # a view: broadcast dims get stride 0
    return mb, tuple(mb.stride()), True


def _launch_meta(fixed: dict):
    return {} if _USE_AUTOTUNE else dict(fixed)


def triton_forward(q, k, v, mask, scale, q_dot=None, k_dot=None, v_dot=None):
    """Fused forward (+ JVP). q (B,H,N,d), k/v (B,H,M,d), mask broadcastable to (B,H,N,M) or None.

    Returns (O, LSE, O_dot, LSE_dot); O_dot / LSE_dot are None if all tangents are None.
    LSE / LSE_dot are float32 (B, H, N).
    """
    B, H, N, D = q.shape
    M = k.shape[2]
    block_d = _block_d(D)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    has_t = any(t is not None for t in (q_dot, k_dot, v_dot))
    o = torch.empty_like(q)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    if has_t:
        qd = q_dot.to(q.dtype).contiguous() if q_dot is not None else torch.zeros_like(q)
        kd = k_dot.to(k.dtype).contiguous() if k_dot is not None else torch.zeros_like(k)
        vd = v_dot.to(v.dtype).contiguous() if v_dot is not None else torch.zeros_like(v)
        od = torch.empty_like(q)
        lsed = torch.empty_like(lse)
    else:
        qd, kd, vd, od, lsed = q, k, v, o, lse  # dummies (HAS_TANGENT=False: never touched)
    mptr, mstr, has_mask = _mask_args(mask, B, H, N, M, q)
    meta = _launch_meta(_FIXED_FWD)

    def grid(META):
        return (triton.cdiv(N, META["BLOCK_M"]), B * H)

    _attn_fwd_jvp_kernel[grid](
        q, k, v, qd, kd, vd, mptr,
        o, lse, od, lsed,
        float(scale),
        N, M, D, H,
        *mstr,
        HAS_MASK=has_mask,
        HAS_TANGENT=has_t,
        IS_FP32=(q.dtype == torch.float32),
        BLOCK_D=block_d,
        **meta,
    )
    if not has_t:
        return o, lse, None, None
    return o, lse, od, lsed


def triton_backward(q, k, v, mask, scale, o, lse, do, dlse=None):
    """Gradients of (O, LSE) w.r.t. (q, k, v) with the two flash-attention backward kernels."""
    B, H, N, D = q.shape
    M = k.shape[2]
    block_d = _block_d(D)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if do is None:
        do = torch.zeros_like(q)
    do = do.to(q.dtype).contiguous()
    # Delta = rowsum(dO o O) - dLSE   (O(N) extra memory)
    delta = (do.float() * o.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    lse_k = lse.float()
    lse_k = torch.where(torch.isneginf(lse_k), torch.full_like(lse_k, math.inf), lse_k).contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    mptr, mstr, has_mask = _mask_args(mask, B, H, N, M, q)
    meta = _launch_meta(_FIXED_BWD)
    is32 = q.dtype == torch.float32

    def grid_kv(META):
        return (triton.cdiv(M, META["BLOCK_N"]), B * H)

    def grid_q(META):
        return (triton.cdiv(N, META["BLOCK_M"]), B * H)

    _attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, mptr, do, lse_k, delta, dk, dv, float(scale), N, M, D, H, *mstr,
        HAS_MASK=has_mask, IS_FP32=is32, BLOCK_D=block_d, **meta,
    )
    _attn_bwd_dq_kernel[grid_q](
        q, k, v, mptr, do, lse_k, delta, dq, float(scale), N, M, D, H, *mstr,
        HAS_MASK=has_mask, IS_FP32=is32, BLOCK_D=block_d, **meta,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# torch.library custom ops
# --------------------------------------------------------------------------------------------
# The autograd.Function in attention.py calls its jvp / backward rules with functorch-wrapped
# tensors under torch.func.jvp / torch.func.grad (and BatchedTensors under vmap(jvp(...))).  A raw
# Triton launch cannot read those, so the launches are registered as custom ops: the dispatcher
# then unwraps every functorch level before reaching the real kernel, and the vmap rules below fold
# a vmapped dimension into the batch dimension.  The callers (attention.py) invoke the ops under
# torch.no_grad(): inside the backward rule under torch.func.grad the inputs are tracked at the grad
# level, and an op without a functorch-compatible autograd formula would refuse them; no_grad makes
# the dispatcher skip the autograd layer and unwrap.  (Double backward is therefore unsupported.)
from typing import Optional  # noqa: E402

_NS = "onestep_kernels"


def _fold(X: int, B: int, t: Optional[torch.Tensor], d: Optional[int]):
    """Move the vmapped dim of ``t`` (or broadcast it) in front and fold it into dim 0 (= B)."""
    if t is None:
        return None
    if d is None:
        if t.shape[0] == 1:  # a broadcast (1, ...) mask: broadcasts over the folded batch as is
            return t
        t = t.unsqueeze(0).expand(X, *t.shape)
    else:
        t = t.movedim(d, 0)
    t = t.expand(X, B, *t.shape[2:])
    return t.reshape(X * B, *t.shape[2:])


def _batch_of(args, in_dims):
    q, d = args[0], in_dims[0]
    return q.shape[1] if d == 0 else q.shape[0] if d is None else q.movedim(d, 0).shape[1]


def _define_ops():
    ns = getattr(torch.ops, _NS)
    if hasattr(ns, "fwd"):  # module imported twice under different names: reuse the ops
        return ns.fwd, ns.fwd_jvp, ns.bwd

    @torch.library.custom_op(f"{_NS}::fwd", mutates_args=())
    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        o, lse, _, _ = triton_forward(q, k, v, mask, scale)
        return o, lse

    @fwd.register_fake
    def _(q, k, v, mask, scale):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.custom_op(f"{_NS}::fwd_jvp", mutates_args=())
    def fwd_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                scale: float, q_dot: torch.Tensor, k_dot: torch.Tensor, v_dot: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return triton_forward(q, k, v, mask, scale, q_dot, k_dot, v_dot)

    @fwd_jvp.register_fake
    def _(q, k, v, mask, scale, q_dot, k_dot, v_dot):
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        return torch.empty_like(q), lse, torch.empty_like(q), torch.empty_like(lse)

    @torch.library.custom_op(f"{_NS}::bwd", mutates_args=())
    def bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
            scale: float, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
            dlse: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return triton_backward(q, k, v, mask, scale, o, lse, do, dlse)

    @bwd.register_fake
    def _(q, k, v, mask, scale, o, lse, do, dlse):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def _vmap_generic(op, n_out):
        def rule(info, in_dims, *args):
            X = info.batch_size
            B = _batch_of(args, in_dims)
            folded = [
                _fold(X, B, a, d) if isinstance(a, torch.Tensor) else a for a, d in zip(args, in_dims)
            ]
            outs = op(*folded)
            outs = tuple(t.reshape(X, B, *t.shape[1:]) for t in outs)
            return outs, (0,) * n_out

        return rule

    fwd.register_vmap(_vmap_generic(fwd, 2))
    fwd_jvp.register_vmap(_vmap_generic(fwd_jvp, 4))
    bwd.register_vmap(_vmap_generic(bwd, 3))
    return fwd, fwd_jvp, bwd


op_fwd, op_fwd_jvp, op_bwd = _define_ops()
