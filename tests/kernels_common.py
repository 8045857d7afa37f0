"""Shared helpers for the kernel tests (tests/test_kernels.py and tests/kernels_interpret_cases.py).

Not collected by pytest itself (no ``test_`` prefix).
"""
from __future__ import annotations

import math

import torch

# (B, H, N, M, d, mask kind): odd N / M (37, 70: partial blocks for block sizes 16 and 128), N != M,
# d = 32 and 64, masks of several broadcast shapes.
CASES = [
    (1, 2, 37, 37, 32, None),
    (2, 2, 70, 70, 64, "full"),  # random float mask (B, H, N, M)
    (2, 1, 37, 70, 32, "keypad"),  # (B, 1, 1, M) additive mask with -inf on padded keys
    (1, 2, 70, 37, 64, "bool"),  # (N, M) boolean mask, True = attend
]
CASE_IDS = [f"B{c[0]}H{c[1]}N{c[2]}M{c[3]}d{c[4]}-{c[5]}" for c in CASES]

TOL = 1e-5  # relative Frobenius error, fp32 vs float64 reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_mask(kind, B, H, N, M, gen):
    if kind is None:
        return None
    if kind == "full":
        return torch.randn(B, H, N, M, generator=gen, dtype=torch.float64)
    if kind == "keypad":
        m = torch.zeros(B, 1, 1, M, dtype=torch.float64)
        m[0, ..., M - 5 :] = -math.inf  # last keys of batch 0 padded
        m[-1, ..., :3] = -math.inf  # first keys of the last batch padded
        return m
    if kind == "bool":
        m = torch.rand(N, M, generator=gen) > 0.3
        m[:, 0] = True  # no fully masked row
        return m
    raise ValueError(kind)


def make_case(case, seed=0):
    B, H, N, M, d, kind = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, d, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, M, d, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, M, d, generator=gen, dtype=torch.float64)
    tq, tk, tv = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (q, k, v))
    g = torch.randn(B, H, N, d, generator=gen, dtype=torch.float64)  # cotangent for the backward
    mask = make_mask(kind, B, H, N, M, gen)
    return (q, k, v), (tq, tk, tv), g, mask


def reference(primals, tangents, g, mask):
    """float64 MATH attention: (O, O_dot, (dq, dk, dv))."""
    from onestep.kernels import math_attention

    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf)

    def f(q, k, v):
        return math_attention(q, k, v, mask)

    o, od = torch.func.jvp(f, primals, tangents)
    _, vjp = torch.func.vjp(f, *primals)
    return o, od, vjp(g)


def check_backend(case, backend, dtype=torch.float32, tol=TOL):
    """Compare O, O_dot (torch.func.jvp) and dq, dk, dv (autograd) of `backend` with the reference."""
    from onestep.kernels import attention

    primals, tangents, g, mask = make_case(case)
    o_ref, od_ref, grads_ref = reference(primals, tangents, g, mask)
    p32 = tuple(t.to(dtype) for t in primals)
    t32 = tuple(t.to(dtype) for t in tangents)
    m32 = None if mask is None else (mask if mask.dtype == torch.bool else mask.to(dtype))

    o, od = torch.func.jvp(lambda q, k, v: attention(q, k, v, m32, backend=backend), p32, t32)
    leaves = tuple(t.clone().requires_grad_(True) for t in p32)
    out = attention(*leaves, m32, backend=backend)
    out.backward(g.to(dtype))
    errs = {
        "O": rel_err(o, o_ref),
        "O_dot": rel_err(od, od_ref),
        "dq": rel_err(leaves[0].grad, grads_ref[0]),
        "dk": rel_err(leaves[1].grad, grads_ref[1]),
        "dv": rel_err(leaves[2].grad, grads_ref[2]),
        "O(no jvp)": rel_err(out, o_ref),
    }
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{backend} {case}: relative errors above {tol}: {bad} (all: {errs})"
    return errs


def check_forward_ad(case, backend, dtype=torch.float32, tol=TOL):
    import torch.autograd.forward_ad as fwAD

    from onestep.kernels import attention

    primals, tangents, g, mask = make_case(case)
    o_ref, od_ref, _ = reference(primals, tangents, g, mask)
    m = None if mask is None else (mask if mask.dtype == torch.bool else mask.to(dtype))
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p.to(dtype), t.to(dtype)) for p, t in zip(primals, tangents)]
        out = attention(*duals, m, backend=backend)
        o, od = fwAD.unpack_dual(out)
    assert rel_err(o, o_ref) <= tol
    assert rel_err(od, od_ref) <= tol, rel_err(od, od_ref)


def check_vmap(backend, dtype=torch.float32, tol=TOL):
    """vmap over an extra leading dim: of jvp, of grad, and jvp of vmap."""
    from onestep.kernels import attention, math_attention

    gen = torch.Generator().manual_seed(3)
    X, B, H, N, d = 3, 2, 2, 37, 32
    q, k, v, tq, tk, tv = (torch.randn(X, B, H, N, d, generator=gen, dtype=torch.float64) for _ in range(6))
    mask = torch.randn(B, 1, N, N, generator=gen, dtype=torch.float64)  # not vmapped

    def ours(a, b, c):
        return attention(a, b, c, mask.to(dtype), backend=backend)

    def ref(a, b, c):
        return math_attention(a, b, c, mask)

    def jvp_of(f):
        return lambda a, b, c, ta, tb, tc: torch.func.jvp(f, (a, b, c), (ta, tb, tc))

    cast = [t.to(dtype) for t in (q, k, v, tq, tk, tv)]
    o, od = torch.func.vmap(jvp_of(ours))(*cast)
    o_r, od_r = torch.func.vmap(jvp_of(ref))(q, k, v, tq, tk, tv)
    assert rel_err(o, o_r) <= tol and rel_err(od, od_r) <= tol, (rel_err(o, o_r), rel_err(od, od_r))

    o2, od2 = torch.func.jvp(torch.func.vmap(ours), tuple(cast[:3]), tuple(cast[3:]))
    assert rel_err(o2, o_r) <= tol and rel_err(od2, od_r) <= tol, (rel_err(o2, o_r), rel_err(od2, od_r))

    def loss(f):
        return lambda a, b, c: (f(a, b, c) * torch.sin(a)).sum()

    gq = torch.func.vmap(torch.func.grad(loss(ours), argnums=(0, 1, 2)))(*cast[:3])
    gq_r = torch.func.vmap(torch.func.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(gq, gq_r):
        assert rel_err(a, b) <= tol, rel_err(a, b)
