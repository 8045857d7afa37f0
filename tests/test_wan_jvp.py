"""The sCM / rCM tangent through Wan's transformer (WanTransformer3DModel: q/k RMS norms across heads, a 3D rotary
embedding over (frame, row, column), cross-attention to the text) with generator.attention=jvp_flash.

As in tests/test_transformer_jvp.py, tests/video_fixtures.py's tiny random transformer behind the teacher=wan adapter
(onestep.denoisers.wan.WanDenoiser), on latents of three frames (so the rotary embedding's frame axis matters), is
checked three ways:
    (a)        forward: the transformer with onestep.kernels' processor equals the stock one (fp32, 1e-5); also with
               fused projections and in the I2V form (added K/V over an image context)
    (b)        float32: the jvp of the TrigFlow velocity with jvp_flash equals the stock model's under
               attention.jvp_attention (SDPA held to MATH)
    (c)        float64: the jvp, stock and with jvp_flash, equals a central finite difference of the stock model
"""

import copy
import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
import video_fixtures
from conftest import compose, rel_err
from sana_fixtures import sinusoids

from onestep.conditioning import Cond
from onestep.denoisers.attention import jvp_attention, set_attention
from onestep.denoisers.trigflow import as_trigflow, velocity
from onestep.denoisers.wan import WanDenoiser
from onestep.kernels import JVPFlashAttnProcessor
from onestep.schedules import RectifiedFlow

BATCH, TEXT_TOKENS, TEXT_DIM = 2, 5, video_fixtures.TEXT_DIM
#: latent (C, F, h, w): 3 frames of 8x8 latents, 2x2 patches -> 48 tokens over 3 x 4 x 4 rotary positions
LATENT = (video_fixtures.LATENT_CHANNELS, 3, 8, 8)
#: the finite-difference step (see tests/test_transformer_jvp.py)
H = 1e-7


def wan_transformer(**options):
    """video_fixtures' transformer, with ``options`` changing its config (the I2V form)."""
    from diffusers import WanTransformer3DModel

    stock = video_fixtures.wan_transformer(seed=1)
    if options:
        torch.manual_seed(1)
        config = {k: v for k, v in stock.config.items() if not k.startswith("_")}  # not diffusers' bookkeeping
        stock = WanTransformer3DModel(**{**config, **options})
    return stock.eval().requires_grad_(False)


def float64_throughout(monkeypatch):
    """Wan computes its norms, modulations and residual sums in float32 whatever its dtype (``.float()`` in
    FP32LayerNorm and the blocks), and diffusers' sinusoidal timestep embedding too: keep float64 tensors float64 so
    finite differences can be taken at float64 accuracy."""
    import diffusers.models.embeddings

    to_float32 = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float",
                        lambda x, *a, **k: x if x.dtype == torch.float64 else to_float32(x, *a, **k))
    monkeypatch.setattr(diffusers.models.embeddings, "get_timestep_embedding", sinusoids)


def with_kernel(model):
    """A copy with generator.attention=jvp_flash, checked to reach every attention module."""
    flash = set_attention(copy.deepcopy(model), "jvp_flash")
    transformer = getattr(flash, "transformer", flash)
    processors = transformer.attn_processors
    assert processors and all(isinstance(p, JVPFlashAttnProcessor) for p in processors.values())
    return flash


def build():
    """(float32 denoiser, Cond, x_t, t, dx, dt) at two TrigFlow times (float64 tensors; cast down for float32)."""
    denoiser = WanDenoiser(wan_transformer(), RectifiedFlow(shift=video_fixtures.SHIFT), LATENT)
    g = torch.Generator().manual_seed(1)
    text = torch.randn(BATCH, TEXT_TOKENS, TEXT_DIM, generator=g)
    cond = Cond({"prompt_embeds": text}, {"prompt_embeds": text[:1]})
    x = torch.randn(BATCH, *LATENT, generator=g, dtype=torch.float64)
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t, dt = torch.tensor([0.4, 1.1], dtype=torch.float64), torch.tensor([0.8, -1.1], dtype=torch.float64)
    return denoiser, cond, x, t, dx, dt


def trig_velocity(denoiser, cond):
    trig = as_trigflow(denoiser, sigma_data=0.5)
    return lambda x, t: velocity(trig, x, t, cond)


def tangent(denoiser, cond, x, t, dx, dt, math_sdpa=True):
    dtype = denoiser.transformer.dtype
    x, t, dx, dt = (a.to(dtype) for a in (x, t, dx, dt))
    with torch.no_grad(), (jvp_attention() if math_sdpa else nullcontext()):
        return torch.func.jvp(trig_velocity(denoiser, cond), (x, t), (dx, dt))[1]


