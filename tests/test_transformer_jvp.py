"""The sCM / rCM tangent through the flow transformers (SD3, SD3.5, Flux, Sana) wrapped by onestep's adapters.

What sCD / rCM differentiate (objectives/scm.py, scm_tangent) is the TrigFlow velocity of the adapter's Denoiser,
v(x_t, t) = velocity(as_trigflow(denoiser), x_t, t, cond), pushed forward along a tangent (dx, dt) by torch.func.jvp.
Each tiny random transformer (tests/flow_fixtures.py, tests/sana_fixtures.py) is checked three ways:
    (a) = (b)  float32: the jvp with generator.attention=jvp_flash (onestep.kernels' processor, its blockwise backend
               on the CPU) equals the jvp of the stock model with SDPA held to MATH (attention.jvp_attention)
    (c)        float64: the jvp, under each attention the model can run, equals a central finite difference of the
               stock model, and the float32 jvp the trainer runs agrees with it to float32 accuracy
Sana's self-attention is linear (generator.attention refuses the kernels there), so Sana has (b) and (c) only.
"""

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import flow_fixtures
import pytest
import sana_fixtures
import torch
from conftest import rel_err
from sd_fixtures import TEXT_DIM

from onestep.conditioning import Cond
from onestep.denoisers.attention import jvp_attention, set_attention
from onestep.denoisers.flow import FlowTransformerDenoiser
from onestep.denoisers.sana import SanaDenoiser
from onestep.denoisers.trigflow import as_trigflow, velocity
from onestep.kernels import JVPFlashAttnProcessor
from onestep.schedules import RectifiedFlow

BATCH, TEXT_TOKENS = 2, 5
#: the finite-difference step: the central difference's error, h^2 |v'''| / 6, is ~1e-9 of |v'| here (it falls 100x
#: per 10x in h from h = 1e-5 on), float64 rounding eps |v| / h is ~1e-9 as well, and h is far below the spacing of
#: the fastest time sinusoid (period ~0.006 in t) and of the kinks of Sana's ReLU kernels
H = 1e-7


@dataclass
class Case:
    transformer: Callable
    adapter: Callable  # (transformer) -> Denoiser
    fields: Callable  # (generator) -> conditioning fields, batch BATCH
    float64_throughout: Callable  # (denoiser, monkeypatch)


def flow_fields(pooled_dim):
    return lambda g: {"prompt_embeds": torch.randn(BATCH, TEXT_TOKENS, flow_fixtures.T5_DIM, generator=g),
                      "pooled_prompt_embeds": torch.randn(BATCH, pooled_dim, generator=g)}


def sana_fields(g):
    # the second prompt is padded: the cross-attention's key mask is exercised
    mask = torch.ones(BATCH, TEXT_TOKENS, dtype=torch.int64)
    mask[1, 3:] = 0
    return {"prompt_embeds": torch.randn(BATCH, TEXT_TOKENS, sana_fixtures.TEXT_DIM, generator=g),
            "prompt_attention_mask": mask}


def flow_adapter(kind):
    shift = flow_fixtures.SD3_SHIFT if kind == "sd3" else 1.0
    return lambda tr: FlowTransformerDenoiser(tr, RectifiedFlow(shift=shift), kind, latent_size=8)


CASES = {
    # two joint blocks, the last one context_pre_only (no text output projection)
    "sd3": Case(flow_fixtures.sd3_transformer, flow_adapter("sd3"), flow_fields(2 * TEXT_DIM),
                lambda d, mp: flow_fixtures.float64_throughout(mp)),
    # SD3.5: RMS q/k norms on both streams, and a second (image-only) self-attention in the first block
    "sd3.5": Case(lambda: flow_fixtures.sd3_transformer(qk_norm="rms_norm", dual_attention_layers=(0,)),
                  flow_adapter("sd3"), flow_fields(2 * TEXT_DIM), lambda d, mp: flow_fixtures.float64_throughout(mp)),
    # one double-stream and one single-stream block, RMS q/k norms, 3-axis rotary embedding, embedded guidance
    "flux": Case(flow_fixtures.flux_transformer, flow_adapter("flux"), flow_fields(TEXT_DIM),
                 lambda d, mp: flow_fixtures.float64_throughout(mp)),
    # linear self-attention, softmax (SDPA) cross-attention with a key mask
    "sana": Case(sana_fixtures.transformer,
                 lambda tr: SanaDenoiser(tr, RectifiedFlow(shift=sana_fixtures.FLOW_SHIFT), latent_size=8),
                 sana_fields, lambda d, mp: sana_fixtures.float64_throughout(d.transformer, mp)),
}
SOFTMAX = [name for name in CASES if name != "sana"]


