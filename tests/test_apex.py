"""APEX (onestep/objectives/apex.py): the Barron loss and the generator loss against float64 transcriptions of the
official code (LINs-lab/APEX src/methodes/apex/apex.py), the shifted-branch direction against the exact Gaussian-mixture
scores, the shift input of the MLP, bad input, resume, and a short ring run."""

from __future__ import annotations

import pytest
import torch

from onestep.conditioning import Cond
from onestep.core import Batch, Nets
from onestep.denoisers.base import SHIFT, Denoiser, with_shift
from onestep.denoisers.gmm import GaussianMixture, GMMDenoiser, ring
from onestep.denoisers.nets import MLPDenoiser
from onestep.errors import ConfigError
from onestep.generator import Student
from onestep.objectives.apex import APEX, APEXConfig, barron, shifted_direction
from onestep.schedules import make_schedule


def official_barron(pred, target, alpha=1.0, c=1e-3):
    """apex.py:90-104, as written there (the weight through .data)."""
    mse = torch.mean((pred - target) ** 2, dim=tuple(range(1, pred.ndim)))
    rmse_sq_norm = mse / (c**2 + 1e-8)
    if abs(alpha - 2.0) < 1e-5:
        weight = torch.ones_like(mse)
    else:
        weight = (rmse_sq_norm / abs(alpha - 2.0) + 1.0).pow((alpha - 2.0) / 2.0)
    return mse * weight.data / c


@pytest.mark.parametrize("alpha", [1.0, 0.0, 2.0])
def test_barron_is_the_officials_in_value_and_gradient(alpha):
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64) * torch.tensor([0.0, 1e-3, 0.1, 1.0, 10.0],
                                                                                      dtype=torch.float64)[:, None, None]
    ours, want = barron(pred, target, alpha), official_barron(pred, target, alpha)
    assert torch.allclose(ours, want, rtol=1e-12)
    g1, = torch.autograd.grad(ours.sum(), pred)
    g2, = torch.autograd.grad(official_barron(pred, target, alpha).sum(), pred)
    assert torch.allclose(g1, g2, rtol=1e-12)


class TwoBranch(Denoiser):
    """An exact stand-in for a network with a shifted branch: the ``real`` mixture, or ``fake`` on rows whose
    conditioning carries SHIFT = 1."""

    def __init__(self, real: GMMDenoiser, fake: GMMDenoiser):
        super().__init__()
        self.real, self.fake = real, fake
        self.schedule, self.prediction = real.schedule, real.prediction

    def forward(self, x_t, t, cond=None):
        if isinstance(cond, Cond) and SHIFT in cond:
            m = cond[SHIFT].bool()[:, None]
            return torch.where(m, self.fake(x_t, t), self.real(x_t, t))
        return self.real(x_t, t)


def shifted_ring(shift=(0.3, -0.2)) -> GaussianMixture:
    r = ring()
    return GaussianMixture(r.means + torch.tensor(shift, dtype=torch.float64), r.covs * 4, torch.ones(8))


@pytest.mark.parametrize("schedule", ["rectified_flow", "edm"])
def test_direction_is_the_exact_velocity_difference(schedule):
    """F_grad = v_shift - v_real with the exact ring as the real branch and another exact mixture as the shifted one:
    (mu_real - mu_fake) / t on rectified flow (v = (x_t - x0) / t) and sigma (s_real - s_fake) on EDM (v = eps =
    -sigma s), mu = (x_t + sigma^2 s) / alpha read through GMMDenoiser.score; clamped elementwise."""
    sched = make_schedule(schedule)
    net = TwoBranch(GMMDenoiser(ring(), sched), GMMDenoiser(shifted_ring(), sched))
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(64, 2, generator=gen, dtype=torch.float64) * 1.5
    t = sched.t_from_unit(torch.linspace(0.2, 0.8, 64, dtype=torch.float64))
    s_real, s_fake = net.real.score(x_t, t), net.fake.score(x_t, t)
    a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    if schedule == "rectified_flow":
        want = ((x_t + s**2 * s_real) / a - (x_t + s**2 * s_fake) / a) / t[:, None]
    else:
        want = s * (s_real - s_fake)
    got = shifted_direction(net, x_t, t, clamp=1e9)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (got - want).abs().max()
    assert want.abs().max() > 1.0  # the clamp below bites
    assert torch.allclose(shifted_direction(net, x_t, t, clamp=1.0), want.clamp(-1, 1), rtol=1e-9, atol=1e-12)
    # a frozen real score in place of the network's own unshifted branch (real_score=teacher)
    other = GMMDenoiser(shifted_ring((0.0, 0.5)), sched)
    got = shifted_direction(net, x_t, t, clamp=1e9, real=other)
    assert torch.allclose(got, net.fake.flow(x_t, t) - other.flow(x_t, t), rtol=1e-9, atol=1e-12)


