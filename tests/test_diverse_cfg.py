"""Diversity-rewarded CFG distillation (onestep/objectives/diverse_cfg.py) and the weight merge (onestep/export/merge.py).

The generator loss against a float64 transcription of QD = Q + beta D on an exact guided GMM teacher; the diversity
term's gradient (the pathwise policy gradient of D) against its closed form for a Gaussian generator; the merged
student against (1 - lambda) theta_q + lambda theta_d; a few CLI-config steps on the shipped digits teacher.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import logged_train
from onestep import checkpoint
from onestep.conditioning import Labels
from onestep.core import Batch, Nets, noised, sample_t
from onestep.denoisers.base import guided
from onestep.denoisers.gmm import GMMDenoiser, class_mixture
from onestep.errors import ConfigError
from onestep.export.merge import lerp, merge_runs
from onestep.objectives.diverse_cfg import DiverseCFG, DiverseCFGConfig, diversity_term, grouped
from onestep.schedules import make_schedule

ROOT = Path(__file__).resolve().parents[1]


class CosineDiversity(torch.nn.Module):
    """Each sample's mean 1 - cos to the other samples of its prompt, on the flattened sample (a reward= shape)."""

    def forward(self, images, prompts):
        f = F.normalize(images.flatten(1), dim=-1)
        same = torch.tensor([[p == q for q in prompts] for p in prompts]) & ~torch.eye(len(prompts), dtype=torch.bool)
        dist = (1 - f @ f.T) * same
        return dist.sum(1) / same.sum(1).clamp_min(1)


class SquaredDistance(torch.nn.Module):
    """Each sample's mean ||x_i - x_j||^2 to the other samples of its prompt."""

    def forward(self, x, prompts):
        same = torch.tensor([[p == q for q in prompts] for p in prompts]) & ~torch.eye(len(prompts), dtype=torch.bool)
        return (torch.cdist(x, x) ** 2 * same).sum(1) / same.sum(1).clamp_min(1)


def objective(generate, **kw):
    obj = DiverseCFG(DiverseCFGConfig(**kw), generate)
    obj.reward, obj.codec = CosineDiversity(), None
    return obj


def test_generator_loss_is_the_transcribed_qd_objective():
    """loss = 0.5 mean(g^2) - beta * mean_i mean_{j != i, same prompt} (1 - cos(x_i, x_j)), g = (mu_fake - mu_real) /
    mean|x - mu_real| (DMD eq. 7-8, the guided teacher as real score) on rows whose prompts come in groups of k."""
    mix = class_mixture(dim=4, num_classes=3, per_class=2)
    base = GMMDenoiser(mix, make_schedule("vp_linear"))
    teacher, critic = guided(base, 2.5), guided(base, 1.0)  # a critic that differs from the guided real score
    n, k, beta = 12, 3, 0.7
    a = torch.nn.Parameter(torch.tensor(0.8, dtype=torch.float64))

    def generate(nets, batch):
        return a * batch.noise + 0.3

    g = torch.Generator().manual_seed(1)
    batch = Batch(noise=torch.randn(n, 4, generator=g, dtype=torch.float64),
                  cond=Labels(torch.randint(0, 3, (n,), generator=g), 3))
    obj = objective(generate, diversity_weight=beta, group=k)
    nets = Nets(teacher=teacher, generator=None, critic=critic)
    torch.manual_seed(7)
    got = obj.generator_loss(nets, batch, 0)

    torch.manual_seed(7)
    rows = torch.arange(n // k).repeat(k)
    labels = batch.cond.labels[rows]
    x = (0.8 * batch.noise + 0.3).double()
    t = sample_t(base.schedule, n, 0.02, 0.98, like=x)
    x_t, _ = noised(base.schedule, x, t)
    mu_real = teacher.x0(x_t, t, Labels(labels, 3))
    mu_fake = critic.x0(x_t, t, Labels(labels, 3))
    grad = (mu_fake - mu_real) / (x - mu_real).abs().mean(1, keepdim=True)
    dm = 0.5 * (grad**2).mean()
    d = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i and rows[j] == rows[i]]
        d += sum(1 - float(F.cosine_similarity(x[i], x[j], dim=0)) for j in others) / len(others)
    want = float(dm) - beta * d / n
    assert float(got["loss"].detach()) == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert float(got["diversity"]) == pytest.approx(d / n, rel=1e-10)
    got["loss"].backward()
    assert a.grad is not None and torch.isfinite(a.grad)


def test_quality_end_is_the_plain_dmd_loss():
    """beta = 0: the loss is the distribution matching term alone (the merge's quality end)."""
    mix = class_mixture(dim=4, num_classes=3, per_class=2)
    base = GMMDenoiser(mix, make_schedule("vp_linear"))
    nets = Nets(teacher=guided(base, 2.5), generator=None, critic=guided(base, 1.0))
    batch = Batch(noise=torch.randn(8, 4, dtype=torch.float64), cond=Labels(torch.arange(8) % 3, 3))
    out = objective(lambda nets, b: 0.5 * b.noise, diversity_weight=0.0).generator_loss(nets, batch, 0)
    assert float(out["loss"]) == float(out["dm"]) and float(out["diversity"]) > 0


