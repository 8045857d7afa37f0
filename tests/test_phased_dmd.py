"""Phased DMD (onestep/objectives/phased_dmd.py, onestep/denoisers/experts.py): the sub-interval score-matching target
on a Gaussian (closed form) and as the paper's eq. (13), the t -> expert router, the reduction to DMD at the last
phase, the phase schedule, bad input, and a short 2-phase classes16 run."""

from __future__ import annotations

import pytest
import torch

from onestep.conditioning import Labels
from onestep.core import Batch, Nets, dsm_loss
from onestep.denoisers.base import Denoiser
from onestep.denoisers.experts import PhaseExperts
from onestep.denoisers.nets import MLPDenoiser
from onestep.errors import ConfigError
from onestep.generator import Student
from onestep.objectives.distribution_matching import dmd_gradient
from onestep.objectives.phased_dmd import (PhasedDMD, PhasedDMDConfig, phased_dmd_gradient, subinterval_dsm,
                                           subinterval_x0_target, transition)
from onestep.sampling import sample
from onestep.schedules import make_schedule


@pytest.mark.parametrize("schedule", ["edm", "vp_linear", "rectified_flow"])
def test_subinterval_target_has_the_posterior_mean_on_a_gaussian(schedule):
    """x0 ~ N(m, c^2), x_s its diffusion at s, x_t = alpha_{t|s} x_s + sigma_{t|s} eps: the target's mean given x_t
    (eps | x_t is Gaussian: E[eps | x_t] = sigma_{t|s} (x_t - alpha_t m) / (alpha_t^2 c^2 + sigma_t^2)) is the exact
    posterior mean E[x0 | x_t] = (m sigma_t^2 + alpha_t c^2 x_t) / (alpha_t^2 c^2 + sigma_t^2), fp64. Treating x_s as
    data (the "biased" objective the paper rules out) gives another function. At s = clean it is x0 itself."""
    sched = make_schedule(schedule)
    m, c = torch.tensor([0.7, -1.2, 0.1], dtype=torch.float64), torch.tensor([0.5, 1.5, 0.9], dtype=torch.float64)
    x_t = torch.linspace(-3, 3, 12, dtype=torch.float64).view(4, 3)
    for us, ut in [(0.2, 0.5), (0.45, 0.47), (0.1, 0.95)]:
        s = sched.t_from_unit(torch.full((4,), us, dtype=torch.float64))
        t = sched.t_from_unit(torch.full((4,), ut, dtype=torch.float64))
        a_t, s_t, a_ts, s_ts = transition(sched, t, s, x_t)
        var = a_t**2 * c**2 + s_t**2
        eps_given_x = s_ts * (x_t - a_t * m) / var
        posterior = (m * s_t**2 + a_t * c**2 * x_t) / var
        got = subinterval_x0_target(sched, x_t, eps_given_x, t, s)  # linear in eps: its conditional mean
        assert torch.allclose(got, posterior, atol=1e-12, rtol=1e-10), (schedule, us, ut)
        # the biased target (x_s regressed as if it were clean data) has mean E[x_s | x_t], another function
        biased = (x_t - s_ts * eps_given_x) / a_ts
        assert ut > 0.9 or not torch.allclose(biased, posterior, atol=1e-9)
    x0, eps = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    t = sched.t_from_unit(torch.full((4,), 0.6, dtype=torch.float64))
    x_t = sched.alpha(t)[:, None] * x0 + sched.sigma(t)[:, None] * eps
    assert torch.allclose(subinterval_x0_target(sched, x_t, eps, t, None), x0, atol=1e-12)


