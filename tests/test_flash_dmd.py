"""objective=flash_dmd (onestep/objectives/flash_dmd.py): the generator loss against a float64 transcription of
Flash-DMD's stage 2 on a Gaussian (DMD's gradient on the high-noise range + lambda_RL times the mean reward), the RL
term's gradient against its closed form on a Gaussian generator, the split and reward checks, and a few steps of the
digits experiment through the trainer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import logged_train, one_line
from onestep.conditioning import Cond
from onestep.core import Batch, Nets
from onestep.denoisers.gmm import GaussianMixture, GMMDenoiser
from onestep.errors import ConfigError
from onestep.objectives import make_objective
from onestep.objectives.flash_dmd import FlashDMDConfig
from onestep.schedules import make_schedule

D = 3


class TextBlind(GMMDenoiser):
    """The exact denoiser of a Gaussian, for a batch whose conditioning carries prompts (which it ignores)."""

    def forward(self, x_t, t, cond=None):
        return super().forward(x_t, t, None)


class Closeness(torch.nn.Module):
    """r(x, prompt) = -||x - a||^2 / D: a differentiable reward with a known gradient."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, images, prompts):
        assert len(prompts) == images.shape[0]
        return -(images - self.a).pow(2).flatten(1).mean(1)


def gaussian(mean: float, std: float, sched) -> TextBlind:
    mix = GaussianMixture(torch.full((1, D), float(mean)), std**2 * torch.eye(D, dtype=torch.float64)[None], [1.0])
    return TextBlind(mix, sched)


def posterior_mean(m: float, c: float, a, s, x_t):
    """E[x0 | x_t] for x0 ~ N(m, c^2 I), x_t = a x0 + s eps."""
    return m + a * c**2 * (x_t - a * m) / (a**2 * c**2 + s**2)


def objective(generate, reward, **kw):
    obj = make_objective(FlashDMDConfig(**kw), generate)
    obj.build_modules(SimpleNamespace(reward=reward, codec=None, conditioner=object(), student_init=None))
    return obj


def prompts(n):
    return Cond({"e": torch.zeros(n, 1)}, {"e": torch.zeros(1, 1)}, texts=[f"p{i}" for i in range(n)])


def test_generator_loss_is_the_float64_transcription_of_dm_plus_rl():
    sched = make_schedule("vp_linear")
    real, fake = gaussian(0.0, 1.0, sched), gaussian(0.7, 0.5, sched)
    n, lam, a = 6, 0.3, 0.4
    x = (0.7 + 0.5 * torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    x.requires_grad_(True)
    obj = objective(lambda nets, batch: x, Closeness(a), rl_weight=lam, rl_start=3)
    nets = Nets(teacher=real, generator=None, critic=fake)
    batch = Batch(noise=torch.zeros(n, D), cond=prompts(n))
    torch.manual_seed(5)
    out = obj.generator_loss(nets, batch, step=3)
    (g,) = torch.autograd.grad(out["loss"], x)

    # by hand: u ~ U[t_lo, t_hi] = U[0.5, 0.98] (the high-noise range), one eps, DMD eq. (7)-(8), minus lambda E[r]
    torch.manual_seed(5)
    t = sched.t_from_unit(0.5 + 0.48 * torch.rand(n, dtype=torch.float64))
    eps = torch.randn(n, D, dtype=torch.float64)
    al, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    xd = x.detach()
    x_t = al * xd + s * eps
    mu_real, mu_fake = posterior_mean(0.0, 1.0, al, s, x_t), posterior_mean(0.7, 0.5, al, s, x_t)
    grad = (mu_fake - mu_real) / (xd - mu_real).abs().mean(1, keepdim=True)
    r = -(xd - a).pow(2).mean(1)
    want = 0.5 * grad.pow(2).mean() - lam * r.mean()
    want_g = grad / grad.numel() + lam * 2 * (xd - a) / (D * n)
    assert float(out["loss"].detach()) == pytest.approx(float(want), rel=1e-7)
    assert float(out["reward"]) == pytest.approx(float(r.mean()), rel=1e-12)
    torch.testing.assert_close(g, want_g, rtol=1e-7, atol=1e-12)  # (the critic's mean 0.7 is stored in fp32)

    before = obj.generator_loss(nets, batch, step=2)  # stage 1: distillation alone
    assert "reward" not in before


def test_rl_gradient_equals_its_closed_form_on_a_gaussian_generator():
    """x = mu + sigma z, teacher = critic (the DM direction is 0): d/dmu of -lambda E[-||x - a||^2 / D] is
    2 lambda (mu - a) / D, which the batch estimate reaches up to its Monte Carlo error."""
    sched = make_schedule("vp_linear")
    same = gaussian(0.0, 1.0, sched)
    mu = torch.full((D,), 0.9, dtype=torch.float64, requires_grad=True)
    n, lam, a, sigma = 20000, 0.5, -0.2, 0.3
    z = torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    obj = objective(lambda nets, batch: mu + sigma * z, Closeness(a), rl_weight=lam)
    out = obj.generator_loss(Nets(teacher=same, generator=None, critic=same), Batch(torch.zeros(n, D), prompts(n)), 0)
    (g,) = torch.autograd.grad(out["loss"], mu)
    want = 2 * lam * (mu.detach() - a) / D
    torch.testing.assert_close(g, want, rtol=0, atol=4 * 2 * lam * sigma / D / n**0.5)


def test_bad_flash_dmd_input_is_one_line():
    with pytest.raises(ConfigError) as e:
        objective(None, None, discriminator="critic", gan_weight=0.01, gan_t_hi=0.7, t_lo=0.5)
    assert "objective.gan_t_hi=0.7 > objective.t_lo=0.5" in one_line(e)
    with pytest.raises(ConfigError) as e:
        objective(None, None, rl_weight=0.1)
    assert "objective=flash_dmd tunes the generator toward a reward: pass reward=digits_class" in one_line(e)
    with pytest.raises(ConfigError) as e:
        objective(None, Closeness(0.0), rl_weight=-1)
    assert "objective.rl_weight=-1" in one_line(e)


def test_digits_experiment_runs_both_stages_with_finite_losses(tmp_path):
    out, seen = logged_train(["experiment=digits_t2i_flash_dmd", "trainer.steps=2", "objective.rl_start=1",
                              "trainer.batch_size=4", "trainer.checkpoint_every=2", "eval.num_samples=32",
                              "eval.teacher_steps=[1]", "eval.plot=false"], tmp_path)
    assert "gen/reward" in seen[1] and "gen/reward" not in seen[0] and "gen/gan_g" in seen[0]
    student = next(r for r in out["rows"] if r["model"] == "student")
    assert student["reward_name"] == "digits_class" and student["reward"] < 0
