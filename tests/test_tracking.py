"""Experiment tracking (trainer.log_with): the TensorBoard events mirror stats.jsonl and evals.jsonl step for step,
across a kill and resume too, with the learning rates, the final evaluation and the sample grids; wandb (offline,
when installed) gets the same values; none writes no events; a bad or missing tracker is one line."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, Interrupt, compose, one_line
from onestep.errors import ConfigError
from onestep.train.tracking import tracker_name
from onestep.train.trainer import train
from onestep.validate import check_config

#: stats every 2 steps; an evaluation and a sample grid at step 6 (the grid again at 12, the last step)
LOGGED = ["trainer.log_every=2", "trainer.eval_every=6", "trainer.sample_every=6"]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _killed_at_7_and_resumed(cfg, run: Path) -> None:
    """Train, killed after step 7 (its stats, evaluation and grid of step 6 are logged; the checkpoint is step 4's),
    then run again: it resumes at step 4."""
    def stop(step, logs):
        if step == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, run, callbacks=(stop,))
    train(cfg, run)


def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()


def test_tensorboard_mirrors_the_run_files_across_a_resume(tmp_path):
    import tensorboard  # noqa: F401  (a dependency: missing is a failure, not a skip)
    cfg = compose(TINY + LOGGED + ["trainer.log_with=tensorboard"])
    run = tmp_path / "run"
    _killed_at_7_and_resumed(cfg, run)
    events = _events(run)
    scalars = set(events.Tags()["scalars"])

    stats, evals = _jsonl(run / "stats.jsonl"), _jsonl(run / "evals.jsonl")
    assert [r["step"] for r in stats] == [2, 4, 6, 8, 10, 12] and [r["step"] for r in evals] == [6]
    for records, prefix in ((stats, ""), (evals, "eval/")):
        for key in sorted({k for r in records for k in r} - {"step"}):
            # the killed process's step-6 events are hidden (purge_step): each step once, with the resumed value
            # (it_per_s differs between the two processes)
            got = [(e.step, e.value) for e in events.Scalars(prefix + key)]
            want = [(r["step"], r[key]) for r in records]
            assert [s for s, _ in got] == [s for s, _ in want], key
            assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key  # (float32)
    assert "gen/loss" in scalars and "critic/loss" in scalars and "eval/sliced_w2" in scalars
    for role in ("generator", "critic"):
        lrs = events.Scalars(f"lr/{role}")
        assert [e.step for e in lrs] == [r["step"] for r in stats]
        assert [e.value for e in lrs] == pytest.approx([cfg.trainer[f"{role}_optim"].lr] * len(lrs), rel=1e-6)

    metrics = json.loads((run / "metrics.json").read_text())
    for row in metrics["rows"]:
        name = f"final/{row['model']}_{row['steps']}step_{row['sampler']}"
        ((step, value),) = [(e.step, e.value) for e in events.Scalars(f"{name}/sliced_w2")]
        assert step == 12 and value == pytest.approx(row["sliced_w2"], rel=1e-6)
    assert "final/results/text_summary" in events.Tags()["tensors"]

    images = events.Images("samples")
    assert [im.step for im in images] == [6, 12]
    assert images[0].width > 100 and images[0].height > 100
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 2  # one file per process, in one folder


@pytest.mark.parametrize("log_with, events", [("none", False), ("auto", True)])
def test_none_writes_no_events_and_auto_picks_tensorboard(tmp_path, log_with, events):
    if events:
        import tensorboard  # noqa: F401  (a dependency: missing is a failure, not a skip)
    train(compose(TINY + ["trainer.steps=4", "trainer.sample_every=4", f"trainer.log_with={log_with}"]), tmp_path)
    assert (tmp_path / "stats.jsonl").is_file() and (tmp_path / "samples_00000004.png").is_file()
    assert bool(list(tmp_path.rglob("events.out.tfevents.*"))) == events
    assert (tmp_path / "tb").is_dir() == events


def test_cli_refuses_an_unknown_tracker_in_one_line(tmp_path):
    out = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "onestep.cli", "train", "experiment=gmm_dmd2", "trainer.log_with=bogus",
                        f"out_root={out}"], cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onestep: error: trainer.log_with='bogus'"), lines
    assert "('auto', 'tensorboard', 'wandb', 'none')" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_tracker_that_is_not_installed_is_one_line(monkeypatch, name):
    cfg = compose(TINY + [f"trainer.log_with={name}"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    assert f"pip install {name}" in one_line(e) and "trainer.log_with=none" in one_line(e)
    if name == "tensorboard":
        assert tracker_name("auto") is None  # auto falls back to no tracking


def _wandb_history(folder: Path) -> list[dict]:
    """The history rows of an offline wandb run file: a LevelDB-style log (32 KiB blocks of records, each with a
    7-byte header: crc32, length, type) of wandb's protobuf Records, after wandb's 7-byte file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = folder.glob("*.wandb")
    data, block, pos, chunk, rows = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            chunk = b""
    return rows


def test_wandb_offline_gets_the_same_values_and_keeps_its_run_across_a_resume(tmp_path, monkeypatch):
    import wandb  # noqa: F401  (in the test extra: missing is a failure, not a skip)
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "wb",
                       "WANDB_CACHE_DIR": tmp_path / "wb", "WANDB_DATA_DIR": tmp_path / "wb"}.items():
        monkeypatch.setenv(var, str(value))
    run = tmp_path / "run"
    _killed_at_7_and_resumed(compose(TINY + LOGGED + ["trainer.log_with=wandb", "trainer.log_every=4"]), run)

    folders = sorted((run / "wandb").glob("offline-run-*"))
    run_id = (run / "wandb" / "onestep_run_id").read_text()
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)  # one wandb run, resumed
    by_step: dict[int, dict] = {}
    for f in folders:  # the resumed process's rows replace the killed one's
        for row in _wandb_history(f):
            by_step.setdefault(row["_step"], {}).update(row)
    for record in _jsonl(run / "stats.jsonl") + [{"step": r["step"], **{f"eval/{k}": v for k, v in r.items()
                                                                           if k != "step"}}
                                                   for r in _jsonl(run / "evals.jsonl")]:
        logged = by_step[record["step"]]
        assert {k: logged[k] for k in record if k != "step"} == {k: v for k, v in record.items() if k != "step"}
    assert {s for s, row in by_step.items() if "lr/generator" in row} == {4, 8, 12}
    assert {s for s, row in by_step.items() if "samples/_type" in row} == {6, 12}
    assert "final/student_1step_renoise/sliced_w2" in by_step[12]