def test_diversity_gradient_matches_the_closed_form_of_a_gaussian_generator():
    """x = mu + s z, z ~ N(0, I_d), k = 2 samples per prompt, r = ||x_1 - x_2||^2: D = E r = 2 d s^2, so
    dD/ds = 4 d s and dD/dmu = 0. The pathwise estimate (autograd of the grouped batch mean) agrees to MC error."""
    d, n, s0 = 3, 40000, 0.7
    mu = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    s = torch.nn.Parameter(torch.tensor(s0, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    batch = grouped(Batch(noise=torch.randn(n, d, generator=g, dtype=torch.float64), cond=Labels(torch.zeros(n), 1)),
                    2)
    names = [f"p{int(i)}" for i in torch.arange(n // 2).repeat(2)]
    reward = SquaredDistance()
    x = mu + s * batch.noise
    # the pairwise reward over all n rows at once would be O(n^2); the estimator is per group, so score each pair
    pairs = torch.stack([x[: n // 2], x[n // 2:]], 1)  # rows i and i + n/2 share prompt i
    term = torch.stack([diversity_term(reward, p, names[:1] * 2) for p in pairs[:2000]]).mean()
    term_all = ((pairs[:, 0] - pairs[:, 1]) ** 2).sum(1).mean()
    term_all.backward(retain_graph=True)
    grad_s, grad_mu = s.grad.clone(), mu.grad.clone()
    assert float(grad_s) == pytest.approx(4 * d * s0, rel=0.02)
    assert grad_mu.abs().max() < 1e-9
    s.grad = None
    term.backward()  # diversity_term on the first 2000 groups: the same estimator, through the reward interface
    assert float(s.grad) == pytest.approx(4 * d * s0, rel=0.08)
    assert float(term.detach()) == pytest.approx(2 * d * s0**2, rel=0.08)


def test_diversity_term_is_the_mean_pairwise_reward_of_a_grouped_batch():
    """grouped() repeats the first B/k conditions k times, and the term's value and gradient through the reward equal
    the closed form mean over pairs of r(x_i, x_j) for k = 2, on a small batch (exact, no MC)."""
    n, d = 6, 2
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    b = grouped(Batch(noise=x, cond=Labels(torch.tensor([4, 5, 6, 7, 8, 9]), 10)), 2)
    assert b.cond.labels.tolist() == [4, 5, 6, 4, 5, 6]
    names = [str(int(v)) for v in b.cond.labels]
    got = diversity_term(SquaredDistance(), x, names)
    want = sum(((x[i] - x[i + 3]) ** 2).sum() for i in range(3)) / 3
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    (g1,) = torch.autograd.grad(got, x)
    (g2,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_bad_input_is_one_line():
    with pytest.raises(ConfigError, match="objective.group=1"):
        DiverseCFG(DiverseCFGConfig(group=1), None)
    with pytest.raises(ConfigError, match="objective.reward=none"):
        DiverseCFG(DiverseCFGConfig(reward="none"), None)
    with pytest.raises(ConfigError, match="objective.diversity_weight"):
        DiverseCFG(DiverseCFGConfig(diversity_weight=-1.0), None)
    with pytest.raises(ConfigError, match="a batch of 64 rows"):
        DiverseCFG(DiverseCFGConfig(group=3), None).set_run({}, images_per_step=64)
    assert "objective.group=2" in DiverseCFG(DiverseCFGConfig(), None).accumulation_refusal()  # rows tied by prompt
    with pytest.raises(ConfigError, match="multiple of 3"):
        grouped(Batch(noise=torch.zeros(4, 2), cond=Labels(torch.zeros(4), 2)), 3)
    with pytest.raises(ConfigError, match="conditional"):
        grouped(Batch(noise=torch.zeros(4, 2)), 2)


def _run(folder: Path, sd: dict, step: int = 5) -> Path:
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"run_dir": str(folder), "seed": 0}), folder / "config.yaml")
    checkpoint.save_weights(folder, step, {"generator": sd, "generator_ema": sd}, {"step": step})
    return folder


def test_merged_weights_are_the_interpolation(tmp_path):
    g = torch.Generator().manual_seed(0)
    q = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g), "count": torch.tensor(3)}
    d = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g), "count": torch.tensor(3)}
    for lam in (0.0, 0.3, 1.0, 1.5):
        out = lerp(q, d, lam)
        for key in ("w", "b"):
            want = ((1 - lam) * q[key].double() + lam * d[key].double()).float()
            torch.testing.assert_close(out[key], want, rtol=0, atol=0)
        assert out["count"] == 3
    assert torch.equal(lerp(q, d, 0.0)["w"], q["w"]) and torch.equal(lerp(q, d, 1.0)["w"], d["w"])

    rq, rd = _run(tmp_path / "q", q), _run(tmp_path / "d", d, step=7)
    ckpt = merge_runs(str(rq), str(rd), 0.25, str(tmp_path / "m"))
    assert checkpoint.step_of(ckpt) == 7
    got = checkpoint.read_generator_weights(str(tmp_path / "m"), "x")
    torch.testing.assert_close(got["w"], (0.75 * q["w"].double() + 0.25 * d["w"].double()).float(), rtol=0, atol=0)
    assert OmegaConf.load(tmp_path / "m" / "config.yaml").run_dir == str(tmp_path / "m")

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from merge_students import main
    finally:
        sys.path.pop(0)
    assert main([f"quality={rq}", f"diversity={rd}", "weight=0.5", f"out={tmp_path / 'cli'}"]) == 0
    half = checkpoint.read_generator_weights(str(tmp_path / "cli"), "x")
    torch.testing.assert_close(half["b"], (0.5 * q["b"].double() + 0.5 * d["b"].double()).float(), rtol=0, atol=0)
    assert main([f"quality={rq}"]) == 2
    assert main([f"quality={rq}", f"diversity={rd}", "weight=0.5", f"out={tmp_path / 'cli'}"]) == 1  # not empty


def test_merge_refuses_students_that_do_not_match(tmp_path):
    q = {"w": torch.zeros(2, 2)}
    with pytest.raises(ConfigError, match="different weights"):
        lerp(q, {"v": torch.zeros(2, 2)}, 0.5)
    with pytest.raises(ConfigError, match="shape"):
        lerp(q, {"w": torch.zeros(3, 2)}, 0.5)
    with pytest.raises(ConfigError, match="LoRA"):
        lerp({"a.lora_A.weight": torch.zeros(1)}, {"a.lora_A.weight": torch.zeros(1)}, 0.5)
    with pytest.raises(ConfigError, match="finite"):
        lerp(q, q, float("nan"))
    with pytest.raises(ConfigError, match="merge.quality"):
        merge_runs(str(tmp_path / "none"), str(tmp_path / "none"), 0.5, str(tmp_path / "m"))


def test_a_few_steps_on_the_digits_teacher_have_finite_losses(tmp_path):
    """The experiment's config through the trainer: 3 steps of batch 8, every logged loss finite, the diversity
    reward logged and positive."""
    _, seen = logged_train(["experiment=digits_t2i_diverse_cfg", "trainer.steps=3", "trainer.batch_size=8",
                            "trainer.checkpoint_every=3", "eval.num_samples=16", "eval.teacher_steps=[1]"], tmp_path)
    assert len(seen) == 3
    assert all(float(logs["gen/diversity"]) > 0 for logs in seen)

    # the merge of a real run with itself is a run folder that loads (onestep eval / sample / export read it so)
    from onestep.runs import load_run

    merge_runs(str(tmp_path / "run"), str(tmp_path / "run"), 0.3, str(tmp_path / "merged"))
    run, merged = load_run(tmp_path / "run", torch.device("cpu")), load_run(tmp_path / "merged", torch.device("cpu"))
    assert merged.step == run.step == 3
    for (k, a), (_, b) in zip(run.generator.state_dict().items(), merged.generator.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=k)


def test_clip_diversity_is_each_samples_mean_cosine_distance_in_the_clip_image_embedding(tmp_path):
    """reward=clip_diversity (the diversity reward of real teachers' recipes) through the registry: row i scores
    mean_{j != i, same prompt} (1 - cos(E(x_i), E(x_j))) with E open_clip's image embedding, and is differentiable."""
    from test_reward_interface import _tiny_clip

    from onestep.config import RewardConfig
    from onestep.rewards.preprocess import to_model_input
    from onestep.rewards.registry import build_reward

    model, arch = _tiny_clip(tmp_path, "onestep-tiny-diversity-clip")
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    reward = build_reward(RewardConfig(name="clip_diversity", weights=str(tmp_path / "clip.pt"), model=str(arch)))
    images = torch.rand(5, 3, 40, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    prompts = ["a cat", "a dog", "a cat", "a cat", "a bird"]
    got = reward(images, prompts)
    with torch.no_grad():
        e = F.normalize(model.encode_image(to_model_input(images, 32)).double(), dim=-1)
    for i, p in enumerate(prompts):
        others = [j for j, q in enumerate(prompts) if q == p and j != i]
        want = sum(1 - float(e[i] @ e[j]) for j in others) / len(others) if others else 0.0
        assert float(got[i]) == pytest.approx(want, abs=1e-5), i
    x = images.clone().requires_grad_(True)
    reward(x, prompts).sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="reward.model"):
        build_reward(RewardConfig(name="clip_diversity", weights=str(tmp_path / "clip.pt")))
