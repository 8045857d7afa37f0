"""Wan 2.2 A14B's second guidance scale (WanPipeline's guidance_scale_2) against the pipeline's own loop, and the
video roles at scale on the tiny Wan folders: LoRA generator and critic with gradient checkpointing on a bf16 frozen
base through the CLI (checkpoint, resume), and FSDP2 over 2 gloo processes equal to one process."""

import json

import pytest
import torch
from video_fixtures import BOUNDARY_RATIO, LATENT_SHAPE, NUM_FRAMES, RESOLUTION, T5_TOKENS, make_tiny_wan

from onestep.denoisers.base import guided
from onestep.denoisers.wan import load_wan
from onestep.sampling import sample

PROMPTS = ["a red cat", "two blue dogs!"]
#: Wan 2.2 A14B's sample_guide_scale (Wan-Video/Wan2.2 wan/configs/wan_t2v_A14B.py: (3.0, 4.0), low / high noise)
HIGH, LOW = 4.0, 3.0
#: unshifted sigmas of a 2-step run; with the folder's shift 3 the first falls above the boundary, the second below
UNIT_SIGMAS = [0.9, 0.45]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_wan(tmp_path_factory.mktemp("wan") / "wan22", two_experts=True, scheduler="euler")


def load(folder, scales=None):
    return load_wan(folder, resolution=RESOLUTION, num_frames=NUM_FRAMES, max_sequence_length=T5_TOKENS,
                    guidance_scales=scales)


def latents(n=2, seed=1):
    return torch.randn(n, *LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@torch.no_grad()
def test_the_low_noise_expert_takes_the_second_scale(folder):
    """Guided at teacher.guidance: each row at its expert's scale, as WanPipeline's loop guides it (high-noise rows
    at guidance_scale, low-noise rows at guidance_scale_2); other scales are applied as given. A teacher without
    the second scale differs on the low-noise row only, so a scale that did not arrive shows."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(folder), local_files_only=True)
    parts, plain = load(folder, (HIGH, LOW)), load(folder)
    x, sigma = latents(), [0.95, 0.4]  # one row on each side of the boundary (0.875)
    cond = parts.text.cond(PROMPTS, "blurry")
    embeds, neg = pipe.encode_prompt(PROMPTS, "blurry", device="cpu", max_sequence_length=T5_TOKENS)
    want = []
    for i, (s, net, w) in enumerate(zip(sigma, (pipe.transformer, pipe.transformer_2), (HIGH, LOW))):
        assert (s >= BOUNDARY_RATIO) == (net is pipe.transformer)
        call = dict(hidden_states=x[i:i + 1], timestep=torch.tensor([s * 1000.0]), return_dict=False)
        c, u = (net(encoder_hidden_states=e[i:i + 1], **call)[0] for e in (embeds, neg))
        want.append(u + w * (c - u))
    ours = guided(parts.denoiser, HIGH)(x, torch.tensor(sigma), cond)
    close(ours, torch.cat(want))
    one_scale = guided(plain.denoiser, HIGH)(x, torch.tensor(sigma), cond)
    close(one_scale[0], ours[0])
    assert (one_scale[1] - ours[1]).abs().max() > 1e-3
    # an objective's own scale (here 2, and per-row scales) guides both experts as given
    close(guided(parts.denoiser, 2.0)(x, torch.tensor(sigma), cond), guided(plain.denoiser, 2.0)(x, torch.tensor(sigma), cond))
    per_row = torch.tensor([HIGH, HIGH])
    close(guided(parts.denoiser, per_row)(x, torch.tensor(sigma), cond), one_scale)


@torch.no_grad()
def test_pipeline_loop_with_two_scales_equals_sample(folder):
    """WanPipeline's 2 Euler steps at guidance_scale 4, guidance_scale_2 3 (one step per expert) equal onestep's
    sampler on the teacher guided at 4 with teacher.guidance_2 = 3, decoded video included."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    parts = load(folder, (HIGH, LOW))
    set_timesteps = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda n, device=None: set_timesteps(sigmas=UNIT_SIGMAS, device=device)
    ts = parts.denoiser.schedule.shifted(torch.tensor(UNIT_SIGMAS, dtype=torch.float64))
    assert ts[0] >= BOUNDARY_RATIO > ts[1]
    z = latents(seed=5)
    out = pipe(PROMPTS, negative_prompt="blurry", num_inference_steps=2, latents=z * ts.float()[0],
               height=RESOLUTION, width=RESOLUTION, num_frames=NUM_FRAMES, guidance_scale=HIGH,
               guidance_scale_2=LOW, output_type="pt", max_sequence_length=T5_TOKENS).frames
    x = sample(parts.denoiser, z, ts, parts.text.cond(PROMPTS, "blurry"), method="euler", guidance=HIGH)
    video = (parts.codec.decode(x) / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    close(video, out)
