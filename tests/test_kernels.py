"""Tests for onestep.kernels (issue 6): O(N)-memory attention with a fused forward-mode JVP.

* blockwise PyTorch fallback vs a float64 MATH reference (O, O', dq, dk, dv; rel. error <= 1e-5 in
  fp32), forward_ad, vmap, func.grad, LSE, masks, errors;
* JVPFlashAttnProcessor in tiny diffusers models (UNet2DModel, UNet2DConditionModel,
  BasicTransformerBlock, SD3Transformer2DModel, FluxTransformer2DModel) vs stock processors on
  MATH SDPA, under torch.func.jvp of the whole model;
* peak-memory ratio blockwise vs MATH + jvp (fresh subprocess per measurement);
* the Triton kernels under TRITON_INTERPRET=1: tests/kernels_interpret_cases.py is run in a
  subprocess with the variable set (it must be set before triton kernels are defined).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels_common as kc  # noqa: E402

import onestep.kernels as ok  # noqa: E402
from onestep.kernels import attention, attention_with_lse, math_attention  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small shapes: one intra-op thread is faster and avoids OpenMP spinning on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def small_blocks(monkeypatch):
    """Key blocks of 16 and query blocks of 16 so that N, M = 37, 70 span several blocks incl. a partial last one."""
    import onestep.kernels.blockwise as bw

    monkeypatch.setattr(bw, "DEFAULT_BLOCK", 16)
    monkeypatch.setattr(bw, "DEFAULT_QUERY_BLOCK", 16)


# --------------------------------------------------------------------------------------------
# blockwise fallback vs float64 reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", kc.CASES, ids=kc.CASE_IDS)
def test_blockwise_matches_reference(case, small_blocks):
    kc.check_backend(case, "blockwise")


def test_blockwise_default_block_size():
    # default 128-wide key blocks, M = 300 -> 3 blocks (last partial)
    kc.check_backend((1, 2, 45, 300, 64, "full"), "blockwise")


def test_blockwise_forward_ad(small_blocks):
    kc.check_forward_ad(kc.CASES[1], "blockwise")
    kc.check_forward_ad(kc.CASES[2], "blockwise")


def test_blockwise_vmap_and_func_grad(small_blocks):
    kc.check_vmap("blockwise")


def test_func_grad_and_partial_tangents(small_blocks):
    (q, k, v), (tq, tk, tv), g, mask = kc.make_case(kc.CASES[1])
    f32 = [t.float() for t in (q, k, v)]
    m32 = mask.float()

    def loss(f, m):
        return lambda a, b, c: (f(a, b, c, m) * torch.cos(a)).sum()

    ours = torch.func.grad(loss(lambda a, b, c, m: attention(a, b, c, m, backend="blockwise"), m32), argnums=(0, 1, 2))(*f32)
    ref = torch.func.grad(loss(math_attention, mask), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        assert kc.rel_err(a, b) <= kc.TOL
    # tangent only in v (q, k constant): jvp w.r.t. v alone
    _, od = torch.func.jvp(lambda c: attention(f32[0], f32[1], c, m32, backend="blockwise"), (f32[2],), (tv.float(),))
    _, od_r = torch.func.jvp(lambda c: math_attention(q, k, c, mask), (v,), (tv,))
    assert kc.rel_err(od, od_r) <= kc.TOL
    # tangent only in k
    _, od = torch.func.jvp(lambda b: attention(f32[0], b, f32[2], m32, backend="blockwise"), (f32[1],), (tk.float(),))
    _, od_r = torch.func.jvp(lambda b: math_attention(q, b, v, mask), (k,), (tk,))
    assert kc.rel_err(od, od_r) <= kc.TOL


def test_lse_value_tangent_and_grad(small_blocks):
    (q, k, v), (tq, tk, tv), g, mask = kc.make_case(kc.CASES[1])
    scale = 0.3

    def ref(a, b, c):
        s = (a @ b.transpose(-1, -2)) * scale + mask
        return torch.logsumexp(s, -1)

    def ours(a, b, c):
        return attention_with_lse(a, b, c, mask.float(), scale=scale, backend="blockwise")[1]

    f32 = tuple(t.float() for t in (q, k, v))
    lse, lse_dot = torch.func.jvp(ours, f32, tuple(t.float() for t in (tq, tk, tv)))
    lse_r, lse_dot_r = torch.func.jvp(ref, (q, k, v), (tq, tk, tv))
    assert kc.rel_err(lse, lse_r) <= kc.TOL and kc.rel_err(lse_dot, lse_dot_r) <= kc.TOL
    w = torch.randn(lse.shape, dtype=torch.float64)
    gq = torch.func.grad(lambda a, b, c: (ours(a, b, c) * w.float()).sum(), argnums=(0, 1))(*f32)
    gq_r = torch.func.grad(lambda a, b, c: (ref(a, b, c) * w).sum(), argnums=(0, 1))(q, k, v)
    for a, b in zip(gq, gq_r):
        assert kc.rel_err(a, b) <= kc.TOL


def test_fully_masked_row_gives_zero_not_nan(small_blocks):
    q, k, v, tq, tk, tv = (torch.randn(1, 1, 20, 16) for _ in range(6))
    mask = torch.zeros(1, 1, 20, 40)
    mask[..., 5, :] = -math.inf
    k2, v2, tk2, tv2 = (torch.randn(1, 1, 40, 16) for _ in range(4))
    o, od = torch.func.jvp(lambda a, b, c: attention(a, b, c, mask, backend="blockwise"), (q, k2, v2), (tq, tk2, tv2))
    assert torch.isfinite(o).all() and torch.isfinite(od).all()
    assert o[..., 5, :].abs().max() == 0 and od[..., 5, :].abs().max() == 0
    rows = [i for i in range(20) if i != 5]
    o_r, od_r = torch.func.jvp(lambda a, b, c: math_attention(a, b, c, mask), (q, k2, v2), (tq, tk2, tv2))
    assert kc.rel_err(o[..., rows, :], o_r[..., rows, :]) <= kc.TOL
    assert kc.rel_err(od[..., rows, :], od_r[..., rows, :]) <= kc.TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blockwise_half_precision_inputs(dtype, small_blocks):
    (q, k, v), (tq, tk, tv), g, mask = kc.make_case(kc.CASES[2])
    o_r, od_r, _ = kc.reference((q, k, v), (tq, tk, tv), g, mask)
    c = lambda t: t.to(dtype)  # noqa: E731
    o, od = torch.func.jvp(lambda a, b, x: attention(a, b, x, mask, backend="blockwise"), tuple(map(c, (q, k, v))), tuple(map(c, (tq, tk, tv))))
    assert o.dtype == dtype and od.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert kc.rel_err(o, o_r) <= tol and kc.rel_err(od, od_r) <= tol


def test_math_backend_and_auto(small_blocks):
    (q, k, v), (tq, tk, tv), g, mask = kc.make_case(kc.CASES[0])
    o_r, od_r, _ = kc.reference((q, k, v), (tq, tk, tv), g, mask)
    for be in ("math", "auto"):  # auto on CPU -> blockwise (handles float64 too)
        o, od = torch.func.jvp(lambda a, b, c: attention(a, b, c, backend=be), (q, k, v), (tq, tk, tv))
        assert kc.rel_err(o, o_r) <= 1e-12 and kc.rel_err(od, od_r) <= 1e-12, be


# --------------------------------------------------------------------------------------------
# errors and import behaviour
# --------------------------------------------------------------------------------------------
def test_input_validation_errors():
    q = torch.randn(2, 3, 10, 16)
    k = torch.randn(2, 3, 12, 16)
    v = torch.randn(2, 3, 12, 16)
    with pytest.raises(ValueError, match=r"q must have shape \(B, H, N, d\), got \(3, 10, 16\)"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"k must have shape .* got \(2, 3, 12, 8\)"):
        attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match=r"v must have shape \(2, 3, 12, d_v\).* got \(2, 3, 11, 16\)"):
        attention(q, k, v[:, :, :11])
    with pytest.raises(ValueError, match="dtypes differ"):
        attention(q, k.double(), v)
    with pytest.raises(ValueError, match="same device"):
        attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match=r"mask must be broadcastable to \(B, H, N, M\) = \(2, 3, 10, 12\), got \(10, 11\)"):
        attention(q, k, v, mask=torch.zeros(10, 11))
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="requires grad"):
        attention(q, k, v, mask=torch.zeros(10, 12, requires_grad=True))
    with pytest.raises(ValueError, match="floating"):
        attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="head dim d=24 not supported"):
        attention(*(torch.randn(1, 1, 4, 24) for _ in range(3)), backend="triton")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="checks the error raised without the interpreter")
def test_triton_on_cpu_needs_interpreter():
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        attention(q, q, q, backend="triton")


def test_import_is_lazy_about_triton():
    code = (
        "import sys, onestep.kernels as ok; "
        "assert 'onestep.kernels.triton_jvp' not in sys.modules; print(ok.triton_available())"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == str(torch.cuda.is_available())


# --------------------------------------------------------------------------------------------
# diffusers processor
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["unet2d", "unet2d_condition", "transformer_block", "sd3", "flux"])
def test_processor_model_jvp_matches_math_sdpa(name, small_blocks):
    import kernels_models as km

    km.check_model(name, "blockwise", dtype=torch.float64, tol=1e-10, check_grad=(name == "unet2d_condition"))


def test_processor_model_jvp_fp32(small_blocks):
    import kernels_models as km

    km.check_model("unet2d_condition", "blockwise", dtype=torch.float32, tol=1e-5)


def test_set_jvp_attention_make_jvp_safe():
    from diffusers.models.attention import BasicTransformerBlock

    from onestep.kernels import JVPFlashAttnProcessor, make_jvp_safe, set_jvp_attention

    blk = BasicTransformerBlock(dim=16, num_attention_heads=2, attention_head_dim=8)
    set_jvp_attention(blk, backend="blockwise")
    assert isinstance(blk.attn1.processor, JVPFlashAttnProcessor) and blk.attn1.processor.backend == "blockwise"
    gn = torch.nn.GroupNorm(2, 4)
    make_jvp_safe(gn)
    make_jvp_safe(gn)  # idempotent
    assert len(gn._forward_pre_hooks) == 1
    x = torch.randn(3, 5, 4).transpose(1, 2)  # non-contiguous (3, 4, 5)
    tx = torch.randn(3, 5, 4).transpose(1, 2)
    _, t = torch.func.jvp(gn, (x,), (tx,))
    _, t_r = torch.func.jvp(lambda a: torch.nn.functional.group_norm(a, 2, gn.weight, gn.bias), (x.contiguous(),), (tx.contiguous(),))
    assert kc.rel_err(t, t_r) <= 1e-6
    with pytest.raises(ValueError, match="backend must be one of"):
        JVPFlashAttnProcessor("nope")


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------
def test_peak_memory_blockwise_vs_math_jvp():
    """Peak allocated bytes of forward+JVP at N = 1024 (B 1, H 8, d 64, as in results/jvp_attention_cpu.md), each in a
    fresh subprocess (same run): the kernel's stays below half of ONE N x N score matrix, MATH + jvp holds five."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "tools" / "bench_kernels.py"  # the bench lives outside the library
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    MATH_NN_MATRICES, measure_cpu_point = bench.MATH_NN_MATRICES, bench.measure_cpu_point

    N, H, d = 1024, 8, 64
    m = measure_cpu_point("math_jvp", N, B=1, H=H, d=d, threads=1)
    b = measure_cpu_point("blockwise_jvp", N, B=1, H=H, d=d, threads=1)
    nn_bytes = H * N * N * 4  # one fp32 N x N attention matrix: 32 MiB
    assert m["alloc_bytes"] >= MATH_NN_MATRICES * nn_bytes, m  # the bench's prediction of MATH's peak holds
    assert b["alloc_bytes"] < nn_bytes / 2, b  # 12.6 MiB measured: O, O' and N-independent tiles
    assert m["alloc_bytes"] >= 10 * b["alloc_bytes"], (m, b)  # 12.7x measured


