"""tools/gpu_check.py (issue 31) kept from rotting without a GPU: its --dry-run runs every part at toy sizes on the
CPU, through the same code the CUDA run takes, and must give every part its rows with finite numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"
#: the columns each part's measured rows must carry (besides case and status)
COLUMNS = {1: ("max abs err", "max rel err", "tolerance (rel)"), 2: ("ms", "TFLOP/s", "peak GiB"),
           3: ("peak GiB", "s/step"), 4: ("peak GiB", "s/step", "loss"),
           5: ("onestep train (steps/s)", "bare loop (steps/s)", "ratio")}


def _dry_run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the script sets it for the Triton parts alone
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out),
                           *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def _results(out: Path) -> tuple[dict, str]:
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.mark.slow  # ~2 minutes: five subprocesses, two of them short training runs
def test_dry_run_gives_every_part_its_rows(tmp_path):
    r = _dry_run(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data, md = _results(tmp_path)
    head = data["header"]
    assert head["command"] == f"python tools/gpu_check.py --dry-run --out {tmp_path}"
    assert head["mode"].startswith("dry run") and "torch " in head["versions"] and "triton " in head["versions"]
    assert f"- command: `{head['command']}`" in md and f"- device: {head['device']}" in md
    assert [p["part"] for p in data["parts"]] == [1, 2, 3, 4, 5]
    for part in data["parts"]:
        assert part["status"] == "ok", part
        assert f"## Part {part['part']}: {part['title']}" in md
        measured = [row for row in part["rows"] if row["status"] == "ok"]
        assert measured, part
        for row in measured:
            for column in COLUMNS[part["part"]]:
                assert isinstance(row[column], (int, float)) and math.isfinite(row[column]), (column, row)
            assert f"| {row['case']} | " in md
    rows = {p["part"]: p["rows"] for p in data["parts"]}
    assert all(row["max rel err"] <= row["tolerance (rel)"] for row in rows[1])
    assert len(rows[1]) == 2 and len(rows[2]) == 4  # with and without the K, V tangent; four attention methods
    # the same sCD step under both attentions: the same loss, for Flux and for Wan
    assert [row["case"].split(",")[0] for row in rows[4]] == ["Flux", "Flux", "Wan", "Wan"]
    for math_row, flash_row in (rows[4][:2], rows[4][2:]):
        assert flash_row["loss"] == pytest.approx(math_row["loss"], rel=1e-4)
    skipped = [row["case"] for row in rows[3] if row["status"] != "ok"]
    assert all("compile" in case for case in skipped), skipped  # (the xformers-blocked row runs on the CPU too)


def test_a_part_over_its_budget_is_cut_and_reported(tmp_path):
    # part 3 needs ~40 s in the dry run; 0.05 x its 120 s is 6 s
    r = _dry_run(tmp_path, "--parts", "3", "--budget-scale", "0.05")
    assert r.returncode == 1
    data, md = _results(tmp_path)
    (part,) = data["parts"]
    assert part["status"].startswith("cut: over its 6 s budget after "), part
    assert part["seconds"] < 30
    assert f"## Part 3: {part['title']}" in md and part["status"] in md


@pytest.mark.parametrize("args, message", [
    (["--parts", "1,7"], "--parts '1,7': give part numbers from [1, 2, 3, 4, 5]"),
    (["--budget-scale", "0"], "--budget-scale 0.0: must be > 0"),
])
def test_bad_options_are_one_line(tmp_path, args, message):
    r = _dry_run(tmp_path, *args)
    assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1]


def test_without_cuda_the_full_run_says_what_to_do(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no device, on any machine
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "no CUDA device here" in r.stderr and "--dry-run" in r.stderr
    assert not (tmp_path / "gpu_check.md").exists()


def test_a_plain_checkout_runs_without_the_install(tmp_path):
    """The lent GPU machine runs a copy of the repository that is not installed: onestep, onestep.kernels and
    onestep.configs must resolve from the checkout, and nothing of the checkout may shadow the `kernels` package
    diffusers looks for. Python without its site hooks (-S) does not see the editable install; PYTHONPATH gives it torch & co."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p.endswith("site-packages")))
    probe = subprocess.run([sys.executable, "-S", "-c",
                            "import importlib.util; print(importlib.util.find_spec('onestep'))"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert probe.stdout.strip() == "None", probe.stdout + probe.stderr  # onestep is not importable there
    rows = tmp_path / "rows.jsonl"
    # part 4: diffusers' Flux and Wan transformers, onestep's denoisers and objectives, the kernels via the processor
    r = subprocess.run([sys.executable, "-S", str(SCRIPT), "--child", "4", "--rows-file", str(rows), "--dry-run"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(line)["status"] for line in rows.read_text().splitlines()] == ["ok"] * 4  # Flux, Wan


@pytest.mark.parametrize("part, module", [(3, "diffusers"), (3, "hydra"), (4, "diffusers"), (5, "hydra")])
def test_a_missing_package_is_a_skipped_row(monkeypatch, part, module):
    """The lent GPU machine has neither diffusers nor hydra-core unless their wheels travel: the parts that need
    them write one skipped row instead of crashing."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # (the script puts tools/ and tests/ on it)
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now fails as if it were not installed
    assert list(gpu_check.PARTS[part](True, "cpu")) == [{"case": "all", "status": f"skipped: {module} not installed"}]