def i2v_inputs(g):
    """WanAttnProcessor takes the last 512 context tokens as the text and the ones before as the image."""
    return {"encoder_hidden_states": torch.randn(BATCH, 512, TEXT_DIM, generator=g),
            "encoder_hidden_states_image": torch.randn(BATCH, 3, 8, generator=g)}


FORMS = {
    "t2v": (wan_transformer, lambda g: {"encoder_hidden_states": torch.randn(BATCH, TEXT_TOKENS, TEXT_DIM,
                                                                                  generator=g)}),
    "fused": (lambda: _fused(wan_transformer()), lambda g: {"encoder_hidden_states": torch.randn(
        BATCH, TEXT_TOKENS, TEXT_DIM, generator=g)}),
    # the image embedder projects the image context to the hidden width (2 heads x 8), which the added K/V take
    "i2v": (lambda: wan_transformer(image_dim=8, added_kv_proj_dim=16), i2v_inputs),
    "i2v_fused": (lambda: _fused(wan_transformer(image_dim=8, added_kv_proj_dim=16)), i2v_inputs),
}


def _fused(transformer):
    transformer.fuse_qkv_projections()
    attns = [m for m in transformer.modules() if type(m).__name__ == "WanAttention"]
    assert attns and all(m.fused_projections for m in attns)
    return transformer


@pytest.mark.parametrize("form", FORMS)
def test_forward_and_jvp_equal_stock(form):
    """(a) and the transformer-level jvp in the latents: jvp_flash equals the stock processors (MATH SDPA)."""
    make, inputs = FORMS[form]
    stock = make()
    g = torch.Generator().manual_seed(2)
    kwargs = {**inputs(g), "timestep": torch.tensor([300.0, 700.0]), "return_dict": False}
    x = torch.randn(BATCH, *LATENT, generator=g)
    dx = torch.randn(x.shape, generator=g)
    flash = with_kernel(stock)
    with torch.no_grad():
        out, ref = flash(x, **kwargs)[0], stock(x, **kwargs)[0]
    assert rel_err(out, ref) < 1e-5
    with torch.no_grad(), jvp_attention():
        ref_t = torch.func.jvp(lambda z: stock(z, **kwargs)[0], (x,), (dx,))[1]
    with torch.no_grad():
        out_t = torch.func.jvp(lambda z: flash(z, **kwargs)[0], (x,), (dx,))[1]
    assert rel_err(out_t, ref_t) < 1e-5


def test_jvp_flash_equals_math_sdpa():
    """(b) in float32; the kernel's jvp runs outside jvp_attention, so a missed attention module would raise."""
    denoiser, cond, x, t, dx, dt = build()
    stock = tangent(denoiser, cond, x, t, dx, dt)
    flash = tangent(with_kernel(denoiser), cond, x, t, dx, dt, math_sdpa=False)
    assert stock.dtype == torch.float32 and torch.isfinite(stock).all()
    # float32 rounding of two summation orders; observed 2e-7
    assert rel_err(flash, stock) < 1e-5


@pytest.mark.parametrize("attention", ["default", "jvp_flash"])
def test_jvp_equals_finite_differences(attention, monkeypatch):
    """(c): the float64 jvp under ``attention`` equals the stock model's central difference; the float32 jvp is the
    float64 one to float32 accuracy."""
    denoiser, cond, x, t, dx, dt = build()
    run = with_kernel if attention == "jvp_flash" else (lambda d: d)
    jvp32 = tangent(run(denoiser), cond, x, t, dx, dt)

    stock64 = copy.deepcopy(denoiser).double()
    float64_throughout(monkeypatch)
    jvp64 = tangent(run(stock64), cond, x, t, dx, dt)
    v = trig_velocity(stock64, cond)
    with torch.no_grad(), jvp_attention():
        fd = (v(x + H * dx, t + H * dt) - v(x - H * dx, t - H * dt)) / (2 * H)
    # observed 8e-10; 1e-1 without float64_throughout
    assert jvp64.dtype == torch.float64 and rel_err(jvp64, fd) < 1e-6
    # float32 timesteps near 1000 and float32 norms; observed 1e-5 to 3e-5
    assert rel_err(jvp32.double(), jvp64) < 1e-4


def test_wan_rcm_recipe():
    """configs/experiment/wan_rcm.yaml: rCM on teacher=wan with the kernel, the official Wan 2.1 1.3B values."""
    cfg = compose(["experiment=wan_rcm"])
    assert cfg.teacher.kind == "wan" and cfg.generator.attention == "jvp_flash" and cfg.objective.name == "rcm"
    want = {"sigma_data": 1.0, "p_mean": 0.7, "p_std": 1.6, "warmup_steps": 1000, "tangent_warmup": "rcm",
            "adaptive_weighting": False, "dm_weight": 0.02, "ttur": 4}
    assert {k: cfg.objective[k] for k in want} == want
    assert (cfg.trainer.generator_optim.lr, cfg.trainer.critic_optim.lr, cfg.trainer.grad_clip) == (2e-6, 4e-7, 0)


