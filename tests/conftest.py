"""Shared test helpers: compose a config the way the CLI does, with overrides."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

import onestep.config  # noqa: F401  (registers schemas)
import onestep.objectives  # noqa: F401  (registers objectives)
import onestep.teachers  # noqa: F401  (registers the teacher families and their presets)

#: a few-second GMM run: tiny teacher pretraining, few steps, small eval
TINY = ["experiment=gmm_dmd2", "teacher.net_steps=40", "teacher.net_hidden=32", "trainer.steps=12",
        "trainer.batch_size=64", "trainer.checkpoint_every=4", "trainer.progress=false",
        "objective.regression_pairs=64", "objective.regression_steps=4",
        "eval.num_samples=256", "eval.teacher_steps=[2]", "eval.plot=false"]


class Interrupt(Exception):
    pass


def train_straight_and_resumed(cfg, root, stop_at: int = 7):
    """Train ``cfg`` once uninterrupted (root/straight) and once killed after step ``stop_at`` then rerun
    (root/resumed); returns both run folders (compare their final checkpoints)."""
    from onestep.train.trainer import train

    train(cfg, root / "straight")

    def stop(step, logs):
        if step == stop_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, root / "resumed", callbacks=(stop,))
    train(cfg, root / "resumed")
    return root / "straight", root / "resumed"


def compose(overrides=()):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("onestep.configs", version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


@pytest.fixture(autouse=True)
def _threads():
    """Tests share 2 cores in CI; keep each test single-threaded unless it opts out."""
    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("ONESTEP_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(n)


def one_line(excinfo) -> str:
    """The message of a pytest.raises excinfo, asserted to be one line."""
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


#: The guarded runs' headline figure over seeds 0..N-1, measured on this code (1 torch thread) by the named test's
#: own overrides plus `seed=S`. A guard allows mean + 3 std (``seed_bound``), which stays under a 20% regression of
#: the mean for every entry (tests/test_guards.py).
SEED_SPREADS = {
    # tests/test_digits.py::test_short_digits_distillation_beats_teacher_one_step: 1-step FD (teacher 1-step 116.78)
    "digits_dmd2_40_steps": (11.8148, 12.6711, 11.3424, 12.2439, 11.9660),
    # tests/test_train.py::test_default_gmm_dmd2_meets_its_bar: 1-step sliced-W2 (teacher 64-step 0.0448)
    "gmm_dmd2": (0.0557, 0.0515, 0.0593, 0.0572, 0.0561),
    # tests/test_consistency.py::test_gmm_scd_shipped_figure_within_its_seed_spread: 1-step sliced-W2 (why the
    # 0.0842 once recorded for seed 0 is not a regression: the comment there)
    "gmm_scd": (0.1051, 0.0966, 0.0953, 0.0953, 0.1097, 0.1013),
    # ring runs, 1-step sliced-W2 of the named test's own run (seeds 0..2): ring_run_beats_one_step_teacher's
    "ring_boot": (0.1468, 0.1597, 0.1517),  # tests/test_boot.py (teacher 1-step 0.703)
    "ring_tcm": (0.1600, 0.1777, 0.1755),  # tests/test_tcm.py
    # tests/test_objectives_train.py::test_objective_converges_on_the_ring (the fixture's seed-0 teacher, seeds 0..2)
    "ring_adversarial": (0.0832, 0.0840, 0.0838),
    "ring_dmd": (0.0810, 0.0801, 0.0798),
    "ring_dmd2": (0.0956, 0.0926, 0.0963),
    "ring_sid": (0.0939, 0.0926, 0.0999),
    "ring_vsd": (0.0861, 0.0863, 0.0866),
}
#: Runs whose seed spread is too wide for mean + 3 std to stay under 1.2 x the mean with the tests' budget (steps,
#: samples): their guard is still mean + 3 std (or the older bound against the teacher, whichever is tighter), so it
#: catches a large regression but not every 20% one. Narrowing them needs longer runs or more samples in CI.
WIDE_SPREADS = {
    "ring_reflow": (0.0928, 0.1215, 0.0798),  # tests/test_reflow.py
    "ring_scott": (0.3448, 0.3109, 0.2998),  # tests/test_scott.py
    "ring_tbcm": (0.1730, 0.0881, 0.1111),  # tests/test_tbcm.py (the older bound, 0.234, is tighter)
    "ring_tscd": (0.1179, 0.1378, 0.1151),  # tests/test_tscd.py
    # tests/test_objectives_train.py::test_objective_converges_on_the_ring (there BAR, 0.134, is tighter for sida)
    "ring_fdistill": (0.1094, 0.0985, 0.1144),
    "ring_sida": (0.0983, 0.1203, 0.1050),
    "ring_sim": (0.1012, 0.0866, 0.0866),
}


def seed_bound(name: str) -> float:
    """mean + 3 std of ``SEED_SPREADS[name]`` (or ``WIDE_SPREADS[name]``): what a run of that test may reach without
    being a regression."""
    import statistics

    values = SEED_SPREADS[name] if name in SEED_SPREADS else WIDE_SPREADS[name]
    return statistics.mean(values) + 3 * statistics.stdev(values)


def ring_run_beats_one_step_teacher(overrides, tmp_path, factor: float, label: str, samples: int = 2000,
                                    spread: str | None = None):
    """Train a ring experiment (``overrides``) and assert its 1-step student covers all 8 modes with a sliced-W2 at most
    the teacher's own 1-step sampler's (the mixture mean, ~0.70) / ``factor``, and within the seed spread ``spread``
    names (seed_bound) when given; prints both; returns the two rows."""
    from onestep.train.trainer import train

    ov = [*overrides, "trainer.progress=false", "trainer.checkpoint_every=1000", "eval.teacher_steps=[1]",
          f"eval.num_samples={samples}", "eval.plot=false"]
    rows = {(r["model"], r["steps"]): r for r in train(compose(ov), tmp_path)["rows"]}
    student, teacher1 = rows[("student", 1)], rows[("teacher", 1)]
    print(f"\n{label} 1-step sliced-W2 {student['sliced_w2']:.4f} (teacher 1-step {teacher1['sliced_w2']:.4f})")
    assert student["modes_covered"] == 8, student
    assert student["sliced_w2"] <= teacher1["sliced_w2"] / factor, (student, teacher1)
    if spread is not None:
        assert student["sliced_w2"] <= seed_bound(spread), (spread, seed_bound(spread), student)
    return student, teacher1


def logged_train(overrides, tmp_path, log_every: int = 1):
    """Train ``overrides`` into ``tmp_path``/run logging every ``log_every`` steps, assert every numeric value of each
    step's logs finite, and return (the run's result, each step's logs)."""
    import torch

    from onestep.train.trainer import train

    cfg = compose([*overrides, f"trainer.log_every={log_every}", "trainer.progress=false", f"out_root={tmp_path}"])
    seen = []
    out = train(cfg, tmp_path / "run", callbacks=(lambda step, logs: seen.append(logs),))
    for logs in seen:
        for k, v in logs.items():
            if isinstance(v, (int, float, torch.Tensor)):
                assert torch.isfinite(torch.as_tensor(v)).all(), (k, v)
    return out, seen


#: keys that keep a CLI run tiny whatever the objective (a bad-input test's run must stop on its bad key, not on these)
CLI_SMALL = ["teacher.net_steps=5", "teacher.net_hidden=16", "trainer.steps=4", "trainer.batch_size=16",
             "trainer.progress=false", "eval.num_samples=16", "eval.teacher_steps=[2]", "eval.plot=false"]


def cli_bad_input(args, out, capsys, monkeypatch) -> str:
    """README's "Bad input" contract for ``onestep train <args> out_root=<out>`` run in this process: exit status 2,
    one stderr line "onestep: error: ...", no run folder left under ``out``; returns the line."""
    import sys

    from onestep import cli

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        cli.main(["train", *args, f"out_root={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and err[0].startswith("onestep: error:"), err
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))
    left = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)
            and Path(h.baseFilename).is_relative_to(Path(out).resolve())]
    assert not left, f"the root logger still writes into the removed run folder: {left}"
    return err[0]


def write_scheduler(folder, **config):
    """folder/scheduler/scheduler_config.json holding ``config``; returns folder."""
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


def noise(n=2, seed=1):
    """Seeded (n, 4, 8, 8) latents: the tiny pipelines' latent shape."""
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()