def rf_run(real_score="self", **cfg):
    """A 1-step rectified-flow student (t_0 = t_max = 1: x_t = z) with a shift input, fp64."""
    torch.manual_seed(0)
    sched = make_schedule("rectified_flow")
    gc = type("GC", (), {"lora": type("L", (), {"rank": None})()})()
    g = APEX.shape_generator(gc, MLPDenoiser(sched, 2, hidden=16, depth=1).double())
    with torch.no_grad():
        g.shift_embed.normal_()  # the branches differ, as after some training
    student = Student(sched, steps=1)
    obj = APEX(APEXConfig(real_score=real_score, **cfg), student.train_sample)
    nets = Nets(teacher=GMMDenoiser(ring(), sched), generator=g)
    return obj, nets, Batch(noise=torch.randn(32, 2, dtype=torch.float64)), sched


@pytest.mark.parametrize("real_score", ["self", "teacher"])
def test_generator_loss_is_the_officials(real_score):
    """On rectified flow the loss and its gradient on every parameter are the official's: rho(v_shift(x_t), z' - sg(x))
    (the adv rows, apex.py:164-178) + 0.5 rho(F, sg(F - F_grad)) (apex.py:359-365) [+ rho(v(x_t), sg(v_teacher)) for
    real_score=self], with F the one-step velocity, x = x_t0 - t0 F (apex.py:381-384), fp64. The official's one-step
    rows sit at t0 = 1 (apex.py:148), this schedule's student at its t_max t0 = 0.9999: the dm term's gradient through
    F is then 1 / t0 times the one through x, the values are equal."""
    obj, nets, batch, sched = rf_run(real_score)
    t0 = float(obj.generate.__self__.ts[0])
    params = list(nets.generator.parameters())
    torch.manual_seed(3)
    out = obj.generator_loss(nets, batch, 0)
    ours = torch.autograd.grad(out["loss"], params)
    torch.manual_seed(3)
    g, z = nets.generator, batch.noise * sched.prior_std(torch.tensor(t0, dtype=torch.float64))
    F = g.flow(z, torch.full((32,), t0, dtype=torch.float64))
    x = z - t0 * F
    t = sched.t_from_unit(0.02 + 0.96 * torch.rand(32, dtype=torch.float64))  # (onestep.core.sample_t's draw)
    eps = torch.randn_like(x)
    tt = t[:, None]
    x_t = eps * tt + x.detach() * (1 - tt)  # apex.py:177
    shifted = with_shift(None, 32, x.device)
    real_v = (g if real_score == "self" else nets.teacher).flow(x_t, t).detach()
    f_grad = (g.flow(x_t, t, shifted).detach() - real_v).clamp(-1, 1)  # apex.py:287-292
    rest = official_barron(g.flow(x_t, t, shifted), eps - x.detach()).mean()
    if real_score == "self":
        rest = rest + official_barron(g.flow(x_t, t), nets.teacher.flow(x_t, t).detach()).mean()
    dm = 0.5 * official_barron(F, (F - f_grad).data).mean()
    assert torch.allclose(out["loss"], rest + dm, rtol=1e-10)
    grad = lambda loss, **kw: [torch.zeros_like(p) if d is None else d  # noqa: E731  (the shift takes none from dm)
                               for p, d in zip(params, torch.autograd.grad(loss, params, allow_unused=True, **kw))]
    want = [a + t0 * b for a, b in zip(grad(rest, retain_graph=True), grad(dm))]
    for a, b in zip(ours, want):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    assert out["shift_grad_norm"] > 0 and ("real_flow" in out) == (real_score == "self")


def test_the_shift_input_starts_at_zero_and_moves_only_shifted_rows():
    sched = make_schedule("edm")
    net = MLPDenoiser(sched, 2, hidden=16, depth=1, num_classes=3).double()
    net.add_shift_input()
    x, t = torch.randn(6, 2, dtype=torch.float64), torch.full((6,), 0.7, dtype=torch.float64)
    labels = Cond.of_classes(torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    cond = with_shift(labels, 6, x.device)
    assert torch.equal(net(x, t, cond), net(x, t, labels))  # zero at the start: the shifted branch is the net
    with torch.no_grad():
        net.shift_embed.normal_()
    half = with_shift(labels, 6, x.device)
    half.fields[SHIFT] = torch.tensor([1.0, 0, 1, 0, 1, 0])
    moved = (net(x, t, half) - net(x, t, labels)).abs().amax(1) > 1e-6
    assert moved.tolist() == [True, False, True, False, True, False]
    bad = with_shift(labels, 6, x.device)
    bad.fields[SHIFT] = torch.ones(6, 1)
    with pytest.raises(ConfigError, match="one flag per row"):
        net(x, t, bad)


def test_the_unets_shift_input_starts_at_zero_moves_only_shifted_rows_and_stays_out_of_the_unet():
    """The class-conditional UNet's shift input: zero at the start, a learned vector on the time embedding of the
    shifted rows only, one flag per row; it is not a weight of the diffusers UNet (what checkpoints of the UNet and
    exports hold)."""
    from diffusers import UNet2DModel

    from onestep.conditioning import Labels
    from onestep.denoisers.diffusers import UNet2DDenoiser
    from onestep.schedules import VPCosine

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=4).double().eval()
    net = UNet2DDenoiser(unet, VPCosine(), "v")
    net.add_shift_input()
    x, t = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.full((4,), 0.6, dtype=torch.float64)
    labels = Labels(torch.tensor([0, 1, 2, 0]), 3)
    assert torch.equal(net(x, t, with_shift(labels, 4, x.device)), net(x, t, labels))
    with torch.no_grad():
        net.shift_embed.normal_()
    half = with_shift(labels, 4, x.device)
    half.fields[SHIFT] = torch.tensor([1.0, 0, 0, 1])
    moved = (net(x, t, half) - net(x, t, labels)).flatten(1).abs().amax(1) > 1e-9
    assert moved.tolist() == [True, False, False, True]
    assert "shift_embed" in dict(net.named_parameters()) and not any("shift" in k for k in unet.state_dict())
    bad = with_shift(labels, 4, x.device)
    bad.fields[SHIFT] = torch.ones(2)
    with pytest.raises(ConfigError, match="one flag per row"):
        net(x, t, bad)


