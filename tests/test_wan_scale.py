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
    t = torch.tensor(sigma)
    close(guided(parts.denoiser, 2.0)(x, t, cond), guided(plain.denoiser, 2.0)(x, t, cond))
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


# --- video roles at scale: LoRA + gradient checkpointing + a bf16 frozen base; FSDP2 --------------------------------

def _onestep(*args, cwd):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "onestep.cli", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _args(folder, prompts, *extra):
    return ["experiment=wan22_dmd2", f"teacher.path={folder}", f"data.path={prompts}", "trainer.batch_size=2",
            "trainer.progress=false", "trainer.log_every=1", "eval.num_samples=2", "eval.teacher_steps=[2]",
            "trainer.sample_every=0", f"teacher.resolution={RESOLUTION}", f"teacher.num_frames={NUM_FRAMES}",
            f"teacher.max_sequence_length={T5_TOKENS}", "objective.ttur=1", *extra]


def _stats(run):
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lora_checkpointing_bf16_trains_and_resumes(folder, tmp_path):
    """3 DMD2 steps on the two-expert folder (teacher.guidance_2 = 3 from the experiment) with LoRA-4 generator
    and critic, gradient checkpointing and a bf16 frozen base: finite losses, a checkpoint; the run resumes from
    it for one more step."""
    from safetensors.torch import load_file
    from sd_fixtures import write_prompts

    from onestep import checkpoint

    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    run = tmp_path / "run"
    args = _args(folder, prompts, "generator.lora.rank=4", "critic.lora.rank=4",
                 "trainer.gradient_checkpointing=true", "trainer.frozen_dtype=bf16",
                 "trainer.cpu=true", "trainer.checkpoint_every=3", f"run_dir={run}")
    r = _onestep(*args, "trainer.steps=3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "networks: teacher bfloat16, shared base" in r.stdout and "critic: LoRA adapter" in r.stdout, r.stdout
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_00000003"]
    gen = load_file(str(checkpoint.list_checkpoints(run)[-1] / "generator.safetensors"))
    assert gen and all("lora_" in k for k in gen) and any("transformer_2" in k for k in gen)  # both experts
    r = _onestep(*args, "trainer.steps=4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = _stats(run)
    assert [s["step"] for s in stats] == [1, 2, 3, 4]
    losses = [v for s in stats for k, v in s.items() if k.endswith("loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses))), stats
    assert checkpoint.list_checkpoints(run)[-1].name == "step_00000004"


@pytest.mark.slow
@pytest.mark.xdist_group("distributed")  # as tests/test_distributed.py: one multi-process launch at a time
def test_fsdp_two_processes_equal_one(folder, tmp_path):
    """The two-expert Wan teacher (WanTransformer3DModel blocks, 5-D latents) sharded with FSDP2 over 2 gloo
    processes with full-copy generator and critic (FSDP refuses LoRA views): 2 DMD2 steps with global batch 2 give
    the losses and weights of one process (test_distributed's tolerance). Each rank's one row meets one expert,
    so the ranks run different experts: the sharded blocks of the other must still be gathered on every rank.
    (2 steps: from the third on, Adam's normalised update of near-zero gradients turns float32 reduction-order
    differences into whole lr-sized steps on some weights, and the tiny model's losses follow them to ~1e-4.)"""
    from sd_fixtures import write_prompts
    from test_distributed import TEACHER_SHARDED, _same_training, launch

    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    args = _args(folder, prompts, "generator.lora.rank=null", "critic.lora.rank=null", "trainer.steps=2",
                 "trainer.checkpoint_every=2", "trainer.frozen_dtype=fp32")
    r = launch("torchrun", args + ["trainer.fsdp=true", f"run_dir={tmp_path}/two"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert TEACHER_SHARDED in r.stdout, r.stdout[-3000:]
    r = _onestep(*args, f"run_dir={tmp_path}/one", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_training(tmp_path / "one", tmp_path / "two", 2)
