"""Pure-PyTorch blockwise attention with a fused forward + JVP pass and a blockwise backward.

This is the CPU (and any-device) fallback of :mod:`onestep.kernels`.  It uses exactly the same
online-softmax math as the Triton kernel in :mod:`onestep.kernels.triton_jvp`, one key block at a
time, so no N x M tensor is ever created.  The forward (+ JVP) also takes the query rows a block at
a time: its temporaries are (B, H, query_block, block) tiles and (B, H, query_block, d) running
sums, so beyond the returned O, O' its memory does not grow with N or M (the MATH path holds
several N x M matrices).  The backward keeps all N rows per key block: O(N * block).

Notation (per batch b, head h; rows i index queries, columns j index keys)::

    S  = Q K^T * scale (+ mask)          P = softmax(S)          O = P V
    dS = (dQ K^T + Q dK^T) * scale       (the mask is a constant: no tangent)
    dO = P dV + (P o dS) V - rowsum(P o dS) o O          ("o" = elementwise product)

Here dQ, dK, dV, dS, dO denote *tangents* (forward-mode directions), written Q', K', V', S', O'
below.  In one pass over key blocks we keep, besides the running max m, the normalizer l and the
output accumulator acc, three tangent accumulators, all rescaled by the same factor
alpha = exp(m_old - m_new) whenever the running max grows::

    P~_j = exp(S_j - m_new)                      (unnormalised block probabilities)
    l    = alpha * l   + rowsum(P~_j)
    acc  = alpha * acc + P~_j V_j
    A    = alpha * A   + P~_j V'_j
    Bacc = alpha * Bacc + (P~_j o S'_j) V_j
    r    = alpha * r   + rowsum(P~_j o S'_j)

and at the end::

    O   = acc / l,     LSE = m + log(l)
    O'  = (A + Bacc) / l - (r / l) o O
    LSE' = r / l                                   (= rowsum(P o S'), the tangent of the logsumexp)

The backward (reverse mode, for ordinary training through the primal O and LSE) recomputes each
block's probabilities from the saved LSE, P_j = exp(S_j - LSE), with Delta = rowsum(dO o O) - dLSE::

    dV_j = P_j^T dO
    dP_j = dO V_j^T
    dS_j = P_j o (dP_j - Delta)
    dQ  += dS_j K_j * scale
    dK_j = dS_j^T Q * scale

Rows whose keys are all masked out (additive mask of -inf everywhere) produce O = 0, O' = 0 and
LSE = -inf instead of NaN.
"""
from __future__ import annotations

import math

import torch

DEFAULT_BLOCK = 128  # key-block size; read at call time (tests lower it to exercise many blocks)
#: query rows per pass of the forward (+ JVP): bounds its tiles at (B, H, 256, DEFAULT_BLOCK), so its memory beyond
#: the returned O, O' does not grow with N (results/jvp_attention_cpu.md); read at call time like DEFAULT_BLOCK
DEFAULT_QUERY_BLOCK = 256


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mask_block(mask: torch.Tensor | None, j0: int, j1: int, dtype: torch.dtype):
    if mask is None:
        return None
    return mask[..., j0:j1].to(dtype)