def test_digits_apex_runs_and_trains_the_shift_input(tmp_path):
    """experiment=digits_apex for 3 steps (batch 8; ~15 s): every logged value finite, the shift input moved off zero
    and the generator's UNet learned (the one-step sample's correction reaches it)."""
    from conftest import logged_train

    out, seen = logged_train(["experiment=digits_apex", "trainer.steps=3", "trainer.batch_size=8",
                              "trainer.checkpoint_every=3", "eval.num_samples=8", "eval.student_steps=[1]",
                              "eval.teacher_steps=[2]"], tmp_path)
    assert len(seen) == 3 and all(s["gen/shift_grad_norm"] >= 0 for s in seen)
    gen = out["networks"].unwrapped("generator")
    assert gen.shift_embed.abs().max() > 0


def test_shapes_and_refusals():
    """objective=apex gives the generator its shift input; a network without one (any teacher family but the
    project's MLP) or a LoRA generator is refused in one line naming the fix."""
    from conftest import compose, one_line

    gc = compose(["experiment=gmm_apex"]).generator
    sched = make_schedule("edm")
    base = MLPDenoiser(sched, 2, hidden=8, depth=1)
    shaped = APEX.shaped(gc, base)
    assert shaped.shift_embed is not None and base.shift_embed is None
    with pytest.raises(ConfigError) as e:
        APEX.shaped(gc, GMMDenoiser(ring(), sched))
    assert "shifted-condition" in one_line(e) and "GMMDenoiser" in one_line(e)
    gc = compose(["experiment=gmm_apex", "generator.lora.rank=4"]).generator
    with pytest.raises(ConfigError) as e:
        APEX.shaped(gc, base)
    assert "generator.lora" in one_line(e)


@pytest.mark.parametrize("args, key", [(["objective.loss=l1"], "objective.loss"),
                                       (["objective.real_score=critic"], "objective.real_score"),
                                       (["objective.clamp=0"], "objective.clamp"),
                                       (["objective.t_lo=0.9", "objective.t_hi=0.1"], "objective.t_lo")])
def test_cli_bad_input_is_one_line_and_leaves_no_run_folder(tmp_path, capsys, monkeypatch, args, key):
    from conftest import CLI_SMALL, cli_bad_input

    assert key in cli_bad_input(["experiment=gmm_apex", *args, *CLI_SMALL], tmp_path / "runs", capsys, monkeypatch)


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """A tiny gmm_apex run killed after step 7 and rerun ends with the straight run's generator, shift input included."""
    from conftest import compose, train_straight_and_resumed
    from safetensors.torch import load_file

    from onestep.checkpoint import list_checkpoints

    tiny = ["experiment=gmm_apex", "teacher.net_steps=40", "teacher.net_hidden=32", "trainer.steps=12",
            "trainer.batch_size=64", "trainer.checkpoint_every=4", "trainer.progress=false", "eval.num_samples=256",
            "eval.teacher_steps=[2]", "eval.plot=false"]
    straight, resumed = train_straight_and_resumed(compose(tiny), tmp_path, stop_at=7)
    wa = load_file(str(list_checkpoints(straight)[-1] / "generator.safetensors"))
    wb = load_file(str(list_checkpoints(resumed)[-1] / "generator.safetensors"))
    assert "shift_embed" in wa and wa["shift_embed"].abs().max() > 0
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_apex_ring_beats_the_teachers_one_step_sampler(tmp_path):
    """experiment=gmm_apex (400 steps from sigma_init 1, ~70 s on a shared core): the 1-step student covers all 8 modes
    with a sliced-W2 far below the teacher's own 1-step sampler (the mixture mean, ~0.70); one seed measured 0.093."""
    from conftest import ring_run_beats_one_step_teacher

    ring_run_beats_one_step_teacher(["experiment=gmm_apex"], tmp_path, 3, "apex")
