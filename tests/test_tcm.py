"""TCM (onestep/objectives/tcm.py): stage 2 trains the student only at t >= t' against the two-stage model. On a
single-Gaussian teacher the exact consistency function is known in closed form (the PF-ODE keeps the z-score
(x - a mu) / sqrt(a^2 var + s^2) constant), so the boundary targets, the truncation and the vanishing loss are checked
exactly; an in-run stage 1 is plain CD and a resumed run is the uninterrupted one; a short ring run beats the teacher's
1-step sampler by a wide margin."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import compose, train_straight_and_resumed
from onestep.core import Batch, Nets
from onestep.denoisers.base import Denoiser
from onestep.denoisers.gmm import GaussianMixture, GMMDenoiser
from onestep.errors import ConfigError
from onestep.objectives.cd import CDConfig, ConsistencyDistillation
from onestep.checkpoint import generator_weights_file, read_run_weights
from onestep.objectives.tcm import STAGE1, TCM, TCMConfig
from onestep.schedules import make_schedule

MU, VAR = torch.tensor([0.3, -0.5], dtype=torch.float64), 0.2
SCHED = make_schedule("edm")


def sd(t):
    return torch.sqrt(SCHED.alpha(t) ** 2 * VAR + SCHED.sigma(t) ** 2)


class ExactCM(Denoiser):
    """f*(x, t) = mu + sqrt(var) z: the PF-ODE's endpoint, plus ``offset`` where ``lo <= t < hi``."""

    prediction = "x0"
    data_shape = (2,)

    def __init__(self, offset: float = 0.0, lo: float = 0.0, hi: float = float("inf")):
        super().__init__()
        self.schedule, self.offset, self.lo, self.hi = SCHED, offset, lo, hi
        self.w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))  # something for freeze_into to copy

    def forward(self, x_t, t, cond=None):
        t = self._time(t, x_t)
        z = (x_t - SCHED.alpha(t)[:, None] * MU) / sd(t)[:, None]
        shift = self.offset * ((t >= self.lo) & (t < self.hi)).to(x_t)[:, None]
        return MU + VAR**0.5 * z + shift + 0 * self.w


def gaussian_teacher():
    return GMMDenoiser(GaussianMixture(MU[None], VAR * torch.eye(2, dtype=torch.float64)[None], [1.0]), SCHED)


