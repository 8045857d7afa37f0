"""The Motion Consistency Model (onestep/objectives/mcm.py): its consistency part against cd.py, the motion
representations and frame picking in both video layouts, the frame discriminator's loss against a float64
transcription of MCM's equations, the generator's adversarial gradient sign, the stills seam, and short runs on a
tiny video-shaped teacher and (through the trainer) on the digits teacher."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from onestep.conditioning import Labels
from onestep.core import Batch, Nets
from onestep.data.stills import _StillCodec, still_sources
from onestep.denoisers.base import Denoiser
from onestep.errors import ConfigError
from onestep.objectives import consistency as C
from onestep.objectives.cd import CDConfig, ConsistencyDistillation
from onestep.objectives.mcm import MCM, MOTION_HEAD, Frames, MCMConfig, discriminator_adv_loss
from onestep.schedules import RectifiedFlow

#: (C, F, h, w): Wan's layout, frame axis 1
SHAPE = (2, 3, 4, 4)


class TinyVideo(Denoiser):
    """A small x0-predicting net on video latents in either layout, taking any number of frames (as Wan's transformer
    does), with the features() a GAN head reads: per-frame linear maps mixed through the mean over frames."""

    prediction = "x0"

    def __init__(self, shape=SHAPE, frame_axis=1, hidden=16, num_classes=3):
        super().__init__()
        self.schedule, self.data_shape, self.frame_axis = RectifiedFlow(), tuple(shape), frame_axis
        self.num_classes, self.feature_dim = num_classes, hidden
        frame = math.prod(shape) // (shape[frame_axis] if frame_axis is not None else 1)
        self.inp, self.label = nn.Linear(frame + 1, hidden), nn.Embedding(num_classes + 1, hidden)
        self.out = nn.Linear(hidden, frame)

    def _frames(self, x):
        return (x.movedim(self.frame_axis + 1, 1) if self.frame_axis is not None else x[:, None]).flatten(2)

    def _hidden(self, x_t, t, cond):
        f = self._frames(x_t)  # (B, F, frame)
        h = self.inp(torch.cat([f, t[:, None, None].to(x_t).expand(-1, f.shape[1], 1)], 2))
        if cond is not None:
            h = h + self.label(cond.labels)[:, None]
        return torch.tanh(h + h.mean(1, keepdim=True))

    def features(self, x_t, t, cond=None):
        return self._hidden(x_t, t, cond).mean(1)

    def forward(self, x_t, t, cond=None):
        d = self.out(self._hidden(x_t, t, cond))  # (B, F, frame)
        if self.frame_axis is None:
            return x_t + d.view(x_t.shape)
        moved = x_t.movedim(self.frame_axis + 1, 1)
        return x_t + d.view(moved.shape).movedim(1, self.frame_axis + 1)


class Constant(Denoiser):
    """x0 = b whatever the input: the consistency loss then has zero gradient (f = target), leaving the GAN's."""

    prediction = "x0"

    def __init__(self, shape=SHAPE):
        super().__init__()
        self.schedule, self.data_shape, self.frame_axis, self.num_classes = RectifiedFlow(), shape, 1, 3
        self.b = nn.Parameter(0.1 * torch.randn(shape))

    def forward(self, x_t, t, cond=None):
        return self.b.expand_as(x_t)


class Stills:
    """A still-image source: 1-frame latents of the teacher's layout, all equal to ``value``."""

    def __init__(self, shape, value):
        self.shape, self.value = shape, value

    def batch(self, n, device):
        return Batch(noise=torch.randn(n, *self.shape), cond=Labels(torch.randint(0, 3, (n,)), 3),
                     real=torch.full((n, *self.shape), self.value))


