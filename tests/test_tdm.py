"""TDM (onestep/objectives/tdm.py): the direction at a trajectory point against the exact Gaussian-mixture scores, the
trajectory point, fake-score loss and generator gradient against float64 transcriptions of the official demo
(Luo-Yihong/TDM train_tdm_demo.py), the student's own DDIM chain, the sampling-steps-aware t draw, bad input, and a
short ring run."""

from __future__ import annotations

import pytest
import torch

from onestep.core import Batch, Nets
from onestep.denoisers.gmm import GaussianMixture, GMMDenoiser, ring
from onestep.denoisers.nets import MLPDenoiser
from onestep.errors import ConfigError
from onestep.generator import Student
from onestep.objectives.tdm import TDM, TDMConfig, diffuse_step, fake_score_loss, importance_weight, tdm_direction
from onestep.sampling import sample
from onestep.schedules import make_schedule


def shifted_ring(shift=(0.3, -0.2)) -> GaussianMixture:
    r = ring()
    return GaussianMixture(r.means + torch.tensor(shift, dtype=torch.float64), r.covs * 4, torch.ones(8))


def demo_point(sched, x_ti, x0, t_i, s, t, n, clean):
    """train_tdm_demo.py:1120-1124 (ODE step of the student with its own eps, Predictor.add_noise, obtain_mixed_noise),
    written per row in float64; at the last step (clean) x_s is the student's x0."""
    a = lambda u: sched.alpha(u)[:, None]  # noqa: E731
    g = lambda u: sched.sigma(u)[:, None]  # noqa: E731
    eps = (x_ti - a(t_i) * x0) / g(t_i)
    a_s = torch.where(clean[:, None], torch.ones_like(a(s)), a(s))
    s_s = torch.where(clean[:, None], torch.zeros_like(g(s)), g(s))
    x_s = a_s * x0 + s_s * eps  # noise_scheduler.add_noise(model_latents, model_eps, timesteps_mid)
    beta = (g(t) ** 2 - (a(t) / a_s * s_s) ** 2) ** 0.5
    x_t = x_s / a_s * a(t) + beta * n  # Predictor.add_noise
    mixed = (eps / a_s * a(t) * s_s + beta * n) / g(t)  # Predictor.obtain_mixed_noise
    return x_t, mixed


