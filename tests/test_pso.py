"""objective=pso (onestep/objectives/pso.py): L_PSO against a float64 transcription of the pairwise loss, its gradient
against the closed form for a constant-prediction student, the pairs ranked by the reward, the generator loss end to
end on exact Gaussian denoisers, the starting student read from another run, the one-line errors, and a few steps of
the digits experiment through the trainer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from conftest import logged_train, one_line
from onestep.core import Batch, Nets
from onestep.errors import ConfigError
from onestep.objectives import make_objective
from onestep.objectives.pso import REFERENCE, PSOConfig, pso_loss
from test_flash_dmd import D, Closeness, gaussian, prompts


def _pso(generate, reward=None, **kw):
    obj = make_objective(PSOConfig(**kw), generate)
    obj.build_modules(SimpleNamespace(reward=reward, codec=None, conditioner=object()))
    return obj


def _tensors(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 2, 3, generator=g, dtype=torch.float64) for _ in range(6)]


def test_pso_loss_is_the_float64_transcription():
    pw, pl, rw, rl, xw, xl = _tensors()
    beta = 7.0
    got, d = pso_loss(pw, pl, rw, rl, xw, xl, beta)
    want = 0.0
    for i in range(4):  # -log sigmoid(-beta ([e(pw) - e(rw)] - [e(pl) - e(rl)])), e = mean squared error per sample
        e = [float(((p[i] - x[i]) ** 2).sum()) / 6 for p, x in ((pw, xw), (rw, xw), (pl, xl), (rl, xl))]
        di = (e[0] - e[1]) - (e[2] - e[3])
        assert float(d[i]) == pytest.approx(di, rel=1e-12)
        want += -math.log(1 / (1 + math.exp(beta * di))) / 4
    assert float(got) == pytest.approx(want, rel=1e-12)


def test_pso_gradient_equals_the_closed_form_of_a_constant_student():
    """A student that predicts theta for every input: dL/dtheta = beta sigmoid(beta d) 2 (x^l - x^w) / D per pair
    (the reference's terms are constants); descending it moves theta toward x^w and away from x^l."""
    _, _, rw, rl, xw, xl = _tensors(n=1, seed=3)
    theta = torch.zeros(1, 2, 3, dtype=torch.float64, requires_grad=True)
    beta = 3.0
    loss, d = pso_loss(theta, theta, rw, rl, xw, xl, beta)
    (g,) = torch.autograd.grad(loss, theta)
    want = beta * torch.sigmoid(beta * d.detach()) * 2 * (xl - xw) / 6
    torch.testing.assert_close(g, want, rtol=1e-12, atol=0)


def test_pairs_are_ranked_by_the_reward():
    n = 64
    noise = torch.randn(n, D, dtype=torch.float64)
    obj = _pso(lambda nets, batch: batch.noise, Closeness(0.0))
    torch.manual_seed(0)
    x_w, x_l, keep, logs = obj.pair(None, Batch(noise=noise, cond=prompts(n)))
    r = Closeness(0.0)
    assert (r(x_w, [""] * n) >= r(x_l, [""] * n)).all() and float(logs["reward_gap"]) > 0
    assert keep.all() and float(logs["pso_pairs"]) == 1.0  # objective.tie=0: every pair counts
    torch.manual_seed(0)
    other = torch.randn_like(noise)  # the second sample's noise, drawn in the trainer's RNG
    assert torch.equal(torch.where((r(noise, [""] * n) >= r(other, [""] * n))[:, None], noise, other), x_w)


def test_ties_add_nothing_to_the_loss():
    """objective.tie: pairs whose reward gap is under it are ties, their L_PSO terms 0 in the batch's mean (float64
    transcription); the pairs over it are ranked as before."""
    pw, pl, rw, rl, xw, xl = _tensors()
    keep = torch.tensor([True, False, True, False])
    got, d = pso_loss(pw, pl, rw, rl, xw, xl, 7.0, keep)
    want = sum(-math.log(1 / (1 + math.exp(7.0 * float(d[i])))) for i in (0, 2)) / 4
    assert float(got) == pytest.approx(want, rel=1e-12)

    n = 64
    noise = torch.randn(n, D, dtype=torch.float64)
    r = Closeness(0.0)
    obj = _pso(lambda nets, batch: batch.noise, r, tie=0.5)
    torch.manual_seed(0)
    x_w, x_l, keep, logs = obj.pair(None, Batch(noise=noise, cond=prompts(n)))
    torch.manual_seed(0)
    gap = (r(noise, [""] * n) - r(torch.randn_like(noise), [""] * n)).abs()
    assert torch.equal(keep, gap >= 0.5) and 0 < int(keep.sum()) < n
    assert float(logs["pso_pairs"]) == pytest.approx(float(keep.double().mean()))
    assert (r(x_w, [""] * n) >= r(x_l, [""] * n)).all()


def test_generator_loss_on_exact_gaussians_is_the_transcription():
    """Student and reference exact Gaussian denoisers (their x0 predictions in closed form): the objective's loss is
    L_PSO of the pairs at its own t and eps draw."""
    from onestep.schedules import make_schedule

    sched = make_schedule("vp_linear")
    student, reference = gaussian(0.3, 0.8, sched), gaussian(0.0, 1.0, sched)
    n, beta = 8, 5.0
    obj = _pso(lambda nets, batch: batch.noise, Closeness(0.5), beta=beta, t_lo=0.3, t_hi=0.6)
    nets = Nets(teacher=reference, generator=student, targets={REFERENCE: reference})
    batch = Batch(noise=torch.randn(n, D, dtype=torch.float64), cond=prompts(n))
    torch.manual_seed(4)
    out = obj.generator_loss(nets, batch, 0)
    torch.manual_seed(4)
    x_w, x_l, _, _ = obj.pair(nets, batch)
    t = sched.t_from_unit(0.3 + 0.3 * torch.rand(n, dtype=torch.float64))
    eps = torch.randn(n, D, dtype=torch.float64)
    al, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]

    def post(m, c, x_t):
        return m + al * c**2 * (x_t - al * m) / (al**2 * c**2 + s**2)

    xt_w, xt_l = al * x_w + s * eps, al * x_l + s * eps
    want, _ = pso_loss(post(0.3, 0.8, xt_w), post(0.3, 0.8, xt_l), post(0.0, 1.0, xt_w), post(0.0, 1.0, xt_l), x_w,
                       x_l, beta)
    assert float(out["loss"]) == pytest.approx(float(want), rel=1e-6)  # (the means are stored in fp32)