def blockwise_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    q_dot: torch.Tensor | None = None,
    k_dot: torch.Tensor | None = None,
    v_dot: torch.Tensor | None = None,
    block: int | None = None,
    query_block: int | None = None,
):
    """Online-softmax attention over key blocks, optionally with the fused JVP.

    Query rows are independent, so they are processed ``query_block`` at a time: the tiles are
    (B, H, query_block, block) and the running sums (B, H, query_block, d), whatever N and M are;
    only the returned O, O' (and LSE, LSE') grow with N.

    Args:
        q: (B, H, N, d); k, v: (B, H, M, d); mask: additive float mask broadcastable to
            (B, H, N, M) or None; tangents q_dot/k_dot/v_dot: same shapes as q/k/v, or None
            (a None tangent is a zero tangent; all None = forward only).

    Returns:
        (O, LSE, O_dot, LSE_dot): O in q's dtype, LSE (B, H, N) in the accumulation dtype
        (fp32, or fp64 for fp64 inputs); O_dot/LSE_dot are None when no tangent was given.
    """
    block = DEFAULT_BLOCK if block is None else int(block)
    query_block = DEFAULT_QUERY_BLOCK if query_block is None else int(query_block)
    acc_dt = _acc_dtype(q.dtype)
    with_tangent = any(t is not None for t in (q_dot, k_dot, v_dot))
    B, H, N, D = q.shape
    kf, vf = k.to(acc_dt), v.to(acc_dt)
    kdf = k_dot.to(acc_dt) if k_dot is not None else None
    vdf = v_dot.to(acc_dt) if v_dot is not None else None
    o = torch.empty_like(q)
    lse = q.new_empty((B, H, N), dtype=acc_dt)
    o_dot = torch.empty_like(q) if with_tangent else None
    lse_dot = torch.empty_like(lse) if with_tangent else None
    for i0 in range(0, N, query_block):
        i1 = min(i0 + query_block, N)
        qs = q[:, :, i0:i1].to(acc_dt) * scale  # fold the scale into Q (and Q') once per row block
        qds = q_dot[:, :, i0:i1].to(acc_dt) * scale if q_dot is not None else None
        mask_i = mask if mask is None or mask.shape[-2] == 1 else mask[..., i0:i1, :]
        o_i, lse[:, :, i0:i1], o_dot_i, lse_dot_i = _forward_rows(
            qs, kf, vf, mask_i, qds, kdf, vdf, with_tangent, block)
        o[:, :, i0:i1] = o_i
        if with_tangent:
            o_dot[:, :, i0:i1] = o_dot_i
            lse_dot[:, :, i0:i1] = lse_dot_i
    return o, lse, o_dot, lse_dot


def _forward_rows(qs, kf, vf, mask, qds, kdf, vdf, with_tangent: bool, block: int):
    """The one-pass online softmax (+ JVP) of the module docstring for one block of query rows.

    qs, qds: scaled Q, Q' rows (B, H, n, d) in the accumulation dtype; returns (O, LSE, O', LSE')
    of those rows in the accumulation dtype (O', LSE' None without a tangent).
    """
    B, H, N, D = qs.shape
    M = kf.shape[2]
    acc_dt = qs.dtype
    m = qs.new_full((B, H, N), -math.inf)  # running row max
    l = qs.new_zeros((B, H, N))  # running normaliser  l = sum_j exp(S_ij - m)
    acc = qs.new_zeros((B, H, N, D))  # running  sum_j P~_ij V_j
    if with_tangent:
        A = torch.zeros_like(acc)  # running  sum_j P~_ij V'_j
        Bacc = torch.zeros_like(acc)  # running  sum_j (P~ o S')_ij V_j
        r = torch.zeros_like(l)  # running  rowsum(P~ o S')

    for j0 in range(0, M, block):
        j1 = min(j0 + block, M)
        kj, vj = kf[:, :, j0:j1], vf[:, :, j0:j1]
        s = qs @ kj.transpose(-1, -2)  # S_j = Q K_j^T * scale   (B, H, n, bj)
        mj = _mask_block(mask, j0, j1, acc_dt)
        if mj is not None:
            s += mj
        m_new = torch.maximum(m, s.amax(dim=-1))
        # rows that have seen only -inf so far: use 0 as the reference so exp() gives 0, not NaN
        m_safe = torch.where(torch.isinf(m_new) & (m_new < 0), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m - m_safe)  # exp(m_old - m_new): rescales all running sums
        p = s.sub_(m_safe.unsqueeze(-1)).exp_()  # P~_j = exp(S_j - m_new)   (in place of S_j)
        a4 = alpha.unsqueeze(-1)
        l.mul_(alpha).add_(p.sum(dim=-1))  # l = alpha l + rowsum(P~_j)
        acc.mul_(a4).add_(p @ vj)  # acc = alpha acc + P~_j V_j
        if with_tangent:
            # S'_j = (Q' K_j^T + Q K'_j^T) * scale
            sd = None
            if qds is not None:
                sd = qds @ kj.transpose(-1, -2)
            if kdf is not None:
                t = qs @ kdf[:, :, j0:j1].transpose(-1, -2)
                sd = t if sd is None else sd.add_(t)
                del t
            A.mul_(a4)  # A = alpha A + P~_j V'_j
            if vdf is not None:
                A.add_(p @ vdf[:, :, j0:j1])
            Bacc.mul_(a4)  # B = alpha B + (P~_j o S'_j) V_j
            r.mul_(alpha)  # r = alpha r + rowsum(P~_j o S'_j)
            if sd is not None:
                ps = sd.mul_(p)  # P~_j o S'_j   (in place of S'_j)
                Bacc.add_(ps @ vj)
                r.add_(ps.sum(dim=-1))
                del ps, sd
        m = m_new
        del s, p

    empty = l == 0  # fully masked rows
    l_safe = torch.where(empty, torch.ones_like(l), l)
    inv_l = (1.0 / l_safe).unsqueeze(-1)
    o = acc.mul_(inv_l)  # O = acc / l
    lse = torch.where(empty, torch.full_like(m, -math.inf), m + torch.log(l_safe))
    if not with_tangent:
        return o, lse, None, None
    lse_dot = r / l_safe  # LSE' = r / l
    # O' = (A + B) / l - (r / l) o O
    o_dot = A.add_(Bacc).mul_(inv_l).sub_(lse_dot.unsqueeze(-1) * o)
    return o, lse, o_dot, lse_dot