def batch(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = MU + VAR**0.5 * torch.randn(n, 2, dtype=torch.float64, generator=g)
    return Batch(noise=torch.randn(n, 2, dtype=torch.float64, generator=g), real=real)


def nets(student, stage1):
    return Nets(teacher=gaussian_teacher(), generator=student, targets={STAGE1: stage1})


def test_boundary_targets_are_the_frozen_stage1_model_and_the_exact_cm_has_zero_loss():
    """Stage 2 (step >= stage1_steps): every student time is >= t'; exactly floor(B p_B) rows are boundary rows, whose
    pair straddles t' (student at t', target one level below) and whose target IS the stage-1 model's output at the
    teacher's Heun step; the other rows' targets are the stop-grad student's. With the exact consistency function
    as both models the loss is Heun's error only; an offset on the stage-1 model shows up in the boundary term alone
    (w_B d), and changing the student below t' changes nothing at all (it is never evaluated there)."""
    obj = TCM(TCMConfig(stage1_steps=1, num_scales=120), generate=None)  # fine levels: Heun's error ~1e-4
    exact, b = ExactCM(), batch()
    torch.manual_seed(3)
    p = obj.truncated_pairs(nets(exact, exact), b, step=5)
    tp = p["transition"]
    assert abs(tp - 1.0) < 0.02  # the grid level nearest to t' = 1.0
    bnd = p["boundary"]
    assert int(bnd.sum()) == 64 and bool(bnd[:64].all())
    assert bool((p["t_hi"] >= tp * (1 - 1e-12)).all())  # the student is only ever asked at t >= t'
    assert bool((p["t_hi"][bnd] - tp).abs().max() < 1e-12) and bool((p["t_lo"][bnd] < tp).all())
    assert bool((p["t_lo"][~bnd] >= tp * (1 - 1e-12)).all())
    # the teacher's Heun step lands on the exact PF-ODE state (z-score kept) within Heun's error
    z = (p["x_hi"] - MU) / sd(p["t_hi"])[:, None]
    heun_err = float((p["x_lo"] - (MU + sd(p["t_lo"])[:, None] * z)).abs().max())
    assert heun_err < 5e-4, heun_err
    stage1 = ExactCM(offset=0.1)
    torch.manual_seed(3)
    q = obj.truncated_pairs(nets(exact, stage1), b, step=5)
    assert torch.equal(q["target"][bnd], stage1.x0(q["x_lo"], q["t_lo"])[bnd])  # the frozen stage-1 output itself
    assert torch.equal(q["target"][~bnd], exact.x0(q["x_lo"], q["t_lo"])[~bnd])

    def loss(student, stage1):
        torch.manual_seed(3)
        return {k: v.detach() for k, v in obj.generator_loss(nets(student, stage1), b, step=5).items()}

    clean = loss(exact, exact)
    assert float(clean["loss"]) < 1e-5 and float(clean["boundary"]) < 1e-5, clean
    off = loss(exact, ExactCM(offset=0.1))
    assert abs(float(off["boundary"]) - 0.01) < 1e-3 and float(off["consistency"]) < 1e-5, off  # 0.1^2 per coordinate
    assert abs(float(off["loss"]) - (float(off["consistency"]) + 0.1 * float(off["boundary"]))) < 1e-12
    below = loss(ExactCM(offset=5.0, hi=tp * (1 - 1e-9)), exact)  # the student wrong below t' only
    assert torch.equal(below["loss"], clean["loss"])
    above = loss(ExactCM(offset=0.05, lo=tp * (1 - 1e-9)), exact)
    assert float(above["boundary"]) > 1e-3  # ... but wrong at t' it is pulled back onto the stage-1 model


def test_in_run_stage1_is_cd_then_freezes_the_generator():
    """Steps < stage1_steps are cd.py's loss, draw for draw; the step stage1_steps copies the generator into the
    stage-1 target (before it, the target is untouched), later steps leave it alone."""
    cfg = dict(num_scales=18, solver="heun")
    obj, cd = TCM(TCMConfig(stage1_steps=4, **cfg), generate=None), ConsistencyDistillation(CDConfig(**cfg), None)
    student, stage1 = ExactCM(offset=0.03), ExactCM()
    with torch.no_grad():
        student.w.fill_(0.7)
    n, b = nets(student, stage1), batch()
    for fn in (obj, cd):
        torch.manual_seed(9)
        out = fn.generator_loss(n, b, step=3)
        if fn is obj:
            tcm_loss = out["loss"]
    assert torch.equal(tcm_loss, out["loss"]) and float(stage1.w.sum()) == 0  # stage 1: CD, nothing frozen yet
    obj.generator_loss(n, b, step=4)
    assert torch.equal(stage1.w, student.w)  # frozen at step stage1_steps
    with torch.no_grad():
        student.w.fill_(-1.0)
    obj.generator_loss(n, b, step=5)
    assert float(stage1.w[0]) == 0.7


TINY = ["experiment=gmm_tcm", "teacher.net_steps=40", "teacher.net_hidden=32", "trainer.steps=8",
        "trainer.batch_size=32", "trainer.checkpoint_every=2", "trainer.progress=false", "eval.num_samples=64",
        "eval.teacher_steps=[1]", "eval.plot=false", "objective.stage1_steps=3"]


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """Killed after step 7 (checkpoint at 6, after the freeze at step 3), rerun: the stage-1 target comes back from the
    checkpoint and every weight equals the straight run's."""
    from onestep.checkpoint import list_checkpoints

    straight, resumed = train_straight_and_resumed(compose(TINY), tmp_path, stop_at=7)
    a, b = list_checkpoints(straight)[-1], list_checkpoints(resumed)[-1]
    for name in ("generator", STAGE1):
        wa, wb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    g, s = load_file(str(a / "generator.safetensors")), load_file(str(a / f"{STAGE1}.safetensors"))
    assert any(not torch.equal(g[k], s[k]) for k in g)  # stage 2 moved the student away from the frozen model


def test_stage1_path_reads_a_run_folder_checkpoint_or_file(tmp_path):
    """objective.stage1 accepts a run folder (newest checkpoint), a checkpoint folder or a .safetensors file; prepare
    loads the weights into the stage-1 target and the student; weights of another generator are a ConfigError."""
    student, stage1 = ExactCM(), ExactCM()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000008"
    ckpt.mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_00000004").mkdir()  # older, and without weights
    save_file({"w": torch.tensor([0.25, -2.0], dtype=torch.float64)}, str(ckpt / "generator_ema.safetensors"))
    for path in (tmp_path / "run", ckpt, ckpt / "generator_ema.safetensors"):
        assert generator_weights_file(str(path), "objective.stage1") == ckpt / "generator_ema.safetensors"
    obj = TCM(TCMConfig(stage1=str(tmp_path / "run")), generate=None)
    assert obj.run_weights() == {"stage1": str(tmp_path / "run")}  # the objective names the run, the trainer reads it
    obj.prepare(nets(student, stage1), read_run_weights(obj.run_weights()))
    assert stage1.w.tolist() == [0.25, -2.0] and student.w.tolist() == [0.25, -2.0]
    save_file({"w": torch.zeros(3, dtype=torch.float64)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="does not fit"):
        other = TCM(TCMConfig(stage1=str(tmp_path / "other.safetensors")), generate=None)
        other.prepare(nets(student, stage1), read_run_weights(other.run_weights()))
    with pytest.raises(ConfigError, match="objective.stage1="):
        read_run_weights({"stage1": str(tmp_path / "missing")})


def test_the_trainer_reads_stage1_from_another_runs_folder(tmp_path):
    """objective.stage1=<run folder>: the objective only names the run (run_weights); the trainer resolves the folder
    (checkpoint.read_run_weights) and prepare copies that run's generator_ema into the frozen stage-1 model."""
    from onestep.checkpoint import list_checkpoints
    from onestep.train.trainer import train

    train(compose(TINY), tmp_path / "stage1")
    stage2 = [a for a in TINY if not a.startswith("objective.stage1_steps")]
    train(compose(stage2 + [f"objective.stage1={tmp_path / 'stage1'}", "objective.stage1_steps=0", "trainer.steps=2"]),
          tmp_path / "stage2")
    source = load_file(str(list_checkpoints(tmp_path / "stage1")[-1] / "generator_ema.safetensors"))
    frozen = load_file(str(list_checkpoints(tmp_path / "stage2")[-1] / f"{STAGE1}.safetensors"))
    assert source.keys() == frozen.keys() and all(torch.equal(source[k], frozen[k]) for k in source)


def test_validation():
    for bad in (dict(), dict(stage1_steps=-1), dict(stage1="x", stage1_steps=5), dict(stage1_steps=5, boundary_prob=1.0),
                dict(stage1_steps=5, transition_sigma=0.0), dict(stage1_steps=5, boundary_weight=-1.0)):
        with pytest.raises(ConfigError):
            TCM(TCMConfig(**bad), generate=None)
    obj = TCM(TCMConfig(stage1_steps=1, transition_sigma=1e-5), generate=None)  # below the grid's lowest level
    with pytest.raises(ConfigError, match="transition_sigma"):
        obj.truncated_pairs(nets(ExactCM(), ExactCM()), batch(8), step=2)


def test_bad_stage1_path_is_one_line(tmp_path, capsys, monkeypatch):
    """README "Bad input": `onestep train experiment=gmm_tcm objective.stage1=/no/such objective.stage1_steps=0` ends
    with exit 2 and one line naming objective.stage1, before any folder is created."""
    from conftest import cli_bad_input

    out = tmp_path / "runs"
    line = cli_bad_input(["experiment=gmm_tcm", f"objective.stage1={tmp_path / 'nope'}", "objective.stage1_steps=0"], out,
                         capsys, monkeypatch)
    assert "objective.stage1=" in line
    assert not out.exists()


@pytest.mark.slow
def test_tcm_ring_beats_the_teachers_one_step_sampler(tmp_path):
    """experiment=gmm_tcm shortened (150 CD + 150 TCM steps, a 400-step teacher): the 1-step student covers all 8
    modes with a sliced-W2 far below the teacher's own 1-step sampler (the mixture mean, ~0.70)."""
    from conftest import ring_run_beats_one_step_teacher

    ring_run_beats_one_step_teacher(["experiment=gmm_tcm", "teacher.net_steps=400", "trainer.steps=300",
                                     "objective.stage1_steps=150"], tmp_path, 3, "tcm", spread="ring_tcm")