def test_subinterval_target_is_the_papers_eq13_on_rectified_flow():
    """On rectified flow (alpha = 1 - t, sigma = t) the x0 target, read as a velocity u = eps_total - x0, is the paper's
    eq. (13) transcribed: ((alpha_s^2 sigma_t + alpha_t sigma_s^2) / (alpha_s^2 sigma_{t|s})) eps - x_s / alpha_s."""
    sched = make_schedule("rectified_flow")
    x_s, eps = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    s = torch.tensor([0.1, 0.3, 0.5, 0.2, 0.7, 0.05], dtype=torch.float64)
    t = torch.tensor([0.4, 0.35, 0.9, 0.21, 0.99, 0.6], dtype=torch.float64)
    a_s, s_s, a_t, s_t = (v[:, None] for v in (1 - s, s, 1 - t, t))
    s_ts = torch.sqrt(s_t**2 - (a_t / a_s) ** 2 * s_s**2)
    x_t = (a_t / a_s) * x_s + s_ts * eps
    paper = (a_s**2 * s_t + a_t * s_s**2) / (a_s**2 * s_ts) * eps - x_s / a_s
    x0 = subinterval_x0_target(sched, x_t, eps, t, s)
    ours = (x_t - a_t * x0) / s_t - x0  # u = eps_total - x0 on rectified flow
    assert torch.allclose(ours, paper, atol=1e-10), (ours - paper).abs().max()


class Tagged(Denoiser):
    """x0 = x_t * scale + tag: which expert ran is visible, and scale takes gradients."""

    prediction = "x0"

    def __init__(self, sched):
        super().__init__()
        self.schedule, self.data_shape = sched, (2,)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.register_buffer("tag", torch.zeros(()))

    def forward(self, x_t, t, cond=None):
        return x_t * self.scale + self.tag


def tagged_experts(k=3, method="ddim"):
    sched = make_schedule("edm")
    ts = Student(sched, k, method=method, sigma_init=1.0).ts
    moe = PhaseExperts(Tagged(sched), ts.tolist(), method)
    for i, e in enumerate(moe.experts):
        e.tag.fill_(float(i + 1))
    return moe, ts


def test_experts_route_step_i_to_expert_i():
    """The sampler's t_i (cast to fp32, the batch's dtype) runs expert i; times between t_i and t_{i-1} too, above t_0
    expert 0, below t_{k-1} the last; a loss on step i's rows puts gradient on expert i only; the student's k-step
    sample equals the chain expert 0, 1, ..., k-1."""
    moe, ts = tagged_experts(3)
    for dtype in (torch.float32, torch.float64):
        t = ts.to(dtype)
        assert moe.route(t).tolist() == [0, 1, 2]
        mid = 0.5 * (ts[1:] + ts[:-1]).to(dtype)
        assert moe.route(mid).tolist() == [1, 2]
        assert moe.route(torch.tensor([float(ts[0]) * 2, float(ts[-1]) / 2], dtype=dtype)).tolist() == [0, 2]
    x = torch.zeros(3, 2)
    assert moe(x, ts.to(torch.float32), None)[:, 0].tolist() == [1.0, 2.0, 3.0]
    for i in range(3):
        moe.zero_grad()
        moe(torch.ones(3, 2), ts.to(torch.float32), None)[i].sum().backward()
        assert [e.scale.grad is not None and float(e.scale.grad) != 0 for e in moe.experts] == [k == i for k in
                                                                                                range(3)]
    noise = torch.randn(5, 2)
    got = sample(moe, noise, ts, method="ddim")
    sched, x = moe.schedule, noise * moe.schedule.prior_std(ts[0]).float()
    for i in range(3):
        e = moe.experts[i]
        x0 = e.x0(x, ts[i].float().expand(5))
        if i < 2:
            a_t, s_t, a_s, s_s = (v.float() for v in (sched.alpha(ts[i]), sched.sigma(ts[i]), sched.alpha(ts[i + 1]),
                                                        sched.sigma(ts[i + 1])))
            x = a_s * x0 + s_s * (x - a_t * x0) / s_t
    assert torch.allclose(got, x0, atol=1e-6)


