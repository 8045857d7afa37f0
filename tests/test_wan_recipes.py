"""The video recipes on tiny random Wan pipelines (tests/video_fixtures.py) through `onestep train`: MCM with a folder
of still images (experiment=wan_mcm) on Wan 2.1, and Phased DMD with one student expert per teacher expert
(experiment=wan22_phased_dmd) on the two-expert Wan 2.2 folder; plus the expert mapping itself: at init each student
step is the teacher expert that serves its t."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd_fixtures import write_captioned_images, write_prompts
from video_fixtures import NUM_FRAMES, RESOLUTION, T5_TOKENS, make_tiny_wan

PROMPTS = ["a red square", "a blue circle", "a green dog", "two cats", "a house at night"]
#: the tiny folders' sizes, and a 3-step run
TINY = [f"teacher.resolution={RESOLUTION}", f"teacher.num_frames={NUM_FRAMES}",
        f"teacher.max_sequence_length={T5_TOKENS}", "trainer.frozen_dtype=fp32"]
FAST = ["trainer.steps=3", "trainer.batch_size=2", "trainer.progress=false", "eval.num_samples=2",
        "eval.teacher_steps=[2]", "trainer.checkpoint_every=3", "trainer.sample_every=0"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_recipes")
    return {"wan21": make_tiny_wan(root / "wan21"), "wan22": make_tiny_wan(root / "wan22", two_experts=True),
            "prompts": write_prompts(root / "prompts.txt", PROMPTS),
            "stills": write_captioned_images(root / "stills", ["a still of " + p for p in PROMPTS[:3]], size=(40, 32))}


def _train_cli(args, out_root: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "onestep.cli", "train", *args, *TINY, *FAST, f"out_root={out_root}"],
                       cwd=out_root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = [p for p in (out_root / args[0].split("=")[1]).iterdir() if p.is_dir()]
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    losses = {k: v for s in stats for k, v in s.items() if k.endswith("loss")}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    return run, stats[-1]


@pytest.mark.slow
def test_wan_mcm_with_stills_cli(folders, tmp_path):
    run, last = _train_cli(["experiment=wan_mcm", f"teacher.path={folders['wan21']}",
                            f"data.path={folders['prompts']}", f"objective.stills={folders['stills']}"], tmp_path)
    assert all(math.isfinite(last[k]) for k in ("gen/consistency", "gen/adv_g", "critic/adv_d"))
    saved = {p.stem for p in (run / "checkpoints" / "step_00000003").glob("*.safetensors")}
    assert {"generator", "disc", "motion_head"} <= saved
    # every still was encoded once, as a 1-frame video (latent frame axis of size 1)
    from safetensors.torch import load_file

    latents = sorted((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert len(latents) == 3 and all(p.parent.name.endswith("-still") for p in latents)
    assert load_file(str(latents[0]))["latent"].shape[1] == 1


@pytest.mark.slow
def test_wan22_phased_dmd_cli(folders, tmp_path):
    run, last = _train_cli(["experiment=wan22_phased_dmd", f"teacher.path={folders['wan22']}",
                            f"data.path={folders['prompts']}", "objective.phase_length=2", "objective.ttur=1"],
                           tmp_path)
    assert last["gen/phase"] == 1.0  # both experts trained: phase 0 for 2 steps, then phase 1
    assert (run / "checkpoints" / "step_00000003" / "critic.safetensors").is_file()


def test_each_student_expert_starts_as_the_teacher_expert_of_its_step(folders, tmp_path):
    """experiment=wan22_phased_dmd: step 0 (t = t_max) is in the high-noise expert's range, step 1 (t = 0.874) in
    the low-noise one's, and at init student expert i equals the teacher there (and differs from the other expert)."""
    from onestep import experiment
    from onestep.objectives.phased_dmd import PhasedDMD
    from tests.conftest import compose

    cfg = compose(["experiment=wan22_phased_dmd", f"teacher.path={folders['wan22']}", f"data.path={folders['prompts']}",
                   f"out_root={tmp_path}", *TINY])
    setup = experiment.build(cfg, tmp_path, progress=False)
    teacher = setup.teacher
    student = experiment.shape_student(cfg.generator, setup.student_init, PhasedDMD)
    ts = [float(t) for t in cfg.generator.ts]
    assert teacher.timestep(torch.tensor(ts[0])) >= teacher.boundary > teacher.timestep(torch.tensor(ts[1]))
    assert student.route(torch.tensor(ts)).tolist() == [0, 1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *teacher.data_shape, generator=g)
    cond = setup.conditioner(PROMPTS[:2])
    for i, t in enumerate(ts):
        tt = torch.full((2,), t)
        with torch.no_grad():
            want = teacher(x, tt, cond)
            assert torch.allclose(student(x, tt, cond), want, atol=1e-6)
            other = teacher.transformer_2 if i == 0 else teacher.transformer
            assert not torch.allclose(teacher._predict(other, x, teacher.timestep(tt), cond["prompt_embeds"]), want,
                                      atol=1e-3)
