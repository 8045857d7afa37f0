"""Triton kernel cases, run by tests/test_kernels.py::test_triton_kernels_under_interpreter in a
subprocess with TRITON_INTERPRET=1 (the variable must be set before the Triton kernels are defined,
so these cases cannot share a process with the other tests).  Run by hand with:

    TRITON_INTERPRET=1 python -m pytest tests/kernels_interpret_cases.py

fp32 only (bf16 tl.dot is not supported by the CPU interpreter).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (run through tests/test_kernels.py)", allow_module_level=True)

torch.set_num_threads(1)  # own process; tiny shapes
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels_common as kc  # noqa: E402


@pytest.mark.parametrize("case", kc.CASES, ids=kc.CASE_IDS)
def test_triton_matches_reference(case):
    kc.check_backend(case, "triton")


def test_triton_forward_ad():
    kc.check_forward_ad(kc.CASES[2], "triton")


def test_triton_vmap_and_func_grad():
    kc.check_vmap("triton")


def test_triton_small_head_dim_and_fused_entry():
    from onestep.kernels import fused_forward_jvp, math_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v, tq, tk, tv = (torch.randn(2, 2, 19, 8, generator=gen, dtype=torch.float64) for _ in range(6))
    o_r, od_r = torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv))
    o, od = fused_forward_jvp(*(t.float() for t in (q, k, v, tq, tk, tv)), backend="triton")
    assert kc.rel_err(o, o_r) <= kc.TOL and kc.rel_err(od, od_r) <= kc.TOL


@pytest.mark.parametrize("name", ["unet2d", "transformer_block"])
def test_triton_processor_model_jvp(name):
    import kernels_models as km

    km.check_model(name, "triton", dtype=torch.float32, tol=1e-5)
