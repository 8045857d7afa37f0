"""Text-to-image distillation end to end through the CLI, on tiny random SD1.5 / SDXL pipelines built here
(real diffusers / transformers classes, no hub): finite losses, a checkpoint, a decoded PNG grid, the
embedding cache, LoRA on the shared base, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_fixtures import make_tiny_sd15, make_tiny_sdxl, write_captioned_images, write_prompts

PROMPTS = ["a red square", "a blue circle", "a green dog", "two cats", "a house at night"]
FAST = ["trainer.steps=3", "trainer.batch_size=2", "trainer.progress=false", "eval.num_samples=4",
        "eval.teacher_steps=[2]", "trainer.checkpoint_every=2"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    images = write_captioned_images(root / "images", PROMPTS[:4], size=(20, 24), prefix="img")
    return {"sd15": make_tiny_sd15(root / "sd15"), "sdxl": make_tiny_sdxl(root / "sdxl"),
            "prompts": write_prompts(root / "prompts.txt", PROMPTS), "images": images, "root": root}


def _cli(args, cwd, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "onestep.cli", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _run_dir(out_root: Path, experiment: str) -> Path:
    (run,) = [p for p in (out_root / experiment).iterdir() if p.is_dir()]
    return run


def _check_run(run: Path, expect_lora: bool) -> dict:
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    losses = {k: v for s in stats for k, v in s.items() if k.endswith("loss")}
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    gen = load_file(str(ckpt / "generator.safetensors"))
    assert all("lora_" in k for k in gen) == expect_lora
    assert (run / "samples.png").stat().st_size > 1000
    assert "Evaluation: no metric" in (run / "results.md").read_text()
    return gen


@pytest.mark.slow
def test_sd15_dmd2_cli(pipes, tmp_path):
    r = _cli(["experiment=sd15_dmd2", f"teacher.path={pipes['sd15']}", f"data.path={pipes['prompts']}",
              f"out_root={tmp_path}", *FAST], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = _run_dir(tmp_path, "sd15_dmd2")
    _check_run(run, expect_lora=False)
    # the prompt embeddings were cached once per prompt, keyed by encoder and prompt content
    cached = list((tmp_path / "cache" / "text").rglob("*.safetensors"))
    assert len(cached) == len(PROMPTS)
    assert "networks: teacher bfloat16" in r.stdout and "generator: full copy" in r.stdout
    # rerunning the same command resumes: nothing re-encoded, no new steps
    mtimes = {p: p.stat().st_mtime_ns for p in cached}
    r2 = _cli(["experiment=sd15_dmd2", f"teacher.path={pipes['sd15']}", f"data.path={pipes['prompts']}",
               f"out_root={tmp_path}", *FAST], tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in cached} == mtimes


@pytest.mark.slow
def test_sdxl_dmd2_4step_lora_gan_cli(pipes, tmp_path):
    """SDXL: both text encoders, pooled embeddings and size ids; 4-step backward simulation; LoRA generator and
    critic on one base; the GAN head reads real (VAE-encoded, cached) captioned images."""
    r = _cli(["experiment=sdxl_dmd2_4step", f"teacher.path={pipes['sdxl']}", f"data.path={pipes['images']}",
              f"out_root={tmp_path}", *FAST], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    gen = _check_run(_run_dir(tmp_path, "sdxl_dmd2_4step"), expect_lora=True)
    assert any(v.abs().sum() > 0 for k, v in gen.items() if "lora_B" in k)  # the adapter trained
    assert list((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert "LoRA adapter 'generator'" in r.stdout and "shared base" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("experiment, data", [("sd15_sid_lsg", "prompts"), ("sd21_vsd", "prompts"),
                                              ("sd15_lcm_lora", "images"), ("sd15_guidance_distill_lora", "images"),
                                              ("sd15_hipa", "prompts")])
def test_other_sd_experiments_cli(pipes, tmp_path, experiment, data):
    r = _cli([f"experiment={experiment}", f"teacher.path={pipes['sd15']}", f"data.path={pipes[data]}",
              f"out_root={tmp_path}", *FAST], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_run(_run_dir(tmp_path, experiment),
               expect_lora=experiment in ("sd15_lcm_lora", "sd15_guidance_distill_lora", "sd15_hipa"))


@pytest.mark.parametrize("args, words", [
    (["teacher.path=null"], "teacher.path is not set"),
    (["teacher.path=/nonexistent/sd"], "/nonexistent/sd"),
    (["teacher.path={root}"], "model_index.json"),
    (["teacher.path={sd15_noxattn}"], "cross-attention"),
    (["data.path={empty}"], "holds no prompts"),
    (["generator.lora.rank=0"], "generator.lora.rank=0"),
    (["teacher.resolution=13"], "teacher.resolution=13"),  # not a multiple of the VAE's downsampling
])
def test_bad_input_is_one_line(pipes, tmp_path, args, words):
    noxattn = pipes["root"] / "sd15_noxattn"
    if not noxattn.exists():
        make_tiny_sd15(noxattn, cross_attention=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    fmt = {"root": pipes["root"], "sd15_noxattn": noxattn, "empty": empty}
    base = {"teacher.path": f"teacher.path={pipes['sd15']}", "data.path": f"data.path={pipes['prompts']}"}
    args = [a.format(**fmt) for a in args]
    for a in args:
        base.pop(a.split("=")[0], None)
    r = _cli(["experiment=sd15_dmd2", *base.values(), *args, f"out_root={tmp_path}", *FAST], tmp_path, timeout=300)
    assert r.returncode == 2, (r.stdout[-1000:], r.stderr[-2000:])
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onestep: error:") and words in err[0], err
    assert [p.name for p in tmp_path.iterdir()] == ["empty.txt"]  # no run folder, no cache left behind


def test_sd_lora_views_share_the_teacher_unet(pipes, tmp_path):
    """teacher=sd15 with LoRA: teacher, generator, critic and EMA are views of the one UNet loaded from the folder;
    with the adapters at their zero init every view computes the pipeline UNet's own prediction."""
    from conftest import compose
    from diffusers import UNet2DConditionModel

    from onestep import experiment
    from onestep.networks import Networks

    cfg = compose(["experiment=sd15_dmd2", f"teacher.path={pipes['sd15']}", f"data.path={pipes['prompts']}",
                   f"out_root={tmp_path}", "generator.lora.rank=4", "critic.lora.rank=4", "trainer.ema_decay=0.9",
                   "trainer.frozen_dtype=fp32"])
    setup = experiment.build(cfg, tmp_path, progress=False)
    nets = Networks(cfg, setup, critic=True)
    unet = nets.base.net.unet
    views = [nets.teacher] + [nets.roles[r].view for r in ("generator", "critic", "generator_ema")]
    assert all(v.net is nets.base.net for v in views)
    every = {p.untyped_storage().data_ptr() for v in views for p in v.net.parameters()}
    assert every == {p.untyped_storage().data_ptr() for p in unet.parameters()}
    batch = setup.data.batch(2, torch.device("cpu"))
    t = torch.full((2,), 0.7)
    ref = UNet2DConditionModel.from_pretrained(str(pipes["sd15"]), subfolder="unet")
    want = ref(batch.noise, setup.teacher.timestep(t), encoder_hidden_states=batch.cond["prompt_embeds"]).sample
    for v in views:
        assert torch.allclose(v(batch.noise, t, batch.cond), want, atol=1e-5)
    # a non-zero generator adapter changes the generator view only
    with torch.no_grad():
        for p in nets.roles["generator"].parameters():
            p.add_(0.1)
    assert not torch.allclose(nets.roles["generator"].view(batch.noise, t, batch.cond), want, atol=1e-3)
    assert torch.allclose(nets.teacher(batch.noise, t, batch.cond), want, atol=1e-5)
