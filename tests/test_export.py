"""`onestep export` / `onestep sample`: the exported folder, loaded by plain diffusers in a process where
``import onestep`` fails, generates exactly what `onestep sample` generates for the same seed (fp32, 1e-4), for
class-conditional digits students and tiny SD1.5 / SDXL students (1, 2 and 4 steps; full copies, LoRA merged,
LoRA-only and consistency-boundary students); plus the single-file layout and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import Interrupt, compose
from export_check import clean_process, env as _env
from sd_fixtures import make_tiny_sd15, make_tiny_sdxl, write_captioned_images, write_prompts
from onestep.errors import ConfigError

PROMPT = "a red square"
FAST = ["trainer.batch_size=2", "trainer.progress=false", "eval.num_samples=4", "eval.teacher_steps=[1]",
        "eval.plot=false", "trainer.checkpoint_every=2"]
DIGITS = ["experiment=digits_dmd2", "objective.regression_weight=0", "trainer.steps=2", *FAST]
def train_run(overrides: list[str], run_dir: Path, stop_at: int | None = None) -> Path:
    from onestep.train.trainer import train

    cfg = compose([*overrides, f"out_root={run_dir.parent}"])
    if stop_at is None:
        train(cfg, run_dir)
    else:
        def stop(step, logs):
            if step == stop_at:
                raise Interrupt
        with pytest.raises(Interrupt):
            train(cfg, run_dir, callbacks=(stop,))
    return run_dir


def export_and_sample(run_dir: Path, out: Path, n: int, seed: int, prompt: str | None = None, **export_kw):
    from onestep.runs import load_run
    from onestep.export.pipelines import export
    from onestep.export.sample import sample_run

    run = load_run(run_dir, torch.device("cpu"), frozen_dtype="fp32")  # as onestep sample / export load it
    export(run, out, **export_kw)
    return sample_run(run, n, seed, prompt=prompt)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    images = write_captioned_images(root / "images", [PROMPT] * 3)
    return {"sd15": make_tiny_sd15(root / "sd15"), "sdxl": make_tiny_sdxl(root / "sdxl"),
            "prompts": write_prompts(root / "prompts.txt", [PROMPT, "a blue circle"]), "images": images}


@pytest.mark.slow
def test_digits_students_round_trip(tmp_path):
    jobs, expected = [], []
    for steps in (1, 2):
        run = train_run([*DIGITS, f"generator.steps={steps}"], tmp_path / f"digits{steps}")
        out = tmp_path / f"export{steps}"
        expected.append(export_and_sample(run, out, n=12, seed=steps))
        jobs.append({"folder": str(out), "n": 12, "seed": steps, "out": str(tmp_path / f"clean{steps}.safetensors")})
        info = json.loads((out / "onestep_export.json").read_text())
        assert info["custom_pipeline"] and info["call"] == {"num_inference_steps": steps}
        code = (out / "pipeline.py").read_text()
        assert "import onestep" not in code and "from onestep" not in code
    for got, want in zip(clean_process(jobs, tmp_path), expected):
        assert got.shape == want.shape == (12, 1, 8, 8)
        assert (got - want).abs().max() <= 1e-4
    assert (expected[0] - expected[1]).abs().max() > 1e-2  # 1- and 2-step students differ: the check can fail


@pytest.mark.slow
def test_sd_students_round_trip(sd, tmp_path):
    """Full-copy SD1.5 students at 1 and 2 steps, an SDXL LoRA+GAN student at 4 steps, an LCM-LoRA student
    (consistency boundary, 4 steps) merged and as LoRA-only weights; and the single-file layout."""
    cases = {
        "sd15_1": ["experiment=sd15_dmd2", f"teacher.path={sd['sd15']}", f"data.path={sd['prompts']}"],
        "sd15_2": ["experiment=sd15_dmd2", f"teacher.path={sd['sd15']}", f"data.path={sd['prompts']}",
                   "generator.steps=2"],
        "sdxl_4": ["experiment=sdxl_dmd2_4step", f"teacher.path={sd['sdxl']}", f"data.path={sd['images']}"],
        "lcm_4": ["experiment=sd15_lcm_lora", f"teacher.path={sd['sd15']}", f"data.path={sd['images']}"],
    }
    jobs, expected = [], []
    for name, overrides in cases.items():
        run = train_run([*overrides, "trainer.steps=2", *FAST], tmp_path / name)
        variants = [("", {})] + ([("_lora", {"lora_only": True})] if name == "lcm_4" else [])
        for suffix, kw in variants:
            out = tmp_path / f"export_{name}{suffix}"
            expected.append(export_and_sample(run, out, n=2, seed=7, prompt=PROMPT, **kw))
            jobs.append({"folder": str(out), "n": 2, "seed": 7, "prompt": PROMPT,
                         "out": str(tmp_path / f"clean_{name}{suffix}.safetensors")})
            info = json.loads((out / "onestep_export.json").read_text())
            assert info["call"]["num_inference_steps"] == int(name[-1]) and info["call"]["guidance_scale"] == 1.0
            assert bool(info["lora"]) == bool(kw)
    sf = dict(jobs[0], single_file=True, out=str(tmp_path / "clean_single_file.safetensors"))
    got = clean_process([*jobs, sf], tmp_path)
    for g, w, job in zip(got, [*expected, expected[0]], [*jobs, sf]):
        assert g.shape == w.shape and (g - w).abs().max() <= 1e-4, (job["folder"], (g - w).abs().max())
    assert (expected[0] - expected[1]).abs().max() > 1e-3


@pytest.mark.slow
def test_smaller_sd_unet_student_round_trip(sd, tmp_path):
    """generator.arch = a UNet2DConditionModel config .json without the teacher's mid-block (BK-SDM's removal): the
    smaller student is written into the teacher's SD1.5 pipeline layout, and plain diffusers loads it as a smaller UNet
    and generates what `onestep sample` generates (1e-4)."""
    teacher_unet = json.loads((sd["sd15"] / "unet" / "config.json").read_text())
    arch = tmp_path / "student_unet.json"
    arch.write_text(json.dumps({**teacher_unet, "mid_block_type": None}))
    run = train_run(["experiment=sd15_dmd2", f"teacher.path={sd['sd15']}", f"data.path={sd['prompts']}",
                     f"generator.arch={arch}", "trainer.steps=2", *FAST], tmp_path / "slim")
    out = tmp_path / "export"
    expected = export_and_sample(run, out, n=2, seed=7, prompt=PROMPT)
    assert json.loads((out / "unet" / "config.json").read_text())["mid_block_type"] is None
    student = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    teacher = load_file(str(sd["sd15"] / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not any(k.startswith("mid_block.") for k in student) and any(k.startswith("mid_block.") for k in teacher)
    assert sum(v.numel() for v in student.values()) < sum(v.numel() for v in teacher.values())
    (got,) = clean_process([{"folder": str(out), "n": 2, "seed": 7, "prompt": PROMPT,
                             "out": str(tmp_path / "clean.safetensors")}], tmp_path)
    assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-4


@pytest.mark.slow
def test_cli_export_and_sample(tmp_path):
    """`onestep export` then `onestep sample` on the run and on the export folder: the same images."""
    run = train_run([*DIGITS], tmp_path / "run")
    cli = [sys.executable, "-m", "onestep.cli"]
    r = subprocess.run([*cli, "export", f"run_dir={run}", f"out={tmp_path / 'exp'}"], capture_output=True,
                       text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "custom_pipeline=" in r.stdout
    outs = []
    for src, name in ((run, "run.safetensors"), (tmp_path / "exp", "exp.safetensors")):
        r = subprocess.run([*cli, "sample", f"run_dir={src}", "num=10", "seed=3", f"out={tmp_path / name}"],
                           capture_output=True, text=True, env=_env(), timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(load_file(str(tmp_path / name))["images"])
    assert outs[0].shape == (10, 1, 8, 8) and (outs[0] - outs[1]).abs().max() <= 1e-4
    r = subprocess.run([*cli, "sample", f"run_dir={run}", "num=4", "class_label=3", f"out={tmp_path / 'g.png'}"],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0 and (tmp_path / "g.png").stat().st_size > 100, r.stderr[-2000:]
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "custom_pipeline=" in card and "| student |" in card and "objective:" in card


def test_errors_are_one_line(tmp_path):
    from onestep.runs import load_run
    from onestep.export.pipelines import export

    run_dir = train_run([*DIGITS, "trainer.steps=4"], tmp_path / "run", stop_at=2)
    run = load_run(run_dir, torch.device("cpu"))
    with pytest.raises(ConfigError, match="stopped at step 2 of trainer.steps=4.*allow_unfinished=true"):
        export(run, tmp_path / "out")
    out = export(run, tmp_path / "out", allow_unfinished=True)
    assert json.loads((out / "onestep_export.json").read_text())["finished"] is False
    with pytest.raises(ConfigError, match="is not empty; pass overwrite=true"):
        export(run, out, allow_unfinished=True)
    export(run, out, allow_unfinished=True, overwrite=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a onestep export"):
        export(run, other, allow_unfinished=True, overwrite=True)
    with pytest.raises(ConfigError, match="lora_only=true needs a LoRA student|lora_only=true is for SD"):
        export(run, tmp_path / "x", allow_unfinished=True, lora_only=True)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="has no checkpoint yet"):
        load_run(empty, torch.device("cpu"))
    env = _env()
    for args, words in ((["sample", f"run_dir={run_dir}", "out=x.jpg"], "must end in .png"),
                        (["sample", f"run_dir={run_dir}", "out=x.png", "prompt=a cat"], "class-conditional"),
                        (["sample", f"run_dir={run_dir}", "out=x.png", "class_label=12"], "class_label=12"),
                        (["export", f"run_dir={run_dir}", "outt=x"], "unknown key 'outt'"),
                        (["export", f"run_dir={tmp_path / 'nope'}", f"out={tmp_path / 'y'}"], "is not a folder")):
        r = subprocess.run([sys.executable, "-m", "onestep.cli", *args], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and words in err[0], (args, r.stderr[-1500:])


@pytest.mark.slow
def test_flow_students_round_trip(tmp_path):
    """SD3 (1 step), guidance-distilled Flux (LoRA, 4 re-noising steps drawn in the packed token layout; merged
    and LoRA-only) and Sana (2 steps) students: FlowMatchEulerDiscreteScheduler pipelines equal `onestep sample`."""
    from flow_fixtures import make_tiny_flux, make_tiny_sd3
    from sana_fixtures import make_tiny_sana

    prompts = write_prompts(tmp_path / "prompts.txt", [PROMPT, "a blue circle"])
    images = write_captioned_images(tmp_path / "images", [PROMPT] * 2, size=(32, 32))
    small = ["trainer.steps=2", *FAST, "teacher.resolution=32"]
    cases = {
        "sd3_1": ["experiment=sd3_sid", f"teacher.path={make_tiny_sd3(tmp_path / 'sd3')}", f"data.path={prompts}"],
        "flux_4": ["experiment=flux_dmd2_4step", f"teacher.path={make_tiny_flux(tmp_path / 'flux')}",
                   f"data.path={prompts}"],
        "sana_2": ["experiment=sana_sprint", f"teacher.path={make_tiny_sana(tmp_path / 'sana')}",
                   f"data.path={images}", "generator.steps=2", "objective.warmup_steps=0"],
    }
    jobs, expected = [], []
    for name, overrides in cases.items():
        run = train_run([*overrides, *small], tmp_path / name)
        for suffix, kw in [("", {})] + ([("_lora", {"lora_only": True})] if name.startswith("flux") else []):
            out = tmp_path / f"export_{name}{suffix}"
            expected.append(export_and_sample(run, out, n=2, seed=11, prompt=PROMPT, **kw))
            jobs.append({"folder": str(out), "n": 2, "seed": 11, "prompt": PROMPT,
                         "out": str(tmp_path / f"clean_{name}{suffix}.safetensors")})
            info = json.loads((out / "onestep_export.json").read_text())
            assert len(info["call"]["sigmas"]) == info["call"]["num_inference_steps"] == int(name[-1])
            assert info["call"]["guidance_scale"] == (3.5 if name.startswith("flux") else 1.0)
    for g_, w, job in zip(clean_process(jobs, tmp_path), expected, jobs):
        assert g_.shape == w.shape and (g_ - w).abs().max() <= 1e-4, (job["folder"], (g_ - w).abs().max())


def test_text_to_image_export_reads_no_prompt_file_cache_or_evaluator(tmp_path, monkeypatch):
    """A finished SD1.5 run exports and samples with its training prompt file and embedding cache deleted: the run
    loader builds the teacher and the generator only (no data, no evaluator: no CLIP, no Inception statistics)."""
    import shutil

    from onestep import experiment
    from onestep.data.text import EmbeddingCache
    from onestep.eval.t2i_eval import TextImageEvaluator
    from onestep.export.sample import sample_export

    prompts = write_prompts(tmp_path / "prompts.txt", [PROMPT, "a blue circle"])
    run = train_run(["experiment=sd15_dmd2", f"teacher.path={make_tiny_sd15(tmp_path / 'sd15')}",
                     f"data.path={prompts}", "trainer.steps=2", *FAST], tmp_path / "run")
    assert (tmp_path / "cache").is_dir()
    prompts.unlink()
    shutil.rmtree(tmp_path / "cache")

    def refuse(*args, **kwargs):
        raise AssertionError("export / sample built the run's data or evaluator")
    monkeypatch.setattr(EmbeddingCache, "ensure", refuse)
    monkeypatch.setattr(experiment, "add_data", refuse)
    monkeypatch.setattr(TextImageEvaluator, "__init__", refuse)
    images = export_and_sample(run, tmp_path / "export", n=2, seed=5, prompt=PROMPT)
    assert not (tmp_path / "cache").exists()
    exported = sample_export(tmp_path / "export", 2, 5, prompt=PROMPT)
    assert images.shape == exported.shape == (2, 3, 16, 16)
    assert (images - exported).abs().max() <= 1e-4
