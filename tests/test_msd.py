"""Multi-student distillation (onestep/objectives/msd.py, onestep/denoisers/students.py): the class partition, the
router, the per-student gradients, the export refusal and a short classes16 run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from onestep.conditioning import Labels
from onestep.core import Batch, Nets
from onestep.denoisers.base import Denoiser
from onestep.denoisers.nets import MLPDenoiser
from onestep.denoisers.students import MultiStudent, partition_classes
from onestep.errors import ConfigError
from onestep.objectives.msd import MSD, MSDConfig
from onestep.schedules import make_schedule


@pytest.mark.parametrize("partition", ["contiguous", "interleaved"])
@pytest.mark.parametrize("classes", [3, 7, 10])
def test_partition_covers_every_class_exactly_once(classes, partition):
    """For every K in 1..C: each class has exactly one student in [0, K), every student has a class, group sizes
    differ by at most one, and contiguous groups are runs of consecutive ids."""
    for k in range(1, classes + 1):
        a = partition_classes(classes, k, partition)
        assert a.shape == (classes,) and a.dtype == torch.long
        assert int(a.min()) == 0 and int(a.max()) == k - 1
        sizes = torch.bincount(a, minlength=k)
        assert int(sizes.sum()) == classes and int(sizes.min()) >= 1 and int(sizes.max() - sizes.min()) <= 1
        if partition == "contiguous":
            assert bool((a[1:] - a[:-1] >= 0).all())


class Tagged(Denoiser):
    """Returns x_t * scale + tag: which network ran is visible in the output, and scale takes gradients."""

    prediction = "x0"

    def __init__(self, sched):
        super().__init__()
        self.schedule, self.data_shape, self.num_classes = sched, (2,), 5
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.register_buffer("tag", torch.zeros(()))

    def forward(self, x_t, t, cond=None):
        return x_t * self.scale + self.tag


def tagged_students(k=3, partition="contiguous"):
    ms = MultiStudent(Tagged(make_schedule("edm")), k, partition)
    for i, s in enumerate(ms.students):
        s.tag.fill_(float(i + 1))
    return ms


@pytest.mark.parametrize("partition", ["contiguous", "interleaved"])
def test_router_runs_the_right_student_per_class(partition):
    """Each row is computed by the student its class is assigned to (the null label: student 0), and a loss on the rows
    of one class puts gradient on that student only."""
    ms = tagged_students(3, partition)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 4, 0])  # 5 = the null label
    x = torch.zeros(8, 2)
    out = ms(x, torch.full((8,), 1.0), Labels(labels, 5))
    want = torch.cat([ms.assignment, torch.zeros(1, dtype=torch.long)])[labels] + 1
    assert torch.equal(out[:, 0], want.float()), (out[:, 0], want)
    for c in range(5):
        ms.zero_grad()
        rows = labels == c
        ms(torch.ones(8, 2), torch.full((8,), 1.0), Labels(labels, 5))[rows].sum().backward()
        got = [s.scale.grad is not None and float(s.scale.grad) != 0 for s in ms.students]
        assert got == [k == int(ms.assignment[c]) for k in range(3)], (c, got)


def test_students_start_as_the_init_and_bad_input_fails():
    sched = make_schedule("edm")
    net = MLPDenoiser(sched, 4, hidden=16, depth=1, num_classes=6)
    ms = MultiStudent(net, 3)
    x, t, cond = torch.randn(12, 4), torch.full((12,), 0.5), Labels(torch.arange(12) % 6, 6)
    assert torch.allclose(ms(x, t, cond), net(x, t, cond), atol=1e-6)  # every student is a copy of the init
    assert ms.students[0] is not ms.students[1] and ms.features(x, t, cond).shape == (12, 16)
    for bad in (dict(students=7), dict(students=0), dict(partition="random")):
        with pytest.raises(ConfigError):
            MultiStudent(net, bad.get("students", 2), bad.get("partition", "contiguous"))
    with pytest.raises(ConfigError, match="class-conditional"):
        MultiStudent(MLPDenoiser(sched, 4, hidden=16, depth=1), 2)
    with pytest.raises(ConfigError, match="labels"):
        ms(x, t, None)
    with pytest.raises(ConfigError, match="generator.students"):
        MSD(MSDConfig(), lambda n, b: x).generator_loss(Nets(teacher=net, generator=net, critic=net),
                                                        Batch(noise=x, cond=cond), 0)


def test_export_refuses_a_multi_student_run_in_one_line(tmp_path):
    from onestep.export.pipelines import export

    cfg = SimpleNamespace(generator=SimpleNamespace(students=4), trainer=SimpleNamespace(steps=1),
                          objective=SimpleNamespace(name="msd"))
    run = SimpleNamespace(finished=True, cfg=cfg, path=Path(tmp_path / "run"), step=1)
    out = tmp_path / "exported"
    with pytest.raises(ConfigError) as e:
        export(run, out)
    assert "\n" not in str(e.value) and "generator.students=4" in str(e.value) and "onestep sample" in str(e.value)
    assert not out.exists()


@pytest.mark.slow
def test_classes16_msd_four_students(tmp_path):
    """experiment=gmm_msd shortened to 250 steps: the routed 1-step generator covers all 20 modes with sliced-W2 within
    4x of the teacher's 32-step guided DDIM; every student moved away from the shared init, and the samples of each
    class are exactly those of the student the router assigns it to."""
    from conftest import compose
    from onestep.train.trainer import train

    ov = ["experiment=gmm_msd", "teacher.net_steps=500", "trainer.steps=250", "trainer.progress=false",
          "trainer.checkpoint_every=1000", "eval.teacher_steps=[32]", "eval.num_samples=2000", "eval.plot=false"]
    out = train(compose(ov), tmp_path)
    rows = {r["model"]: r for r in out["rows"]}
    s, t = rows["student"], rows["teacher"]
    print(f"\nmsd (4 students) 1-step sliced-W2 {s['sliced_w2']:.4f}, modes {s['modes_covered']}/20 (teacher 32-step "
          f"{t['sliced_w2']:.4f})")
    assert s["modes_covered"] == 20 and s["sliced_w2"] <= 4 * t["sliced_w2"], (s, t)
    routed = out["networks"].unwrapped("generator_ema").net
    assert isinstance(routed, MultiStudent) and routed.num_students == 4
    flat = [torch.cat([p.detach().flatten() for p in st.parameters()]) for st in routed.students]
    assert all(not torch.allclose(flat[i], flat[j]) for i in range(4) for j in range(i + 1, 4))
    labels = torch.arange(10).repeat_interleave(20)
    cond, x, tt = Labels(labels, 10), torch.randn(200, 16), torch.full((200,), 1.0)
    with torch.no_grad():
        y = routed(x, tt, cond)
        for c in range(10):
            rows_c = labels == c
            alone = routed.students[int(routed.assignment[c])](x[rows_c], tt[rows_c], cond[rows_c.nonzero().flatten()])
            assert torch.equal(y[rows_c], alone), c


def test_students_under_another_objective_are_refused_in_one_line():
    """generator.students is MSD's shape (MSD.generator_keys): a run of another objective that sets it stops before it
    starts instead of training one generator and ignoring the key."""
    from conftest import compose
    from onestep.validate import check_config

    with pytest.raises(ConfigError, match="generator.students=4 shapes the generator of objective=msd") as e:
        check_config(compose(["experiment=gmm_msd", "objective=dmd2"]))
    assert "\n" not in str(e.value) and "pass objective=msd" in str(e.value)
    check_config(compose(["experiment=gmm_msd"]))