def nets_and_batch(experts=2, classes=3, n=32):
    torch.manual_seed(0)
    sched = make_schedule("edm")
    teacher = MLPDenoiser(sched, 4, hidden=16, depth=1, num_classes=classes)
    ts = Student(sched, experts, method="ddim", sigma_init=1.0).ts.tolist()
    gen = PhaseExperts(MLPDenoiser(sched, 4, hidden=16, depth=1, num_classes=classes), ts, "ddim")
    critic = PhaseExperts(MLPDenoiser(sched, 4, hidden=16, depth=1, num_classes=classes), ts, "ddim")
    batch = Batch(noise=torch.randn(n, 4), cond=Labels(torch.arange(n) % classes, classes))
    return Nets(teacher=teacher, generator=gen, critic=critic), batch


def test_last_phase_is_dmd_and_plain_dsm():
    """At s = clean (the last phase) the generator direction is dmd_gradient's and the fake-score loss is
    dsm_loss(weighting="edm")'s, for the same t and noise."""
    nets, batch = nets_and_batch()
    x = torch.randn(32, 4)
    t = nets.teacher.schedule.t_from_unit(torch.rand(32, dtype=torch.float64)).float()
    eps = torch.randn(32, 4)
    ours, _ = phased_dmd_gradient(nets.teacher, nets.critic, x, None, batch.cond, t=t, eps=eps)
    dmd, _ = dmd_gradient(nets.teacher, nets.critic, x, batch.cond, t=t, eps=eps)
    assert torch.allclose(ours, dmd, atol=1e-5, rtol=1e-4), (ours - dmd).abs().max()
    a = subinterval_dsm(nets.critic, x, None, batch.cond, t=t, eps=eps)
    b = dsm_loss(nets.critic, x, batch.cond, weighting="edm", t=t, eps=eps)
    assert torch.allclose(a, b, rtol=1e-5), (a, b)


def test_subinterval_dsm_is_the_weighted_regression_on_the_target():
    """Inside a phase the fake-score loss is EDM's lambda(t) sigma_{t|s}^2 / sigma_t^2 ||D(x_t) - x0*||^2 (mean), with
    x_t = alpha_{t|s} x_s + sigma_{t|s} eps and x0* of eq. (13), transcribed in fp64."""
    nets, batch = nets_and_batch()
    critic = nets.critic.double()
    sched = critic.schedule
    x_s, eps = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)
    s = torch.full((32,), 0.3, dtype=torch.float64)
    t = sched.t_from_unit(torch.rand(32, dtype=torch.float64) * 0.5 + 0.45)
    got = subinterval_dsm(critic, x_s, s, batch.cond, t=t, eps=eps)
    a_t, s_t = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    a_s, s_s = sched.alpha(s)[:, None], sched.sigma(s)[:, None]
    s_ts2 = s_t**2 - (a_t / a_s) ** 2 * s_s**2
    x_t = (a_t / a_s) * x_s + s_ts2.sqrt() * eps
    target = (x_t - s_t**2 / s_ts2.sqrt() * eps) / a_t
    sig2 = (s_t / a_t) ** 2
    lam = (sig2 + 0.25) / (sig2 * 0.25) * s_ts2 / s_t**2
    want = (lam * (critic.x0(x_t, t, batch.cond) - target) ** 2).mean()
    assert torch.allclose(got, want, rtol=1e-10), (got, want)


