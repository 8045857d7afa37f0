"""`onestep eval`: a run's checkpoints evaluated from a process of its own (onestep/eval/watch.py) on the tiny Gaussian
mixture run: one row per checkpoint with provenance, the last one equal to the run's own final evaluation; a
watcher evaluates a checkpoint written after it started exactly once, resumes after kill -9 without redoing a row,
and exits when the run ends; bad input is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, Interrupt, compose
from onestep.errors import ConfigError

KEEP = TINY + ["trainer.keep_checkpoints=10"]  # checkpoints at steps 4, 8, 12, all kept


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train_until(run: Path, stop_at: int | None = None) -> None:
    from onestep.train.trainer import train

    def stop(step, logs):
        if step == stop_at:
            raise Interrupt

    if stop_at is None:
        train(compose(KEEP), run)
        return
    with pytest.raises(Interrupt):
        train(compose(KEEP), run, callbacks=(stop,))


def _watcher(run: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "onestep.cli", "eval", f"run_dir={run}", "watch=true", "poll_s=0.2",
           "progress=false", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def _wait_for(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_eval_now_one_row_per_checkpoint_with_provenance_and_nothing_twice(tmp_path):
    from onestep.eval.watch import evaluate_run

    run = tmp_path / "run"
    _train_until(run)
    said = []
    out = evaluate_run(run, progress=False, say=said.append)
    assert out == run / "eval" / "mixture.jsonl"
    rows = _rows(out)
    assert [r["step"] for r in rows] == [4, 8, 12] and len(said) == 3
    last = rows[-1]
    assert last["protocol"] == "mixture" and last["headline"] == "sliced_w2" and last["student_steps"] == 1
    prov = last["provenance"]
    assert prov["checkpoint"] == "checkpoints/step_00000012" and prov["num_samples"] == 256
    assert prov["run_dir"] == str(run.resolve()) and prov["seed"] == 12345 and prov["eval"]["num_samples"] == 256
    # the same protocol as the trainer's final evaluation: the last checkpoint repeats its student row exactly
    final = next(r for r in json.loads((run / "metrics.json").read_text())["rows"] if r["model"] == "student")
    assert last["sliced_w2"] == final["sliced_w2"]
    assert rows[0]["sliced_w2"] != last["sliced_w2"]  # each row is its own checkpoint's

    said.clear()
    evaluate_run(run, progress=False, say=said.append)
    assert said == [] and _rows(out) == rows
    # rows of another protocol setting are not mixed into the file
    with pytest.raises(ConfigError, match="eval.num_samples: .* holds rows made with eval.num_samples=256, not 300"):
        evaluate_run(run, "mixture", ["eval.num_samples=300"], progress=False, say=said.append)


def test_watch_evaluates_new_checkpoints_once_survives_kill_9_and_exits_when_the_run_ends(tmp_path):
    run = tmp_path / "run"
    _train_until(run, stop_at=5)  # checkpoint 4 of 12
    out = run / "eval" / "mixture.jsonl"
    first = _watcher(run)
    try:
        _wait_for(lambda: out.is_file() and out.read_text().endswith("\n"), 180, "the watcher's first row")
        time.sleep(1.0)  # it polls on: the run is not finished
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    before = out.read_text()
    assert [r["step"] for r in _rows(out)] == [4]
    with open(out, "a") as f:  # a row the kill cut short
        f.write('{"step": 8, "prot')

    second = _watcher(run)
    try:
        _train_until(run)  # resumes: checkpoints 8 and 12 appear while the watcher polls
        stdout, stderr = second.communicate(timeout=180)
    finally:
        second.kill()
    assert second.returncode == 0, stderr[-2000:]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert out.read_text().startswith(before)  # the finished row was not redone
    assert "step 4:" not in stdout and "step 8:" in stdout and "step 12:" in stdout
    final = next(r for r in json.loads((run / "metrics.json").read_text())["rows"] if r["model"] == "student")
    assert rows[-1]["sliced_w2"] == final["sliced_w2"]


def test_eval_writes_the_runs_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from onestep.eval.watch import evaluate_run

    run = tmp_path / "run"
    from onestep.train.trainer import train

    train(compose(KEEP + ["trainer.log_with=tensorboard"]), run)
    evaluate_run(run, progress=False, say=lambda s: None)
    events = EventAccumulator(str(run / "tb" / "eval_mixture"))
    events.Reload()
    scalars = events.Scalars("eval_mixture/sliced_w2")
    assert [s.step for s in scalars] == [4, 8, 12]
    assert scalars[-1].value == pytest.approx(_rows(run / "eval" / "mixture.jsonl")[-1]["sliced_w2"])


def test_bad_input_is_one_line(tmp_path):
    from onestep.eval.watch import evaluate_run
    from onestep.train.run_dir import prepare_run_dir

    with pytest.raises(ConfigError, match="run_dir: .* is not a folder"):
        evaluate_run(tmp_path / "nope", progress=False)
    fresh = tmp_path / "fresh"
    prepare_run_dir(compose(TINY), fresh)  # config.yaml, no checkpoint yet
    with pytest.raises(ConfigError, match="has no checkpoint yet.*watch=true") as e:
        evaluate_run(fresh, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="eval.num_sample"):
        evaluate_run(fresh, None, ["eval.num_sample=3"], progress=False)

    run = tmp_path / "run"
    _train_until(run)
    with pytest.raises(ConfigError, match="eval.protocol='no_such' is not a protocol") as e:
        evaluate_run(run, "no_such", progress=False)
    assert "\n" not in str(e.value) and not (run / "eval" / "no_such.jsonl").exists()

    env = dict(os.environ, OMP_NUM_THREADS="1")
    for args, start in ((["run_dir=" + str(tmp_path / "nope")], "onestep: error: run_dir:"),
                        (["run_dir=" + str(run), "protocol=no_such"], "onestep: error: eval.protocol="),
                        (["run_dir=" + str(run), "wtach=true"], "onestep: error: unknown key 'wtach'")):
        done = subprocess.run([sys.executable, "-m", "onestep.cli", "eval", *args], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 2 and done.stderr.strip().splitlines()[0].startswith(start), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


# ---- the protocols in the bench and the digits diversity ---------------------------------------------------------

def test_bench_takes_eval_protocol_into_its_points(tmp_path):
    """eval.protocol picks the bench's evaluator and is part of each point's cache key; an unknown one is one line."""
    from onestep.eval.bench import bench

    base = TINY + ["bench.num_samples=200", "bench.teacher_steps=[1]", "bench.teacher_methods=[ddim]",
                   "bench.progress=false"]
    assert bench(compose(base), tmp_path / "b")["computed"] == 1
    named = bench(compose(base + ["eval.protocol=mixture"]), tmp_path / "b")
    assert named["computed"] == 1 and named["headline"] == "sliced_w2"
    assert bench(compose(base + ["eval.protocol=mixture"]), tmp_path / "b")["cached"] == 1
    with pytest.raises(ConfigError, match="eval.protocol='no_such' is not a protocol") as e:
        bench(compose(base + ["eval.protocol=no_such"]), tmp_path / "b")
    assert "\n" not in str(e.value)


def test_digits_text_diversity_is_zero_for_repeated_samples(tmp_path):
    """eval.rewards.diversity with the digits text-to-image teacher: per-prompt diversity in the digits feature space
    (0 when every sample of a prompt is the same latent), beside the usual digits metrics."""
    import torch

    from onestep.conditioning import Cond
    from onestep.eval.evaluators import make_evaluator
    from onestep.experiment import load_teacher

    cfg = compose(["experiment=digits_t2i_dmd2", "eval.rewards.diversity=true"])
    setup = load_teacher(cfg, tmp_path, progress=False)
    evaluator = make_evaluator(cfg, setup)
    shape = setup.teacher.data_shape
    g = torch.Generator().manual_seed(0)
    texts = ["the digit 3", "a handwritten 7"] * 8
    cond = Cond({"ids": torch.zeros(16, 1)}, {"ids": torch.zeros(1, 1)}, texts=texts)  # the evaluator reads texts
    same = torch.randn(2, *shape, generator=g).repeat(8, 1, 1, 1)  # rows 0, 2, 4... equal; 1, 3, 5... equal
    m = evaluator.metrics(same, cond)
    assert m["diversity_prompts"] == 2 and m["diversity"] == pytest.approx(0, abs=1e-6) and "fd" in m
    varied = evaluator.metrics(torch.randn(16, *shape, generator=g), cond)
    assert varied["diversity"] > 0.01