def point(sched, seed=0, n=6, clean=None):
    gen = torch.Generator().manual_seed(seed)
    x_ti, x0, noise = (torch.randn(n, 2, generator=gen, dtype=torch.float64) for _ in range(3))
    t_i = torch.full((n,), 2.0, dtype=torch.float64)
    s = torch.full((n,), 0.7, dtype=torch.float64)
    t = torch.linspace(0.75, 1.9, n, dtype=torch.float64)
    clean = torch.tensor([False, True] * (n // 2)) if clean is None else clean
    return x_ti, x0, t_i, s, t, noise, clean


def test_trajectory_point_is_the_demos_and_x_t_is_a_diffusion_of_x0():
    """x_t and the mixed noise equal the demo's, fp64; x_t = alpha_t x0 + sigma_t m; at the last step m is the fresh
    noise itself, so the importance weight is 1 there and below 1 / above 1 elsewhere as the densities say."""
    sched = make_schedule("edm")
    x_ti, x0, t_i, s, t, n, clean = point(sched)
    p = diffuse_step(sched, x_ti, x0, t_i, s, clean, t, n)
    x_t, mixed = demo_point(sched, x_ti, x0, t_i, s, t, n, clean)
    assert torch.allclose(p.x_t, x_t, atol=1e-12) and torch.allclose(p.mixed, mixed, atol=1e-12)
    assert torch.allclose(p.x_t, p.alpha_t * x0 + p.sigma_t * p.mixed, atol=1e-12)
    assert torch.equal(p.mixed[clean], n[clean])
    w = importance_weight(p.mixed, p.fresh)
    demo_w = torch.exp(-0.5 * (mixed**2).mean(1)) / torch.exp(-0.5 * (n**2).mean(1))  # train_tdm_demo.py:1129
    assert torch.allclose(w, demo_w, rtol=1e-12) and torch.equal(w[clean], torch.ones(int(clean.sum()), dtype=w.dtype))


@pytest.mark.parametrize("schedule", ["edm", "vp_linear"])
def test_direction_is_the_exact_score_difference_at_the_trajectory_point(schedule):
    """With the exact ring as the real score and another exact mixture as the fake one, the direction at x_t is
    (sigma_t^2 / alpha_t)(s_fake - s_real) / mean|x0 - mu_real|, mu_real = (x_t + sigma_t^2 s_real) / alpha_t: the scores
    read through GMMDenoiser.score (the direct formula), fp64."""
    sched = make_schedule(schedule)
    real, fake = GMMDenoiser(ring(), sched), GMMDenoiser(shifted_ring(), sched)
    x_ti, x0, _, _, _, n, clean = point(sched, seed=3)
    u = lambda v: sched.t_from_unit(torch.full((6,), v, dtype=torch.float64))  # noqa: E731
    t = sched.t_from_unit(torch.linspace(0.45, 0.75, 6, dtype=torch.float64))
    p = diffuse_step(sched, x_ti, x0, u(0.8), u(0.4), clean, t, n)
    grad, _ = tdm_direction(real, fake, p)
    a_t, s_t = p.alpha_t, p.sigma_t
    s_real, s_fake = real.score(p.x_t, p.t), fake.score(p.x_t, p.t)
    mu_real = (p.x_t + s_t**2 * s_real) / a_t
    want = (s_t**2 / a_t) * (s_fake - s_real) / (x0 - mu_real).abs().mean(1, keepdim=True)
    assert torch.allclose(grad, want, rtol=1e-9, atol=1e-12), (grad - want).abs().max()
    assert grad.abs().max() > 1e-3  # the two mixtures differ: a real direction, not zero


def test_fake_score_loss_is_the_demos():
    """train_tdm_demo.py:1129-1134 in fp64: mean over rows of mean|fake_x0 - x0|^2 * min(SNR, 5) * w_IS."""
    sched = make_schedule("edm")
    critic = GMMDenoiser(shifted_ring(), sched)
    x_ti, x0, t_i, s, t, n, clean = point(sched, seed=5, n=8)
    t = torch.tensor([0.75, 0.9, 1.2, 1.5, 0.3, 0.5, 1.9, 0.8], dtype=torch.float64)  # SNR on both sides of 5
    p = diffuse_step(sched, x_ti, x0, t_i, s.clamp_max(0.25), clean, t, n)
    snr = (sched.alpha(t) / sched.sigma(t)) ** 2
    is_weight = torch.exp(-0.5 * (p.mixed**2).mean(1)) / torch.exp(-0.5 * (n**2).mean(1))
    want = (((critic.x0(p.x_t, t) - x0) ** 2).mean(1) * torch.minimum(snr, torch.full_like(snr, 5.0)) * is_weight).mean()
    assert bool((snr > 5).any() and (snr < 5).any())
    assert torch.allclose(fake_score_loss(critic, p, snr_clamp=5.0), want, rtol=1e-12)


def tiny_run(steps=3, dtype=torch.float64, **cfg):
    torch.manual_seed(0)
    sched = make_schedule("edm")
    g = MLPDenoiser(sched, 2, hidden=16, depth=1).to(dtype)
    student = Student(sched, steps=steps, method="ddim", sigma_init=2.0)
    obj = TDM(TDMConfig(**cfg), student.train_sample)
    nets = Nets(teacher=GMMDenoiser(ring(), sched), generator=g, critic=GMMDenoiser(shifted_ring(), sched))
    return obj, nets, Batch(noise=torch.randn(16, 2, dtype=dtype)), student


def test_generator_gradient_is_half_the_demos():
    """The demo's generator loss mean(|x0 - sg(x0 + mu_real - mu_fake)|^2 / mean|x0 - mu_real|)
    (train_tdm_demo.py:1174-1187) on the same trajectory draw has exactly twice the gradient of objective=tdm's, fp64."""
    obj, nets, batch, _ = tiny_run()
    params = list(nets.generator.parameters())
    torch.manual_seed(7)
    ours = torch.autograd.grad(obj.generator_loss(nets, batch, 0)["loss"], params)
    torch.manual_seed(7)
    p = obj.trajectory_point(nets, batch)
    with torch.no_grad():
        real, fake = nets.teacher.x0(p.x_t, p.t), nets.critic.x0(p.x_t, p.t)
    coop = p.x0.detach() + (real - fake)
    w = (p.x0.detach() - real).abs().mean(1, keepdim=True)
    demo = torch.autograd.grad(((p.x0 - coop) ** 2 / w).mean(), params)
    assert len(set(p.step.tolist())) > 1  # rows at several steps of the trajectory
    for a, b in zip(ours, demo):
        assert torch.allclose(2 * a, b, rtol=1e-9, atol=1e-14)


def test_rows_start_from_the_students_own_ddim_chain():
    """Row r at step i reads x_{t_i} of the student's deterministic sampler from its own noise, and x0 = G(x_{t_i}, t_i)."""
    obj, nets, batch, student = tiny_run(steps=3)
    torch.manual_seed(1)
    p = obj.trajectory_point(nets, batch)
    states = []
    sample(nets.generator, batch.noise, student.ts, method="ddim", callback=lambda j, x, x0: states.append(x))
    ts = student.ts.to(batch.noise)
    for r, i in enumerate(p.step.tolist()):
        x0 = nets.generator.x0(states[i][r:r + 1], ts[i].expand(1))
        assert torch.allclose(p.x0[r], x0[0], atol=1e-12), (r, i)
    assert set(p.step.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("within", [True, False])
def test_t_lies_in_the_steps_segment_or_above_it(within):
    """t_within_step (the demo's --use_separate): t in [s, t_i) for step i (s = t_{i+1}, 0 at the last step); else in
    [s, t(t_hi)]."""
    obj, nets, batch, student = tiny_run(steps=3, t_within_step=within)
    torch.manual_seed(2)
    p = obj.trajectory_point(nets, batch)
    ts = student.ts.tolist() + [0.0]
    top = float(nets.generator.schedule.t_from_unit(torch.tensor(0.99, dtype=torch.float64)))
    for i, t in zip(p.step.tolist(), p.t.tolist()):
        hi = ts[i] if within else top
        assert ts[i + 1] <= t <= hi + 1e-9, (i, t)


def test_bad_input_fails_in_one_line():
    from conftest import compose, one_line

    from onestep.objectives.base import make_objective

    with pytest.raises(ConfigError) as e:
        make_objective(compose(["experiment=gmm_tdm", "objective.snr_clamp=0"]).objective, None)
    assert "objective.snr_clamp=0" in one_line(e)
    gc = compose(["experiment=gmm_tdm", "generator.method=renoise"]).generator
    with pytest.raises(ConfigError) as e:
        TDM.shaped(gc, MLPDenoiser(make_schedule("edm"), 2, hidden=8, depth=1))
    assert "generator.method=ddim" in one_line(e)
    obj = make_objective(compose(["experiment=gmm_tdm"]).objective, lambda nets, batch: batch.noise)
    with pytest.raises(ConfigError) as e:
        obj.student
    assert "Student" in one_line(e)


@pytest.mark.parametrize("args, key", [(["experiment=gmm_tdm", "generator.method=renoise"], "generator.method"),
                                       (["experiment=gmm_tdm", "objective.t_hi=0.3"], "objective.t_hi"),
                                       (["experiment=gmm_tdm", "objective.snr_clamp=-1"], "objective.snr_clamp")])
def test_cli_bad_input_is_one_line_and_leaves_no_run_folder(tmp_path, capsys, monkeypatch, args, key):
    """The README's "Bad input" contract: exit status 2, one stderr line naming the key, no run folder left."""
    from conftest import CLI_SMALL, cli_bad_input

    assert key in cli_bad_input([*args, *CLI_SMALL], tmp_path / "runs", capsys, monkeypatch)


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """A tiny 2-step gmm_tdm run killed after step 7 and rerun ends with the straight run's generator and critic: the
    trajectory draws (step per row, t, noise) come from the trainer's per-step RNG."""
    from conftest import compose, train_straight_and_resumed
    from safetensors.torch import load_file

    from onestep.checkpoint import list_checkpoints

    tiny = ["experiment=gmm_tdm", "teacher.net_steps=40", "teacher.net_hidden=32", "trainer.steps=12",
            "trainer.batch_size=64", "trainer.checkpoint_every=4", "trainer.progress=false", "eval.num_samples=256",
            "eval.teacher_steps=[2]", "eval.plot=false"]
    straight, resumed = train_straight_and_resumed(compose(tiny), tmp_path, stop_at=7)
    a, b = list_checkpoints(straight)[-1], list_checkpoints(resumed)[-1]
    for name in ("generator", "critic"):
        wa, wb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


@pytest.mark.slow
def test_tdm_ring_beats_the_teachers_one_step_sampler(tmp_path):
    """experiment=gmm_tdm (a 2-step student trained 400 steps): sampled in 1 step, it covers all 8 modes with a
    sliced-W2 far below the teacher's own 1-step sampler (the mixture mean, ~0.70); one seed measured 0.116."""
    from conftest import ring_run_beats_one_step_teacher

    ring_run_beats_one_step_teacher(["experiment=gmm_tdm"], tmp_path, 3, "tdm")
