"""Digits: shipped assets (ok / missing / corrupt), the UNet2DModel adapter's conversions, data, metrics,
and a shortened one-step distillation of the shipped teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import seed_bound

from onestep.data.digits import DigitsData, load_digits_tensors
from onestep.denoisers.base import Guided
from onestep.denoisers.diffusers import (UNet2DDenoiser, load_unet_denoiser, save_unet_denoiser)
from onestep.errors import ConfigError
from onestep.rewards.digits_features import ASSET as FEATURES_ASSET
from onestep.rewards.digits_features import class_metrics, load_digits_features
from onestep.schedules import VPCosine, VPDiscrete, bcast

TEACHER_ASSET = Path(__file__).resolve().parent.parent / "onestep" / "assets" / "digits_teacher"


def tiny_unet(num_classes: int = 3):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4, num_class_embeds=num_classes + 1).eval()


# ---- shipped assets -------------------------------------------------------------------------------------------

def test_feature_net_loads_and_classifies_heldout():
    net = load_digits_features()
    x, y = load_digits_tensors("heldout")
    with torch.no_grad():
        assert net.features(x).shape == (x.shape[0], net.arch["feature_dim"])
        acc = float((net.logits(x).argmax(1) == y).double().mean())
    assert acc >= 0.97
    meta = json.loads((FEATURES_ASSET / "config.json").read_text())
    assert abs(meta["heldout_accuracy"] - acc) < 1e-6  # the shipped figure is this network's


def test_teacher_loads_with_its_schedule_and_quality():
    teacher = load_unet_denoiser(TEACHER_ASSET)
    assert teacher.data_shape == (1, 8, 8) and teacher.num_classes == 10
    assert teacher.prediction == "v" and isinstance(teacher.schedule, VPCosine)
    q = json.loads((TEACHER_ASSET / "onestep.json").read_text())["quality"]
    assert q["32_step"]["fd"] < 0.25 * q["1_step"]["fd"]  # many-step sampling is far better than one step
    assert sum(f.stat().st_size for f in TEACHER_ASSET.iterdir()) < 5e6


@pytest.mark.parametrize("which", ["teacher", "features"])
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_broken_asset_is_a_one_line_error(tmp_path, which, damage):
    src, weights = ((TEACHER_ASSET, "diffusion_pytorch_model.safetensors") if which == "teacher"
                    else (FEATURES_ASSET, "model.safetensors"))
    folder = tmp_path / which
    shutil.copytree(src, folder)
    if damage == "missing":
        (folder / weights).unlink()
    else:
        data = (folder / weights).read_bytes()
        (folder / weights).write_bytes(data[: len(data) // 2])  # a truncated download
    load = (lambda: load_unet_denoiser(folder, "digits teacher")) if which == "teacher" else \
        (lambda: load_digits_features(folder))
    with pytest.raises(ConfigError) as e:
        load()
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg
    assert ("has no " + weights) in msg if damage == "missing" else "is corrupt" in msg


def test_missing_teacher_path_fails_in_the_builder(tmp_path):
    from hydra import compose, initialize_config_module

    import onestep.config  # noqa: F401
    import onestep.objectives  # noqa: F401
    from onestep.experiment import build

    with initialize_config_module("onestep.configs", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=digits_dmd2", f"teacher.path={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="teacher.path"):
        build(cfg, tmp_path)


# ---- the UNet2DModel adapter ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("schedule", [VPCosine(), VPDiscrete("linear", 1000, 1e-4, 0.02)], ids=["cosine", "discrete"])
def test_adapter_x0_eps_consistent(prediction, schedule):
    """x0() and eps() of the adapter reassemble x_t = alpha x0 + sigma eps; v has its closed form."""
    den = UNet2DDenoiser(tiny_unet().double(), schedule, prediction)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, 3, 0, 1])  # 3 = the "no label" token
    a, s = bcast(schedule.alpha(t), x), bcast(schedule.sigma(t), x)
    x0, eps, v = den.x0(x, t, cond), den.eps(x, t, cond), den.v(x, t, cond)
    torch.testing.assert_close(a * x0 + s * eps, x, rtol=0, atol=1e-9)
    torch.testing.assert_close(v, a * eps - s * x0, rtol=0, atol=1e-9)
    native = den.predict(prediction, x, t, cond)
    torch.testing.assert_close(native, {"eps": eps, "v": v, "x0": x0}[prediction], rtol=0, atol=1e-9)


def test_adapter_feeds_diffusers_timesteps_and_null_label():
    unet = tiny_unet()
    x, t, cond = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 0.4, 0.7, 0.9]), torch.tensor([0, 1, 2, 1])
    cont = UNet2DDenoiser(unet, VPCosine(), "v")
    disc = UNet2DDenoiser(unet, VPDiscrete("scaled_linear", 1000), "eps")
    with torch.no_grad():
        torch.testing.assert_close(cont(x, t, cond), unet(x, 1000 * t, class_labels=cond).sample)
        torch.testing.assert_close(disc(x, t, cond), unet(x, 999 * t, class_labels=cond).sample)
        null = torch.full_like(cond, 3)
        torch.testing.assert_close(cont(x, t, None), unet(x, 1000 * t, class_labels=null).sample)
        # CFG: u + w (c - u) with u the "no label" prediction
        guided = Guided(cont, 2.5)(x, t, cond)
        c, u = unet(x, 1000 * t, class_labels=cond).sample, unet(x, 1000 * t, class_labels=null).sample
        torch.testing.assert_close(guided, u + 2.5 * (c - u))
    assert cont.features(x, t, cond).shape == (4, cont.feature_dim)


def test_adapter_save_load_roundtrip(tmp_path):
    den = UNet2DDenoiser(tiny_unet(), VPDiscrete("linear", 500, 1e-4, 0.02), "eps")
    save_unet_denoiser(den, tmp_path / "m", {"note": 1})
    back = load_unet_denoiser(tmp_path / "m")
    assert isinstance(back.schedule, VPDiscrete) and back.schedule.num_steps == 500
    torch.testing.assert_close(back.schedule.alphas_cumprod, den.schedule.alphas_cumprod)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.2, 0.5, 0.8])
    with torch.no_grad():
        torch.testing.assert_close(back(x, t), den(x, t))


# ---- data and metrics -----------------------------------------------------------------------------------------

def test_digits_data_split_and_range():
    xa, ya = load_digits_tensors("all")
    xt, _ = load_digits_tensors("train")
    xh, yh = load_digits_tensors("heldout")
    assert xa.shape == (1797, 1, 8, 8) and xt.shape[0] + xh.shape[0] == 1797
    assert float(xa.min()) == -1.0 and float(xa.max()) == 1.0
    assert torch.bincount(yh).min() >= 30  # stratified: every class held out
    b = DigitsData("train").batch(5, torch.device("cpu"))
    assert b.noise.shape == b.real.shape == (5, 1, 8, 8) and b.cond.labels.shape == (5,)
    assert load_digits_tensors("all", 16)[0].shape == (1797, 1, 16, 16)


def test_evaluator_ranks_real_above_noise_and_blur():
    from onestep.eval.digits_eval import DigitsEvaluator

    real, _ = load_digits_tensors("all")
    ev = DigitsEvaluator(real)
    xh, yh = load_digits_tensors("heldout")
    m_real = ev.metrics(xh, yh)
    blur = torch.nn.functional.avg_pool2d(xh, 3, 1, 1)
    m_blur = ev.metrics(blur, yh)
    m_noise = ev.metrics(torch.rand_like(xh) * 2 - 1, yh)
    assert m_real["fd"] < 0.2 * m_blur["fd"] < m_noise["fd"]
    assert m_real["class_coverage"] == 1.0 and m_real["label_acc"] > 0.97 and m_real["precision"] > 0.8


def test_class_metrics():
    logits = torch.eye(4)[torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])] * 5
    m = class_metrics(logits, torch.tensor([0, 0, 1, 1, 1, 2, 2, 3]), 4)
    assert m["class_coverage"] == 0.75  # class 3 never predicted
    assert m["label_acc"] == 6 / 8


# ---- shortened distillation -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_short_digits_distillation_beats_teacher_one_step(tmp_path):
    from hydra import compose, initialize_config_module

    import onestep.config  # noqa: F401
    import onestep.objectives  # noqa: F401
    from onestep.train.trainer import train

    torch.set_num_threads(1)
    with initialize_config_module("onestep.configs", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=digits_dmd2", "trainer.steps=40", "trainer.progress=false",
                                           "objective.regression_pairs=256", "objective.regression_steps=16",
                                           "eval.num_samples=500", "eval.teacher_steps=[1]", "eval.plot=false"])
    rows = {r["model"]: r for r in train(cfg, tmp_path / "run")["rows"]}
    assert rows["student"]["fd"] <= seed_bound("digits_dmd2_40_steps"), rows  # the teacher's 1-step FD: ~117