def test_phase_direction_is_the_x_s_space_score_difference():
    """Inside a phase (s = t_1) the direction is (sigma_{t|s}^2 / alpha_{t|s}) (s_fake - s_real) over DMD's
    normalizer in x_s space, with the scores transcribed from the x0 predictions (score = (alpha_t mu - x_t) /
    sigma_t^2), fp64."""
    nets, batch = nets_and_batch()
    nets = Nets(teacher=nets.teacher.double(), generator=nets.generator, critic=nets.critic.double())
    sched = nets.teacher.schedule
    x_s, eps = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)
    s = torch.full((32,), 0.4, dtype=torch.float64)
    t = sched.t_from_unit(torch.rand(32, dtype=torch.float64) * 0.4 + 0.55)
    grad, _ = phased_dmd_gradient(nets.teacher, nets.critic, x_s, s, batch.cond, t=t, eps=eps)
    a_t, s_t = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    a_s, s_s = sched.alpha(s)[:, None], sched.sigma(s)[:, None]
    a_ts = a_t / a_s
    s_ts2 = s_t**2 - a_ts**2 * s_s**2
    x_t = a_ts * x_s + s_ts2.sqrt() * eps
    score_real = (a_t * nets.teacher.x0(x_t, t, batch.cond) - x_t) / s_t**2
    score_fake = (a_t * nets.critic.x0(x_t, t, batch.cond) - x_t) / s_t**2
    xs_real = (x_t + s_ts2 * score_real) / a_ts
    want = (s_ts2 / a_ts) * (score_fake - score_real) / (x_s - xs_real).abs().mean(1, keepdim=True)
    assert torch.allclose(grad, want, atol=1e-10), (grad - want).abs().max()


def test_phases_train_their_own_expert():
    """Phase 0 (steps < phase_length) puts gradient on expert 0 only and phase 1 on expert 1 only, for the generator
    loss; phase 0's output x_{t_1} is the ddim step from expert 0's x0; the phase index is logged."""
    nets, batch = nets_and_batch()
    obj = PhasedDMD(PhasedDMDConfig(phase_length=3), lambda n, b: None)
    for step, phase in [(0, 0), (2, 0), (3, 1), (50, 1)]:
        nets.generator.zero_grad()
        out = obj.generator_loss(nets, batch, step)
        out["loss"].backward()
        moved = [any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in e.parameters())
                 for e in nets.generator.experts]
        assert moved == [k == phase for k in range(2)], (step, moved)
        assert float(out["phase"]) == phase
    with torch.no_grad():
        x_s, s = obj.phase_sample(nets, batch, 0)
        g, ts = nets.generator, torch.tensor(nets.generator.phase_ts)
        sched = g.schedule
        x = batch.noise * sched.prior_std(ts[0]).float()
        x0 = g.experts[0].x0(x, ts[0].float().expand(32), batch.cond)
        want = sched.alpha(ts[1]).float() * x0 + sched.sigma(ts[1]).float() * (x - sched.alpha(ts[0]).float() * x0) \
            / sched.sigma(ts[0]).float()
    assert torch.allclose(x_s, want, atol=1e-6) and torch.allclose(s, ts[1].float().expand(32))
    crit = obj.critic_loss(nets, batch, 0)
    assert torch.isfinite(crit["loss"])
    t = obj.draw_t(sched, s, x_s)
    assert bool((t > s).all())  # the sub-interval (t_1, 1]


def test_bad_input_fails_in_one_line():
    sched = make_schedule("edm")
    for bad, key in [(dict(phase_length=0), "phase_length"), (dict(t_lo=0.5, t_hi=0.4), "t_lo"),
                     (dict(discriminator="critic"), "discriminator")]:
        with pytest.raises(ConfigError, match=key) as e:
            PhasedDMD(PhasedDMDConfig(**bad), lambda n, b: None)
        assert "\n" not in str(e.value)
    net = MLPDenoiser(sched, 4, hidden=16, depth=1)
    with pytest.raises(ConfigError, match="generator.experts"):
        PhasedDMD(PhasedDMDConfig(), lambda n, b: None).generator_loss(Nets(teacher=net, generator=net, critic=net),
                                                                       Batch(noise=torch.randn(4, 4)), 0)
    with pytest.raises(ConfigError, match="generator.steps"):
        PhaseExperts(net, [80.0], "ddim")


