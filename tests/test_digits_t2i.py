"""The shipped text-to-image digits teacher (onestep/assets/digits_t2i): a plain diffusers SD1.5 pipeline folder
that the SD1.5 adapter loads, held-out prompts that name their digit, and a short text-conditioned DMD2 run
whose 1-step student beats the teacher's own 1-step sampler on prompt accuracy."""

from __future__ import annotations

import pytest
import torch

from conftest import compose
from onestep.config import asset
from onestep.data.digits_text import DIGIT_WORDS, digit_of, prompts
from onestep.errors import ConfigError

FOLDER = asset("digits_t2i")


def test_prompts_name_their_digit():
    for split in ("train", "heldout"):
        ps = prompts(split)
        assert [digit_of(p) for p in ps] == [d for _ in range(len(ps) // 10) for d in range(10)]
    assert not set(prompts("train")) & set(prompts("heldout"))
    assert digit_of("A handwritten SEVEN") == 7 and digit_of("the digit 7") == 7
    for bad in ("a cat", "a 3 and a four"):
        with pytest.raises(ConfigError, match="names"):
            digit_of(bad)
    assert len(DIGIT_WORDS) == 10


def test_shipped_folder_is_a_diffusers_sd15_pipeline():
    from diffusers import StableDiffusionPipeline

    from onestep.denoisers.sd import load_sd

    parts = load_sd(FOLDER, "sd15")
    assert parts.denoiser.prediction == "eps" and parts.denoiser.data_shape == (4, 8, 8) and parts.image_size == 16
    pipe = StableDiffusionPipeline.from_pretrained(FOLDER)
    img = pipe("a handwritten seven", num_inference_steps=2, guidance_scale=3.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 1, 16, 16) and torch.isfinite(img).all()


@pytest.mark.slow
def test_short_dmd2_run_beats_the_teachers_one_step_sampler(tmp_path):
    from onestep.train.trainer import train

    cfg = compose(["experiment=digits_t2i_dmd2", "trainer.steps=80", "trainer.checkpoint_every=80",
                   "eval.num_samples=500", "eval.teacher_steps=[1]", "eval.plot=false", "trainer.progress=false",
                   f"out_root={tmp_path}"])
    rows = {(r["model"], r["steps"]): r for r in train(cfg, tmp_path / "run")["rows"]}
    student, teacher = rows[("student", 1)], rows[("teacher", 1)]
    # the teacher's 1-step DDIM image is the blurry class mean: the right digit, far from the data
    assert student["fd"] < 0.5 * teacher["fd"], (student, teacher)
    assert student["label_acc"] >= 0.9, student

    # the export round trip: plain StableDiffusionPipeline, in a process that cannot import onestep, draws a 7
    # for "a handwritten seven" in 1 step, and exactly what `onestep sample` draws
    from export_check import clean_process
    from onestep.rewards.digits_features import load_digits_features
    from onestep.runs import load_run
    from onestep.export.pipelines import export
    from onestep.export.sample import sample_run

    run = load_run(tmp_path / "run", torch.device("cpu"), frozen_dtype="fp32")
    out = export(run, tmp_path / "export")
    ours = sample_run(run, 32, seed=5, prompt="a handwritten seven")
    (theirs,) = clean_process([{"folder": str(out), "n": 32, "seed": 5, "prompt": "a handwritten seven",
                                "out": str(tmp_path / "sevens.safetensors")}], tmp_path)
    assert theirs.shape == (32, 1, 16, 16) and (theirs - ours).abs().max() <= 1e-4
    pooled = torch.nn.functional.avg_pool2d(theirs * 2 - 1, 2)
    sevens = (load_digits_features().logits(pooled).argmax(1) == 7).float().mean()
    assert sevens >= 0.8, sevens