# --------------------------------------------------------------------------------------------
# Triton kernels in the interpreter (subprocess: TRITON_INTERPRET must be set before import)
# --------------------------------------------------------------------------------------------
def test_triton_kernels_under_interpreter():
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - triton ships with torch on Linux
        pytest.skip(f"triton not importable: {e}")
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           os.path.join(REPO, "tests", "kernels_interpret_cases.py")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    out = res.stdout[-6000:] + res.stderr[-3000:]
    assert res.returncode == 0, out
    assert " passed" in res.stdout and "skipped" not in res.stdout, out


def test_processor_feeds_contiguous_group_norm():
    """The processor owns attn.group_norm and must give it a contiguous input (the GroupNorm JVP on a
    non-contiguous tangent fails on some torch versions, e.g. the 2.11 GPU stack)."""
    import kernels_models as km

    from onestep.kernels import set_jvp_attention

    model, primals, tangents, call = km.unet2d(torch.float32)
    set_jvp_attention(model, backend="blockwise", jvp_safe_group_norm=False)
    seen = []
    for m in model.modules():
        if getattr(m, "group_norm", None) is not None and hasattr(m, "set_processor"):
            m.group_norm.register_forward_pre_hook(lambda mod, a: seen.append(a[0].is_contiguous()))
    torch.func.jvp(lambda *a: call(model, *a), primals, tangents)
    assert seen and all(seen), seen