def test_experiment_keys_are_checked():
    from conftest import compose
    from onestep.experiment import shape_student
    from onestep.objectives.dmd2 import DMD2

    sched = make_schedule("edm")
    net = MLPDenoiser(sched, 4, hidden=16, depth=1)
    cfg = compose(["experiment=gmm_phased_dmd", "generator.steps=3"])
    with pytest.raises(ConfigError, match="generator.steps=2") as e:
        shape_student(cfg.generator, net, PhasedDMD)
    assert "\n" not in str(e.value)
    moe = shape_student(compose(["experiment=gmm_phased_dmd"]).generator, net, PhasedDMD)
    assert isinstance(moe, PhaseExperts) and moe.num_experts == 2 and moe.phase_method == "ddim"
    # the experts are phased_dmd's shape: under another objective the key is refused, not ignored
    with pytest.raises(ConfigError, match="generator.experts=2 shapes the generator of objective=phased_dmd") as e:
        shape_student(compose(["experiment=gmm_phased_dmd"]).generator, net, DMD2)
    assert "\n" not in str(e.value)
    plain = shape_student(compose(["experiment=gmm_dmd2"]).generator, net, DMD2)
    assert plain is net


def test_export_refuses_a_phased_run_in_one_line(tmp_path):
    from pathlib import Path
    from types import SimpleNamespace

    from onestep.export.pipelines import export

    cfg = SimpleNamespace(generator=SimpleNamespace(students=1, experts=2), trainer=SimpleNamespace(steps=1),
                          objective=SimpleNamespace(name="phased_dmd"))
    run = SimpleNamespace(finished=True, cfg=cfg, path=Path(tmp_path / "run"), step=1)
    with pytest.raises(ConfigError) as e:
        export(run, tmp_path / "exported")
    assert "\n" not in str(e.value) and "generator.experts=2" in str(e.value)


@pytest.mark.parametrize("args, key", [(["experiment=gmm_phased_dmd", "generator.steps=3"], "generator.experts")])
def test_cli_bad_input_is_one_line_and_leaves_no_run_folder(tmp_path, capsys, monkeypatch, args, key):
    """The README's "Bad input" row: exit status 2, one stderr line naming the key, the new run folder taken back."""
    from conftest import CLI_SMALL, cli_bad_input

    assert key in cli_bad_input([*args, *CLI_SMALL], tmp_path / "runs", capsys, monkeypatch)


@pytest.mark.slow
def test_classes16_phased_dmd_two_phases(tmp_path):
    """experiment=gmm_phased_dmd shortened (250 steps, phase 0 for 100): the 2-expert 2-step student covers all 20
    modes with sliced-W2 below 0.6 x the teacher's 1-step DDIM (measured 0.41 x); the two experts differ from each
    other."""
    from conftest import compose
    from onestep.train.trainer import train

    ov = ["experiment=gmm_phased_dmd", "teacher.net_steps=500", "trainer.steps=250", "objective.phase_length=100",
          "trainer.progress=false", "trainer.checkpoint_every=1000", "eval.teacher_steps=[1]",
          "eval.num_samples=2000", "eval.plot=false"]
    out = train(compose(ov), tmp_path)
    rows = {(r["model"], r["steps"]): r for r in out["rows"]}
    s, t1 = rows[("student", 2)], rows[("teacher", 1)]
    print(f"\nphased_dmd (2 experts) 2-step sliced-W2 {s['sliced_w2']:.4f}, modes {s['modes_covered']}/20 (teacher "
          f"1-step {t1['sliced_w2']:.4f})")
    assert s["modes_covered"] == 20 and s["sliced_w2"] <= 0.6 * t1["sliced_w2"], (s, t1)  # measured 0.104 / 0.255
    moe = out["networks"].unwrapped("generator_ema").net
    assert isinstance(moe, PhaseExperts) and moe.num_experts == 2
    flat = [torch.cat([p.detach().flatten() for p in e.parameters()]) for e in moe.experts]
    assert not torch.allclose(flat[0], flat[1])
