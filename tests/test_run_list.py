"""`onestep runs`: a finished run made by `onestep train`, a copy stopped before its final evaluation with its
newest checkpoint torn, and a run folder without checkpoints, listed through the CLI as an aligned table."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

from conftest import TINY


def _onestep(args, cwd):
    return subprocess.run([sys.executable, "-m", "onestep.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)


def test_runs_lists_finished_resumable_and_empty_runs(tmp_path):
    out = tmp_path / "runs"  # the default out_root, seen from cwd=tmp_path
    r = _onestep(["train", *TINY, f"out_root={out}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (finished,) = (out / "gmm_dmd2").iterdir()
    stopped = out / "gmm_dmd2" / "stopped"  # killed before its final evaluation, its step-12 checkpoint torn
    shutil.copytree(finished, stopped, ignore=shutil.ignore_patterns(".hydra", "metrics.json", "results.md"))
    state = stopped / "checkpoints" / "step_00000012" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    empty = out / "elsewhere" / "empty"  # failed before its first checkpoint; made by the API: no Hydra record
    empty.mkdir(parents=True)
    shutil.copy(finished / "config.yaml", empty)
    (out / "cache").mkdir(exist_ok=True)  # other folders under out_root are no runs

    r = _onestep(["runs"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    assert lines[0].split() == ["run", "experiment", "step", "headline", "status"]
    for line in lines[1:]:  # every cell starts under its column's header
        assert [m.start() for m in re.finditer(r"\S+", line)] == starts, r.stdout
    student = next(row for row in json.loads((finished / "metrics.json").read_text())["rows"]
                   if row["model"] == "student")
    assert [line.split() for line in lines[1:]] == sorted([  # sorted by path; no Hydra record: (teacher/objective)
        ["elsewhere/empty", "(gmm/dmd2)", "-/12", "-", "empty"],
        [f"gmm_dmd2/{finished.name}", "gmm_dmd2", "12/12", f"sliced_w2={student['sliced_w2']:.4g}", "finished"],
        ["gmm_dmd2/stopped", "(gmm/dmd2)", "8/12", "-", "resumable"],
    ]), r.stdout


def test_runs_without_the_folder_is_one_line(tmp_path):
    r = _onestep(["runs", f"out_root={tmp_path / 'nope'}"], tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onestep: error: out_root") and "nope" in lines[0], lines
