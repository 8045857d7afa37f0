"""The trainer end to end: a real DMD2 run meets its metric bar, resume is bit-identical, checkpoints
survive a crash mid-write, and the CLI reports bad input in one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, compose, seed_bound
from onestep import checkpoint
from onestep.train.trainer import train


def _final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    last = checkpoint.list_checkpoints(run_dir)[-1]
    return {f.stem: load_file(str(f)) for f in sorted(last.glob("*.safetensors"))}


class _Interrupt(Exception):
    pass


def test_resume_is_bit_identical(tmp_path):
    """Interrupt after k steps, run the same config again: final weights equal an uninterrupted run's."""
    cfg = compose(TINY)
    train(cfg, tmp_path / "straight")

    def stop_at_7(step, logs):
        if step == 7:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(cfg, tmp_path / "resumed", callbacks=(stop_at_7,))
    # steps 5..7 after the checkpoint at 4 are lost and recomputed: the resume must reproduce them exactly
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "resumed")] == ["step_00000004"]
    train(cfg, tmp_path / "resumed")

    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() == {"generator", "generator_ema", "critic"}
    for net in a:
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k} differs after resume"


def test_a_cached_teacher_net_gives_the_run_that_trained_it(tmp_path):
    """A run folder that already holds teacher_net.safetensors skips the teacher's DSM draws; the objective's heads
    (sCD's log-variance head here) must start the same anyway. Before commit f7d2fd0 they were drawn after the
    teacher's training, so gmm_scd's seed-0 figure depended on it: 0.0848 with the teacher trained in the run, 0.0886
    with it read from the folder (since then 0.1051 either way: the same seed, another draw of that head)."""
    import shutil

    cfg = compose(["experiment=gmm_scd", "teacher.net_steps=40", "teacher.net_hidden=32", "trainer.steps=3",
                   "trainer.batch_size=64", "trainer.checkpoint_every=3", "trainer.progress=false",
                   "eval.num_samples=128", "eval.teacher_steps=[2]", "eval.plot=false"])
    train(cfg, tmp_path / "trained")
    (tmp_path / "cached").mkdir()
    shutil.copy(tmp_path / "trained" / "teacher_net.safetensors", tmp_path / "cached" / "teacher_net.safetensors")
    train(cfg, tmp_path / "cached")

    a, b = _final_weights(tmp_path / "trained"), _final_weights(tmp_path / "cached")
    assert "logvar" in a and a.keys() == b.keys()
    for net in a:
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k} differs between a trained and a cached teacher net"


def test_resume_refuses_a_different_config(tmp_path):
    from onestep.errors import ConfigError

    train(compose(TINY), tmp_path)
    with pytest.raises(ConfigError, match="objective.ttur"):
        train(compose(TINY + ["objective.ttur=2"]), tmp_path)


def test_crash_while_writing_keeps_last_checkpoint(tmp_path, monkeypatch):
    net = torch.nn.Linear(3, 2)
    checkpoint.save(tmp_path, 1, {"g": net}, {"step": 1})
    good = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)

    import onestep.checkpoint as ck

    def dying_torch_save(*a, **k):  # the process dies after the weights, before the state file
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", dying_torch_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, {"g": net}, {"step": 2})
    monkeypatch.undo()

    fresh = torch.nn.Linear(3, 2)
    state = checkpoint.load_latest(tmp_path, {"g": fresh})
    assert state["step"] == 1
    assert all(torch.equal(fresh.state_dict()[k], good[k]) for k in good)
    # the next save clears the half-written folder
    checkpoint.save(tmp_path, 3, {"g": net}, {"step": 3})
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    net = torch.nn.Linear(3, 2)
    checkpoint.save(tmp_path, 1, {"g": net}, {"step": 1}, keep=3)
    checkpoint.save(tmp_path, 2, {"g": net}, {"step": 2}, keep=3)
    newest = tmp_path / "checkpoints" / "step_00000002" / "g.safetensors"
    newest.write_bytes(newest.read_bytes()[:20])
    with pytest.warns(UserWarning, match="unreadable"):
        state = checkpoint.load_latest(tmp_path, {"g": torch.nn.Linear(3, 2)})
    assert state["step"] == 1


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    from onestep.train.trainer import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match="lr"):
        train(compose(TINY + ["trainer.generator_optim.lr=1e30", "trainer.critic_optim.lr=1e30",
                              "trainer.grad_clip=0", "trainer.max_bad_steps=2"]), tmp_path)


@pytest.mark.slow
def test_default_gmm_dmd2_meets_its_bar(tmp_path):
    """The shipped gmm_dmd2 experiment: a 1-step student covering all 8 modes, every mode's mass within 25% of 1/8,
    sliced-W2 within its seed spread (mean + 3 std of seeds 0..4; the teacher's 64-step sampler: 0.0448)."""
    out = train(compose(["experiment=gmm_dmd2", "trainer.progress=false", "eval.teacher_steps=[64]",
                         "eval.num_samples=5000", "eval.plot=false"]), tmp_path)
    rows = {(r["model"], r["steps"]): r for r in out["rows"]}
    student, teacher = rows[("student", 1)], rows[("teacher", 64)]
    assert student["modes_covered"] == student["num_modes"] == 8
    assert student["worst_mode_mass_err"] <= 0.25
    assert student["sliced_w2"] <= seed_bound("gmm_dmd2"), (student, teacher)