def blockwise_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor | None,
    dlse: torch.Tensor | None = None,
    block: int | None = None,
):
    """Blockwise backward of (O, LSE) w.r.t. (q, k, v), recomputing P per key block from LSE.

    Returns (dq, dk, dv) in the dtypes of q, k, v.  Memory O(N * block).
    """
    block = DEFAULT_BLOCK if block is None else int(block)
    acc_dt = _acc_dtype(q.dtype)
    qf, kf, vf = q.to(acc_dt), k.to(acc_dt), v.to(acc_dt)
    lse_f = lse.to(acc_dt)
    # fully masked rows have LSE = -inf: use +inf so that P = exp(S - LSE) = 0 there
    lse_f = torch.where(torch.isinf(lse_f) & (lse_f < 0), torch.full_like(lse_f, math.inf), lse_f)
    if do is None:
        do_f = torch.zeros_like(qf)
        delta = torch.zeros_like(lse_f)
    else:
        do_f = do.to(acc_dt)
        delta = (do_f * o.to(acc_dt)).sum(dim=-1)  # Delta = rowsum(dO o O)
    if dlse is not None:
        delta = delta - dlse.to(acc_dt)  # dLSE enters as dS += P * dLSE
    qs = qf * scale
    dq = torch.zeros_like(qf)
    dk = torch.empty_like(kf)
    dv = torch.empty_like(vf)
    M = k.shape[2]
    for j0 in range(0, M, block):
        j1 = min(j0 + block, M)
        kj, vj = kf[:, :, j0:j1], vf[:, :, j0:j1]
        s = qs @ kj.transpose(-1, -2)
        mj = _mask_block(mask, j0, j1, acc_dt)
        if mj is not None:
            s = s + mj
        p = torch.exp(s - lse_f.unsqueeze(-1))  # P_j = exp(S_j - LSE)
        dv[:, :, j0:j1] = p.transpose(-1, -2) @ do_f  # dV_j = P_j^T dO
        dp = do_f @ vj.transpose(-1, -2)  # dP_j = dO V_j^T
        ds = p * (dp - delta.unsqueeze(-1))  # dS_j = P_j o (dP_j - Delta)
        dq += ds @ kj  # dQ += dS_j K_j   (times scale below)
        dk[:, :, j0:j1] = (ds.transpose(-1, -2) @ qf) * scale  # dK_j = dS_j^T Q * scale
        del s, p, dp, ds
    dq = dq * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