def test_rcm_losses_through_wan_with_the_kernel(tmp_path):
    """One rCM generator and critic loss (experiment=wan_rcm's objective: the sCM tangent through the Wan generator,
    the DMD term on its samples) on a tiny Wan pipeline folder behind load_wan, with random latents as the real
    videos: finite, with finite generator gradients, and the same under generator.attention=jvp_flash as under the
    stock attention."""
    from onestep.core import Batch, Nets
    from onestep.denoisers.wan import load_wan
    from onestep.generator import Student
    from onestep.objectives import make_objective

    cfg = compose(["experiment=wan_rcm", "objective.dm_after_warmup=false"])  # the DMD term at step 0 too
    parts = load_wan(video_fixtures.make_tiny_wan(tmp_path / "wan"), resolution=video_fixtures.RESOLUTION,
                     num_frames=video_fixtures.NUM_FRAMES, max_sequence_length=video_fixtures.T5_TOKENS)
    teacher = parts.denoiser
    fields, null = parts.text.encode(["a red square", "two cats"]), parts.text.encode([""])
    g = torch.Generator().manual_seed(3)
    shape = (2, *teacher.data_shape)
    batch = Batch(noise=torch.randn(shape, generator=g), cond=Cond(fields, null), real=torch.randn(shape, generator=g))
    # a fake score that differs from the teacher, as after critic updates (else the DMD gradient is 0)
    fake = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    losses = {}
    for attention in ("default", "jvp_flash"):
        generator = set_attention(copy.deepcopy(teacher), attention).requires_grad_(True)
        nets = Nets(teacher=teacher, generator=generator, critic=copy.deepcopy(fake).requires_grad_(True))
        objective = make_objective(cfg.objective, Student.from_config(teacher.schedule, cfg.generator).train_sample)
        torch.manual_seed(0)
        out = objective.generator_loss(nets, batch, step=0)
        out["loss"].backward()
        grads = [p.grad for p in generator.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(gr).all() for gr in grads)
        critic = objective.critic_loss(nets, batch, step=0)["loss"]
        losses[attention] = (out["loss"].item(), out["scm"].item(), out["dm"].item(), critic.item())
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values()) and losses["default"][2] > 0, losses
    # float32 rounding of two attention implementations; observed 5e-7
    assert losses["jvp_flash"] == pytest.approx(losses["default"], rel=1e-5), losses


@pytest.mark.slow  # ~25 s: encodes the clips, then 3 generator and 12 critic updates
def test_wan_rcm_cli(tmp_path):
    """experiment=wan_rcm through `onestep train` on the tiny Wan folder and captioned GIF clips (data=video_text):
    three steps of rCM with the JVP through jvp_flash, finite losses, a generator checkpoint."""
    from test_video_data import palette_frames, write_animated

    folder = video_fixtures.make_tiny_wan(tmp_path / "wan")
    clips = tmp_path / "clips"
    clips.mkdir()
    for i, caption in enumerate(["a red square", "a blue circle", "two cats"]):
        write_animated(clips / f"{i}.gif", palette_frames(video_fixtures.NUM_FRAMES, seed=i), caption)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = ["experiment=wan_rcm", f"teacher.path={folder}", f"data.path={clips}", f"out_root={tmp_path}",
            f"teacher.resolution={video_fixtures.RESOLUTION}", f"teacher.num_frames={video_fixtures.NUM_FRAMES}",
            f"teacher.max_sequence_length={video_fixtures.T5_TOKENS}", "trainer.frozen_dtype=fp32",
            "trainer.mixed_precision=no", "trainer.steps=3", "trainer.batch_size=2", "trainer.progress=false",
            "eval.num_samples=2", "eval.teacher_steps=[2]", "trainer.checkpoint_every=3", "trainer.sample_every=0",
            "objective.warmup_steps=1"]  # the official schedule: the DMD term joins after the tangent warm-up
    r = subprocess.run([sys.executable, "-m", "onestep.cli", "train", *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = [p for p in (tmp_path / "wan_rcm").iterdir() if p.is_dir()]
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    losses = {k: v for s in stats for k, v in s.items() if k.endswith("loss") or k.endswith("scm") or
              k.endswith("dm")}
    assert {"gen/scm", "gen/dm"} <= set(losses) and all(math.isfinite(v) for v in losses.values()), losses
    assert (run / "checkpoints" / "step_00000003" / "generator.safetensors").is_file()
