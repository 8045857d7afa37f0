"""reward=<name> (onestep/rewards/registry.py): the shipped digits rewards against hand computations on real digits,
their gradients against finite differences, CLIP score and HPSv2 through the registry against the cosine of the
official scorers, the evaluation's reward column, and the one-line errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import compose, one_line
from onestep.errors import ConfigError
from onestep.rewards.digits_features import DIGIT_WORDS, load_digits_features
from onestep.rewards.registry import build_reward
from test_rewards import _tiny_clip


def _rc(name, **kw):
    return compose([f"reward={name}", *(f"reward.{k}={v}" for k, v in kw.items())]).reward


def _digits(n: int = 40):
    from onestep.data.digits import load_digits_tensors

    images, labels = load_digits_tensors("train", 16)
    return images[:n], labels[:n]


def test_digits_class_is_the_classifier_log_probability_of_the_prompted_digit():
    reward = build_reward(_rc("digits_class"))
    images, labels = _digits()
    right = [f"a handwritten {DIGIT_WORDS[int(d)]}" for d in labels]
    wrong = [f"the digit {(int(d) + 1) % 10}" for d in labels]
    net = load_digits_features()
    with torch.no_grad():  # by hand: 16x16 -> 8x8 average pooling, the network's log-softmax at the label
        logp = net.logits(F.avg_pool2d(images, 2)).log_softmax(-1)
    got = reward(images, right)
    torch.testing.assert_close(got, logp[torch.arange(len(labels)), labels], rtol=0, atol=1e-6)
    assert got.exp().mean() > 0.9 and reward(images, wrong).exp().mean() < 0.1
    rgb = reward(images.repeat(1, 3, 1, 1), right)  # RGB is averaged to grey
    torch.testing.assert_close(rgb, got, rtol=0, atol=1e-6)


def test_digits_rewards_gradients_equal_finite_differences():
    """Directional derivative along a random smooth direction: autograd against a central difference (float64 net)."""
    images, labels = _digits(6)
    prompts = [f"a handwritten {DIGIT_WORDS[int(d)]}" for d in labels[:3]] * 2  # each prompt twice: diversity > 0
    g = torch.Generator().manual_seed(0)
    direction = F.avg_pool2d(torch.randn(6, 1, 16, 16, generator=g, dtype=torch.float64), 3, 1, 1)
    for name in ("digits_class", "digits_diversity"):
        reward = build_reward(_rc(name)).double()
        x = images.double().requires_grad_(True)
        reward(x, prompts).sum().backward()
        eps = 1e-5
        with torch.no_grad():
            fd = (reward(x + eps * direction, prompts).sum() - reward(x - eps * direction, prompts).sum()) / (2 * eps)
        assert float((x.grad * direction).sum()) == pytest.approx(float(fd), rel=1e-5, abs=1e-8), name


def test_digits_diversity_per_sample_averages_to_the_batch_diversity_per_prompt():
    from onestep.rewards.diversity import pairwise_cosine_distance
    from onestep.rewards.digits import network_input

    reward = build_reward(_rc("digits_diversity"))
    images, _ = _digits(7)
    prompts = ["a one", "a one", "a one", "a two", "a two", "a three", "a one"]
    got = reward(images, prompts)
    feats = load_digits_features().features(network_input(images))
    for p in set(prompts):
        idx = [i for i, q in enumerate(prompts) if q == p]
        want = 0.0 if len(idx) < 2 else float(pairwise_cosine_distance(feats[idx]))
        assert float(got[idx].mean()) == pytest.approx(want, abs=1e-5), p
    assert got[5] == 0  # alone with its prompt
    same = reward(images[:1].repeat(4, 1, 1, 1), ["a one"] * 4)
    assert same.abs().max() < 1e-6


def test_clip_and_hpsv2_through_the_registry_are_the_cosine_of_open_clip(tmp_path):
    import open_clip

    from onestep.rewards.preprocess import to_model_input

    model, cfg = _tiny_clip(tmp_path, "onestep-tiny-interface-clip")
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "hps.pt")
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    prompts = ["a photo of a cat", "a red square", "the digit seven"]
    with torch.no_grad():
        img = F.normalize(model.encode_image(to_model_input(images, 32)), dim=-1)
        txt = F.normalize(model.encode_text(open_clip.get_tokenizer("onestep-tiny-interface-clip")(prompts)), dim=-1)
    want = (img * txt).sum(-1)
    for name, weights in (("clip", tmp_path / "clip.pt"), ("hpsv2", tmp_path / "hps.pt")):
        reward = build_reward(_rc(name, weights=weights, model=cfg))
        torch.testing.assert_close(reward(images, prompts), want, rtol=1e-5, atol=1e-6)
        x = images.clone().requires_grad_(True)
        reward(x, prompts).sum().backward()
        assert x.grad.abs().sum() > 0, name


def test_bad_reward_input_is_one_line(tmp_path):
    from types import SimpleNamespace

    with pytest.raises(ConfigError) as e:
        build_reward(SimpleNamespace(name="aesthetic"))
    assert "reward='aesthetic' is not a reward; pick one of none, clip, clip_diversity, digits_class" in one_line(e)
    with pytest.raises(ConfigError) as e:
        build_reward(_rc("clip", weights=tmp_path / "x.pt"))
    assert "reward=clip needs reward.model=" in one_line(e)
    with pytest.raises(ConfigError) as e:
        build_reward(_rc("hpsv2"))
    assert "reward.weights=<local file>" in one_line(e)
    with pytest.raises(ConfigError) as e:
        build_reward(_rc("digits_class", weights=tmp_path / "nothing"))
    assert "has no config.json" in one_line(e)


def test_evaluation_reports_the_reward_of_the_samples(tmp_path):
    from onestep.eval.evaluators import RewardColumn, make_evaluator
    from onestep.experiment import load_teacher

    cfg = compose(["experiment=digits_t2i_dmd2", "reward=digits_class", f"out_root={tmp_path}"])
    setup = load_teacher(cfg, tmp_path, progress=False)
    evaluator = make_evaluator(cfg, setup)
    assert isinstance(evaluator, RewardColumn) and evaluator.headline == "fd"
    images, labels = _digits(32)
    texts = [f"a handwritten {DIGIT_WORDS[int(d)]}" for d in labels]
    with torch.no_grad():
        latents = setup.codec.encode(images)
    setup.conditioner.cache.ensure(texts)
    m = evaluator.metrics(latents, setup.conditioner(texts))
    with torch.no_grad():
        want = build_reward(cfg.reward)(setup.codec.decode(latents), texts).mean()
    assert m["reward_name"] == "digits_class" and m["reward"] == pytest.approx(float(want), abs=1e-6) and "fd" in m
    assert m["reward"] > -0.5  # the VAE round trip keeps the digits legible
    pixel = compose(["experiment=digits_dmd2", "reward=digits_class", f"out_root={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        make_evaluator(pixel, load_teacher(pixel, tmp_path / "pixel", progress=False))
    assert "is not a text-to-image teacher" in one_line(e)


def test_a_users_reward_module_by_import_path(tmp_path, monkeypatch):
    """reward.name=<module>:<factory>: the module imported from PYTHONPATH, the factory called with the reward section;
    the evaluation and the reward-tuning objectives then use what it returned. Bad paths are one-line errors."""
    (tmp_path / "my_rewards.py").write_text(
        "import torch\n"
        "class Brightness(torch.nn.Module):\n"
        "    def __init__(self, scale):\n"
        "        super().__init__()\n"
        "        self.scale = torch.nn.Parameter(torch.tensor(scale))\n"
        "    def forward(self, images, prompts):\n"
        "        return self.scale * images.flatten(1).mean(1)\n"
        "def make_reward(rc):\n"
        "    return Brightness(float(rc.model))\n"
        "def not_a_module(rc):\n"
        "    return lambda images, prompts: images.mean()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc = compose(["reward.name=my_rewards:make_reward", "reward.model=2.0"]).reward  # as on the command line
    reward = build_reward(rc)
    images = torch.rand(3, 1, 4, 4)
    torch.testing.assert_close(reward(images, ["a", "b", "c"]), 2.0 * images.flatten(1).mean(1))
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())

    for name, text in (("no_such_module_xyz:make_reward", "reward.name=no_such_module_xyz:make_reward: cannot import "
                                                          "'no_such_module_xyz'"),
                       ("my_rewards:missing", "reward.name=my_rewards:missing: module 'my_rewards' has no 'missing'"),
                       ("my_rewards:not_a_module", "reward.name=my_rewards:not_a_module returned a function, not a "
                                                   "torch nn.Module")):
        with pytest.raises(ConfigError) as e:
            build_reward(compose([f"reward.name={name}"]).reward)
        assert text in one_line(e), name