def _cli(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "onestep.cli", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_end_to_end(tmp_path):
    args = [a for a in TINY if not a.startswith("eval.plot")] + ["eval.teacher_steps=[1,4]", "trainer.eval_every=6", "trainer.log_every=4",
                                                             f"out_root={tmp_path}"]
    r = _cli(args, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    run = next(tmp_path.glob("gmm_dmd2/*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert {row["model"] for row in metrics["rows"]} == {"student", "teacher"}
    assert (run / "samples.png").stat().st_size > 1000 and (run / "config.yaml").exists()
    assert "sliced-W2" in r.stdout
    stats = [json.loads(ln) for ln in (run / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [4, 8, 12] and all("gen/loss" in s for s in stats)
    evals = [json.loads(ln) for ln in (run / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [6] and "sliced_w2" in evals[0]
    # the same command again resumes from the final checkpoint: no training, same table
    r2 = _cli(args, tmp_path)
    assert r2.returncode == 0 and len(list(tmp_path.glob("gmm_dmd2/*"))) == 1


@pytest.mark.parametrize("bad, says", [
    (["trainer.stepz=3"], "unknown config key 'trainer.stepz'"),
    (["experiment=nope"], "choose experiment=<one of"),
    (["objective=nope"], "choose objective=<one of"),
    (["trainer.steps=abc"], "trainer.steps=abc"),
    (["+foo=1"], "config key 'foo' is not read by any code"),
    (["out_root={file}/sub"], "out_root="),
    (["experiment=gmm_dmd2", "generator.ts=[0.5,0.9]", "teacher.net_steps=5"], "must be strictly decreasing"),
    (["experiment=gmm_dmd2", "teacher.mixture=nope", "teacher.net_steps=5"], "mixture"),
    (["objective=sid"], "pick an experiment made for it"),
])
def test_cli_bad_input_is_one_line(tmp_path, bad, says):
    afile = tmp_path / "afile"
    afile.write_text("")
    r = _cli([f"out_root={tmp_path}/runs"] + [b.format(file=afile) for b in bad], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("onestep: error:")]
    assert len(lines) == 1 and says in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    runs = tmp_path / "runs"  # no half-written run folder (tests/test_bad_input.py has more cases)
    assert not runs.exists() or not any(runs.iterdir()), sorted(runs.rglob("*"))


def test_long_override_lists_get_a_bounded_unique_folder_name():
    from onestep.config import MAX_RUN_NAME, run_name

    short = "objective.ttur=1,trainer.steps=5"
    assert run_name(short) == short
    a, b = run_name("x=1," + "k" * 400), run_name("x=2," + "k" * 400)
    assert len(a) == len(b) == MAX_RUN_NAME and a != b and a.startswith("x=1,")
    assert "/" not in run_name("data.path=/tmp/images")


def test_bf16_mixed_precision_trains_with_finite_losses(tmp_path):
    """In a fresh process: accelerate fixes the precision once per process (the CLI's one run)."""
    r = _cli(TINY + ["trainer.mixed_precision=bf16", "trainer.log_every=1", f"out_root={tmp_path}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    stats = [json.loads(ln) for ln in next(tmp_path.glob("gmm_dmd2/*/stats.jsonl")).read_text().splitlines()]
    assert len(stats) == 12 and all(math.isfinite(s["gen/loss"]) and math.isfinite(s["critic/loss"]) for s in stats)


def test_stats_carry_the_time_of_each_phase(tmp_path):
    """Every stats line has time/<phase>_ms for every phase (ms per step over its log interval); the teacher's
    forward passes are timed inside the critic and generator updates that run them; a checkpoint written in an
    interval shows in that interval's next line."""
    from onestep.train.phases import PHASES

    train(compose(TINY + ["trainer.log_every=4", "trainer.checkpoint_every=4"]), tmp_path)
    stats = [json.loads(ln) for ln in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [4, 8, 12]
    for s in stats:
        assert {f"time/{p}_ms" for p in PHASES} <= set(s)
        assert all(s[f"time/{p}_ms"] > 0 for p in ("data", "critic", "generator", "teacher", "targets"))
        assert s["time/teacher_ms"] < s["time/critic_ms"] + s["time/generator_ms"]
        assert s["time/eval_ms"] == 0
    assert stats[0]["time/checkpoint_ms"] == 0 and stats[1]["time/checkpoint_ms"] > 0
    assert stats[0]["time/log_ms"] == 0 and stats[1]["time/log_ms"] > 0