def test_the_starting_student_is_read_into_generator_and_reference(tmp_path):
    net, ref = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    weights = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}
    save_file(weights, str(tmp_path / "student.safetensors"))
    obj = _pso(None, Closeness(0.0), student=str(tmp_path / "student.safetensors"))
    assert obj.run_weights() == {"student": str(tmp_path / "student.safetensors")}
    obj.prepare(Nets(teacher=None, generator=net, targets={REFERENCE: ref}), {"student": weights})
    assert torch.equal(net.weight, torch.ones(2, 2)) and torch.equal(ref.weight, torch.ones(2, 2))
    with pytest.raises(ConfigError) as e:
        obj.prepare(Nets(teacher=None, generator=torch.nn.Linear(3, 2), targets={REFERENCE: ref}), {"student": weights})
    assert "objective.student: '" in one_line(e) and "does not fit this run's generator" in one_line(e)


def test_bad_pso_input_is_one_line():
    for kw, text in (({"beta": 0.0}, "objective.beta=0.0 must be > 0"),
                     ({"pairs": "best"}, "objective.pairs='best' is unknown"),
                     ({"tie": -0.1}, "objective.tie=-0.1 must be >= 0"),
                     ({}, "objective=pso tunes the generator toward a reward: pass reward=digits_class")):
        with pytest.raises(ConfigError) as e:
            _pso(None, None, **kw)
        assert text in one_line(e)
    obj = _pso(lambda nets, batch: batch.noise, None, pairs="data")  # the data's images are x^w: no reward needed
    with pytest.raises(ConfigError) as e:
        obj.pair(None, Batch(noise=torch.zeros(2, D)))
    assert "objective.pairs=data takes the preferred samples from the data" in one_line(e)


def test_digits_experiment_runs_with_finite_losses(tmp_path):
    out, seen = logged_train(["experiment=digits_t2i_pso", "objective.student=", "trainer.steps=2",
                              "trainer.batch_size=4", "trainer.checkpoint_every=2", "eval.num_samples=32",
                              "eval.teacher_steps=[1]", "eval.plot=false"], tmp_path)
    assert len(seen) == 2 and all("gen/reward" in logs and "gen/pso_margin" in logs for logs in seen)
    student = next(r for r in out["rows"] if r["model"] == "student")
    assert student["reward_name"] == "digits_class"