def _batch(n=4, shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(noise=torch.randn(n, *shape, generator=g), cond=Labels(torch.randint(0, 3, (n,), generator=g), 3),
                 real=0.5 * torch.randn(n, *shape, generator=g))


def _mcm(net=None, **kw):
    net = net or TinyVideo()
    obj = MCM(MCMConfig(**{"mixed_portion": 0.0, **kw}), generate=lambda nets, b: nets.generator.x0(
        b.noise, torch.ones(b.noise.shape[0]), b.cond))
    modules = obj.build_modules(SimpleNamespace(teacher=net, student_init=net))
    obj.set_run(modules, images_per_step=4)
    return obj, {k: m for k, (m, _) in modules.items()}


def _nets(teacher, generator, modules):
    return Nets(teacher=teacher, generator=generator, modules=modules)


@pytest.mark.parametrize("motion", ["raw", "learn"])
@pytest.mark.parametrize("distance", ["huber_mean", "l2", "pseudo_huber"])
def test_consistency_part_equals_cd(motion, distance):
    """With the discriminator off and no mixed trajectories, MCM's loss is cd.py's on the same tensors; the learned
    motion head starts as the identity (its last conv is zero), so at init it coincides too."""
    torch.manual_seed(0)
    teacher, student = TinyVideo(), TinyVideo()
    shared = dict(solver="euler", num_scales=50, distance=distance, huber_c=0.001)
    mcm, modules = _mcm(teacher, motion=motion, discriminator="none", gan_weight=0.0, **shared)
    cd = ConsistencyDistillation(CDConfig(**shared), generate=None)
    batch = _batch()
    torch.manual_seed(1)
    a = mcm.generator_loss(_nets(teacher, student, modules), batch, 0)
    torch.manual_seed(1)
    b = cd.generator_loss(_nets(teacher, student, {}), batch, 0)
    if motion == "raw":
        assert torch.equal(a["loss"], b["loss"])
    else:  # x + 0 per frame: equal up to the order of the sums
        assert torch.allclose(a["loss"], b["loss"], rtol=1e-6, atol=0)
    assert float(b["loss"].detach()) > 0
    assert (MOTION_HEAD in modules) == (motion == "learn")


def test_huber_mean_is_lcm_huber_in_float64():
    """yhZhai/mcm main.py:1537-1544: mean(sqrt((a - b)^2 + c^2) - c) over every element, per sample here."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, *SHAPE, dtype=torch.float64, generator=g), torch.randn(3, *SHAPE, dtype=torch.float64, generator=g)
    c = 0.001
    want = torch.stack([((a[i] - b[i]) ** 2 + c * c).sqrt().sub(c).mean() for i in range(3)])
    assert torch.allclose(C.distance(a, b, "huber_mean", c), want, rtol=0, atol=1e-15)
    assert torch.allclose(C.distance(a, b, "huber_mean"), want, rtol=0, atol=1e-15)  # 0.001 by default


@pytest.mark.parametrize("layout", ["cfhw", "fchw"])
def test_frames_and_motion_representations_in_both_layouts(layout):
    shape, axis = ((2, 3, 4, 4), 1) if layout == "cfhw" else ((3, 2, 4, 4), 0)
    net = TinyVideo(shape, axis)
    x = torch.randn(2, *shape)
    per_frame = [x.select(axis + 1, i) for i in range(3)]  # (B, C, h, w) each
    frames = Frames(net)
    picked = frames.pick(x, torch.tensor([2, 0]))
    assert picked.shape == (4, *[1 if i == axis else s for i, s in enumerate(shape)])
    for row, (b, f) in enumerate([(0, 2), (0, 0), (1, 2), (1, 0)]):  # sample-major
        assert torch.equal(picked[row].squeeze(axis), per_frame[f][b])
    obj, _ = _mcm(net, motion="diff")
    diff = obj.represent(None, x)
    assert torch.equal(diff[:, 1], per_frame[2] - per_frame[1]) and diff.shape[1] == 2
    obj, modules = _mcm(net, motion="learn")
    head = modules[MOTION_HEAD]
    with torch.no_grad():
        head.net[-1].weight.normal_()
    g = obj.represent(_nets(net, net, modules), x)
    assert torch.allclose(g[:, 1], head(per_frame[1]), atol=1e-6)  # the head runs per frame


def test_discriminator_loss_is_mcm_equation_in_float64():
    """critic_loss = disc_weight * L_D on the logits D gave the real (still) and fake (student) rows, with L_D written
    out in float64: hinge relu(1 - D(y)) + relu(1 + D(f)) (yhZhai/mcm main.py:1674-1680), wgan max(-1, -D(y)) +
    max(-1, D(f)) (main.py:1681-1687); the real half is the stills."""
    torch.manual_seed(0)
    net = TinyVideo()
    for kind in ("hinge", "wgan"):
        obj, modules = _mcm(net, disc_loss=kind, disc_weight=0.7, gan_t_lo=0.0, gan_t_hi=0.001)
        frame = (SHAPE[0], 1, *SHAPE[2:])
        obj.set_data({"stills": Stills(frame, 5.0)})
        seen = {}
        logits = obj.gan.logits

        def record(nets, x_t, t, cond):
            seen["x_t"], seen["d"] = x_t, logits(nets, x_t, t, cond) * 40  # spread the logits past the clamps
            return seen["d"]

        obj.gan.logits = record
        out = obj.critic_loss(_nets(net, TinyVideo(), modules), _batch(), 0)
        n = seen["d"].shape[0] // 2
        assert n == 4 * obj.cfg.disc_frames and tuple(seen["x_t"].shape[1:]) == frame
        assert seen["x_t"][:n].mean() > 4.9 and seen["x_t"][n:].abs().mean() < 3  # real rows first: the stills
        d = seen["d"].detach().double()
        y, f = d[:n], d[n:]
        if kind == "hinge":
            want = sum(max(0.0, 1 - v) for v in y.tolist()) / n + sum(max(0.0, 1 + v) for v in f.tolist()) / n
        else:
            want = sum(max(-1.0, -v) for v in y.tolist()) / n + sum(max(-1.0, v) for v in f.tolist()) / n
        assert (d.abs() > 1).any()  # the clamps are exercised
        assert math.isclose(float(out["loss"].detach()), 0.7 * want, rel_tol=1e-5, abs_tol=1e-6), (kind, out["loss"], want)


@pytest.mark.parametrize("kind", ["hinge", "wgan"])
def test_generator_adversarial_gradient_raises_the_discriminator(kind):
    """With D(x) = <w, x> on the student's frames and a constant student (its consistency loss has zero gradient),
    the generator's gradient points against w: a descent step raises D of the student's frames."""
    torch.manual_seed(0)
    gen = Constant()
    obj, modules = _mcm(TinyVideo(), disc_loss=kind, motion="raw", gan_weight=2.0, gan_t_lo=0.0, gan_t_hi=0.001)
    w = torch.randn(SHAPE[0], 1, *SHAPE[2:])
    obj.gan.logits = lambda nets, x_t, t, cond: (x_t * w).flatten(1).sum(1)
    out = obj.generator_loss(_nets(TinyVideo(), gen, modules), _batch(), 0)
    out["loss"].backward()
    assert float(out["consistency"]) == 0
    push = (gen.b.grad * w).sum()  # d loss / d step along +w on every frame
    assert push < 0, push
    # exactly -gan_weight * w on each picked frame (the mean over 4 videos x disc_frames frames of <w, frame>), up to
    # the frame's alpha(t) ~ 1 at t <= 0.001
    picked = gen.b.grad.abs().flatten(2).sum(2).sum(0) > 0  # (F,)
    assert int(picked.sum()) == obj.cfg.disc_frames
    assert torch.allclose(gen.b.grad[:, picked], -2.0 * w.expand(-1, 2, -1, -1) / obj.cfg.disc_frames, rtol=2e-3)


def test_bad_settings_fail_with_the_key():
    with pytest.raises(ConfigError, match="objective.motion='flow'"):
        MCM(MCMConfig(motion="flow"), generate=None)
    with pytest.raises(ConfigError, match="objective.disc_loss='bce'"):
        MCM(MCMConfig(disc_loss="bce"), generate=None)
    with pytest.raises(ConfigError, match="objective.stills=.*objective.discriminator=teacher"):
        MCM(MCMConfig(discriminator="none", gan_weight=0.0, stills="/x"), generate=None)
    with pytest.raises(ConfigError, match="objective.disc_frames=4 exceeds the teacher's 3"):
        obj, modules = _mcm(disc_frames=4)
        obj.generator_loss(_nets(TinyVideo(), TinyVideo(), modules), _batch(), 0)
    image = TinyVideo(shape=(1, 4, 4))
    image.frame_axis = None
    with pytest.raises(ConfigError, match="objective.motion=diff .* needs video data"):
        _mcm(image, motion="diff")
    undeclared = TinyVideo()
    undeclared.frame_axis = None
    with pytest.raises(ConfigError, match="declares no frame_axis"):
        _mcm(undeclared)


def test_stills_are_encoded_as_one_frame_videos():
    class Codec:
        name, device, dtype = "tiny", torch.device("cpu"), torch.float32

        def encode(self, videos):
            assert videos.ndim == 5
            return videos.mean(1, keepdim=True)

    still = _StillCodec(Codec())
    assert still.name == "tiny-still" and still.encode(torch.zeros(2, 3, 8, 8)).shape == (2, 1, 1, 8, 8)
    with pytest.raises(ConfigError, match="objective.stills='/x' needs a text-conditioned latent teacher"):
        still_sources({"stills": "/x"}, SimpleNamespace(codec=None, conditioner=None), "/tmp")


def test_a_few_steps_on_a_tiny_video_teacher_with_stills():
    """Critic and generator updates alternate, with mixed trajectories and the learned head: losses stay finite,
    the head and the student move, and the discriminator separates the stills from the student's frames."""
    torch.manual_seed(0)
    teacher, student = TinyVideo(), TinyVideo()
    student.load_state_dict(teacher.state_dict())
    teacher.requires_grad_(False)
    obj, modules = _mcm(teacher, mixed_portion=0.5)
    obj.set_data({"stills": Stills((SHAPE[0], 1, *SHAPE[2:]), 1.0)})
    nets = _nets(teacher, student, modules)
    gen_params = list(student.parameters()) + list(modules[MOTION_HEAD].parameters())
    opt_g = torch.optim.Adam(gen_params, lr=1e-3)
    opt_d = torch.optim.Adam(modules["disc"].parameters(), lr=1e-2)
    before = [p.detach().clone() for p in gen_params]
    for step in range(6):
        d = obj.critic_loss(nets, _batch(seed=step), step)
        opt_d.zero_grad()
        d["loss"].backward()
        opt_d.step()
        g = obj.generator_loss(nets, _batch(seed=100 + step), step)
        opt_g.zero_grad()
        g["loss"].backward()
        opt_g.step()
        assert all(torch.isfinite(v).all() for v in (*d.values(), *g.values()))
    assert float(d["d_real"]) > float(d["d_fake"])
    assert all(not torch.equal(a, b) for a, b in zip(before, gen_params))


def test_three_trainer_steps_on_digits(tmp_path):
    """experiment=digits_mcm through the trainer: finite losses, the heads checkpointed with the generator."""
    from onestep.train.trainer import train
    from tests.conftest import compose

    cfg = compose(["experiment=digits_mcm", "trainer.steps=3", "trainer.batch_size=8", "trainer.progress=false",
                   "trainer.checkpoint_every=3", "eval.num_samples=16", "eval.plot=false"])
    train(cfg, tmp_path)
    import json

    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    last = stats[-1]
    assert all(math.isfinite(last[k]) for k in ("gen/loss", "gen/consistency", "gen/adv_g", "critic/adv_d"))
    saved = {p.stem for p in (tmp_path / "checkpoints" / "step_00000003").glob("*.safetensors")}
    assert {"generator", "disc", MOTION_HEAD} <= saved


def test_a_missing_stills_folder_fails_before_the_run(tmp_path):
    from onestep.validate import check_config
    from tests.conftest import compose

    with pytest.raises(ConfigError, match=f"objective.stills '{tmp_path}/none' is not a folder; pass objective.stills="):
        check_config(compose(["experiment=digits_mcm", f"objective.stills={tmp_path}/none"]))


def test_prompt_only_data_needs_own_trajectories_and_stills():
    """Prompts without videos (data=prompts): every trajectory is the student's own (mixed_portion=1) and D's real
    frames are the stills; anything else says what to pass."""
    torch.manual_seed(0)
    net = TinyVideo()
    prompts_only = Batch(noise=torch.randn(4, *SHAPE), cond=Labels(torch.randint(0, 3, (4,)), 3))
    obj, modules = _mcm(net)
    with pytest.raises(ConfigError, match="objective.mixed_portion=1 .* and objective.stills=<folder>"):
        obj.generator_loss(_nets(net, TinyVideo(), modules), prompts_only, 0)
    obj, modules = _mcm(net, mixed_portion=1.0)
    with pytest.raises(ConfigError, match="this data gives none"):
        obj.critic_loss(_nets(net, TinyVideo(), modules), prompts_only, 0)
    obj.set_data({"stills": Stills((SHAPE[0], 1, *SHAPE[2:]), 1.0)})
    nets = _nets(net, TinyVideo(), modules)
    for out in (obj.critic_loss(nets, prompts_only, 0), obj.generator_loss(nets, prompts_only, 0)):
        assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.slow
def test_stills_stream_through_the_trainer_on_a_tiny_sd15(tmp_path):
    """The data seam end to end: objective.stills is encoded once by the teacher's VAE into the latent cache, its
    captions into the text cache, and D reads it while prompts (data=prompts) drive the student's own trajectories."""
    import json

    from sd_fixtures import make_tiny_sd15, write_captioned_images, write_prompts
    from onestep.train.trainer import train
    from tests.conftest import compose

    prompts = ["a red square", "a blue circle", "a green dog", "two cats", "a house at night"]
    stills = write_captioned_images(tmp_path / "stills", ["a still " + p for p in prompts[:3]], size=(20, 24))
    cfg = compose(["experiment=sd15_lcm_lora", "objective=mcm", "data=prompts", f"out_root={tmp_path}",
                   f"data.path={write_prompts(tmp_path / 'prompts.txt', prompts)}",
                   f"teacher.path={make_tiny_sd15(tmp_path / 'sd15')}", "objective.mixed_portion=1",
                   f"objective.stills={stills}", "trainer.steps=3", "trainer.batch_size=2", "trainer.progress=false",
                   "eval.num_samples=4", "eval.teacher_steps=[2]", "trainer.checkpoint_every=3"])
    train(cfg, tmp_path / "run")
    last = json.loads((tmp_path / "run" / "stats.jsonl").read_text().splitlines()[-1])
    assert all(math.isfinite(last[k]) for k in ("gen/loss", "gen/adv_g", "critic/adv_d", "critic/d_real"))
    assert len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == 3
    assert len(list((tmp_path / "cache" / "text").rglob("*.safetensors"))) == len(prompts) + 3


def test_a_video_network_takes_any_number_of_frames():
    """D reads single frames through the teacher's own network: check_input lets the frame count differ, nothing
    else."""
    net = TinyVideo()
    net.check_input(torch.zeros(1, 2, 1, 4, 4))
    with pytest.raises(ConfigError, match=r"per-sample shape \(3, 1, 4, 4\) but the TinyVideo expects \(2, 3, 4, 4\)"):
        net.check_input(torch.zeros(1, 3, 1, 4, 4))
    net.frame_axis = None
    with pytest.raises(ConfigError, match="per-sample shape"):
        net.check_input(torch.zeros(1, 2, 1, 4, 4))


def test_guidance_range_guides_each_video_in_the_teacher_step():
    """guidance_range=[w, w] is the teacher guided at w (snoopi.RandomGuidance, drawn per video before the pair)."""
    from onestep.denoisers.base import guided

    torch.manual_seed(0)
    teacher, student = TinyVideo(), TinyVideo()
    obj, modules = _mcm(teacher, guidance_range=[3.0, 3.0], discriminator="none", gan_weight=0.0)
    plain, _ = _mcm(teacher, discriminator="none", gan_weight=0.0)
    batch = _batch()
    torch.manual_seed(1)
    a = obj.generator_loss(_nets(teacher, student, modules), batch, 0)
    for scale, same in ((3.0, True), (1.5, False)):
        torch.manual_seed(1)
        torch.rand(4)  # the per-video scale draw
        b = plain.generator_loss(_nets(guided(teacher, scale), student, modules), batch, 0)
        assert torch.equal(a["loss"], b["loss"]) == same
    assert float(a["pgsb_w"]) == 3.0