def build(name):
    """(float32 Denoiser, Cond, x_t, t, dx, dt): a random transformer behind its adapter, random prompt states and
    a random tangent at two TrigFlow times (float64; cast down for float32 runs)."""
    case = CASES[name]
    torch.manual_seed(0)
    denoiser = case.adapter(case.transformer().eval().requires_grad_(False))
    g = torch.Generator().manual_seed(1)
    fields = case.fields(g)
    cond = Cond(fields, {k: v[:1] for k, v in fields.items()})
    x = torch.randn(BATCH, *denoiser.data_shape, generator=g, dtype=torch.float64)
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t, dt = torch.tensor([0.4, 1.1], dtype=torch.float64), torch.tensor([0.8, -1.1], dtype=torch.float64)
    return denoiser, cond, x, t, dx, dt


def trig_velocity(denoiser, cond):
    """v(x_t, t) as scm_tangent sees the student: the TrigFlow velocity of the adapter's denoiser."""
    trig = as_trigflow(denoiser, sigma_data=0.5)
    return lambda x, t: velocity(trig, x, t, cond)


def tangent(denoiser, cond, x, t, dx, dt, math_sdpa=True):
    dtype = denoiser.transformer.dtype
    x, t, dx, dt = (a.to(dtype) for a in (x, t, dx, dt))
    with torch.no_grad(), (jvp_attention() if math_sdpa else nullcontext()):
        return torch.func.jvp(trig_velocity(denoiser, cond), (x, t), (dx, dt))[1]


def with_kernel(denoiser):
    """A copy with generator.attention=jvp_flash, checked to reach every attention module of the transformer."""
    flash = set_attention(copy.deepcopy(denoiser), "jvp_flash")
    processors = flash.transformer.attn_processors
    assert processors and all(isinstance(p, JVPFlashAttnProcessor) for p in processors.values())
    return flash


@pytest.mark.parametrize("name", SOFTMAX)
def test_jvp_flash_equals_math_sdpa(name):
    """(a) = (b) in float32. The kernel's jvp runs outside jvp_attention: CPU SDPA's default (fused) kernels have no
    forward-AD rule, so an attention module the processor missed would raise instead of passing."""
    denoiser, cond, x, t, dx, dt = build(name)
    stock = tangent(denoiser, cond, x, t, dx, dt)
    flash = tangent(with_kernel(denoiser), cond, x, t, dx, dt, math_sdpa=False)
    assert stock.dtype == torch.float32 and torch.isfinite(stock).all()
    # float32 rounding of two different summation orders; observed <= 2e-7
    assert rel_err(flash, stock) < 1e-5


@pytest.mark.parametrize("name,attention", [(n, "default") for n in CASES] + [(n, "jvp_flash") for n in SOFTMAX])
def test_jvp_equals_finite_differences(name, attention, monkeypatch):
    """(c): the float64 jvp under ``attention`` equals the stock model's central difference (relative error <= 1e-6
    at h = H); the float32 jvp under it is the float64 one to float32 accuracy."""
    denoiser, cond, x, t, dx, dt = build(name)
    run = with_kernel if attention == "jvp_flash" else (lambda d: d)
    jvp32 = tangent(run(denoiser), cond, x, t, dx, dt)

    stock64 = copy.deepcopy(denoiser).double()
    CASES[name].float64_throughout(stock64, monkeypatch)
    jvp64 = tangent(run(stock64), cond, x, t, dx, dt)
    v = trig_velocity(stock64, cond)
    with torch.no_grad(), jvp_attention():
        fd = (v(x + H * dx, t + H * dt) - v(x - H * dx, t - H * dt)) / (2 * H)
    assert jvp64.dtype == torch.float64 and rel_err(jvp64, fd) < 1e-6
    # float32 timesteps near 1000 are 6e-5 apart: a phase error of that size on the fastest time sinusoid; observed
    # 1e-5 (SD3, Flux) to 3e-5 (Sana)
    assert rel_err(jvp32.double(), jvp64) < 1e-4
