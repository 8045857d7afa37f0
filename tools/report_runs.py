"""The README's measured single-experiment runs and benches: run them with the CLI, write their results files (the
command, wall time and evaluation protocol on top of the table), and refresh the README blocks fed by those files.

    python tools/report_runs.py digits_dmd2         [--out-root runs/report] [--threads 1]   # ~4 min
    python tools/report_runs.py gmm_dmd2                                                       # ~4 min, + its bench
    python tools/report_runs.py bench_digits_dmd2                                              # ~10 min
    python tools/report_runs.py consistency                                                    # ~10 min, 5 runs

  digits_dmd2         `onestep train` (the default job)            -> results/digits_dmd2.md
  gmm_dmd2            `onestep train experiment=gmm_dmd2`          -> results/gmm_dmd2.md
                      `onestep bench bench.runs=[<that run>]`      -> results/bench_gmm_dmd2.{md,csv,png}
  bench_digits_dmd2   `onestep bench bench.runs=[<the digits run>]` -> results/bench_digits_dmd2.{md,csv,png}
  consistency         the consistency experiments as shipped (CONSISTENCY) -> results/consistency_experiments.md

A finished run folder (<out-root>/<experiment>) is reused with the wall seconds it recorded; delete it to
measure again. The bench runs afresh each time (its point cache is cleared first), so its wall time is the command's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_block import ROOT, update_readme  # noqa: E402

#: report -> (experiment trained, bench it too, write the run's own table)
REPORTS = {"digits_dmd2": ("digits_dmd2", False, True), "gmm_dmd2": ("gmm_dmd2", True, True),
           "bench_digits_dmd2": ("digits_dmd2", True, False), "consistency": (None, False, False)}
#: the consistency experiment yamls as shipped; "2-step" runs train the same way and are also sampled at sigma 80 -> 0.8
TWO_STEP = ["generator.steps=2", "generator.ts=[80.0,0.8]", "eval.student_steps=[1,2]"]
CONSISTENCY_EVAL = ["eval.num_samples=5000", "eval.teacher_steps=[64]", "eval.plot=false"]
CONSISTENCY = {"gmm_cd": ["experiment=gmm_cd", *TWO_STEP], "gmm_ict": ["experiment=gmm_ict", *TWO_STEP],
               "gmm_scd": ["experiment=gmm_scd", *TWO_STEP],
               "gmm_scd teacher=gmm_grid": ["experiment=gmm_scd", "teacher=gmm_grid"],
               "gmm_rcm": ["experiment=gmm_rcm"]}
MIXTURES = {"ring": "ring 8", "grid": "grid 25", "class_mixture": "classes"}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def _where(threads: int) -> str:
    return f"{_cpu()}, {threads} torch thread(s), a machine shared with other jobs (times are indicative)"


def train_run(experiment: str, out_root: Path, threads: int) -> Path:
    run = out_root / experiment  # bench labels a student by its folder's name
    if not (run / "metrics.json").is_file():
        _onestep(["train", f"experiment={experiment}", f"out_root={out_root}", f"hydra.run.dir={run}"], threads)
    return run


def consistency_report(out_root: Path, threads: int) -> str:
    from onestep.runs import run_config

    lines = [f"Commands: `onestep train <experiment> {' '.join(CONSISTENCY_EVAL)}` (+ `{' '.join(TWO_STEP)}` for the "
             "rows with a 2-step column: the same training, the student also sampled at EDM sigma 80 -> 0.8; `python "
             f"tools/report_runs.py consistency`), {_where(threads)}.", "",
             "Protocol: each run's final evaluation, 5,000 samples per row, the same noise in every row; sliced-W2 "
             "against as many exact mixture samples, modes and per-mode masses by posterior.", "",
             "| experiment | mixture | steps | wall (s) | 1 step | 2 steps | modes (1 / 2 step) | worst mode mass err "
             "(1 / 2 step) | teacher DDIM 64 |", "|---|---|---|---|---|---|---|---|---|"]
    for label, overrides in CONSISTENCY.items():
        run = out_root / "consistency" / label.replace(" ", "_").replace("=", "-")
        if not (run / "metrics.json").is_file():
            _onestep(["train", *overrides, *CONSISTENCY_EVAL, f"out_root={out_root}", f"hydra.run.dir={run}"], threads)
        m = json.loads((run / "metrics.json").read_text())
        s = {r["steps"]: r for r in m["rows"] if r["model"] == "student"}
        t64 = next(r for r in m["rows"] if r["model"] == "teacher")
        wall = sum(m.get("seconds", {}).get(k, 0.0) for k in ("setup", "distill", "evaluate"))
        two = f"{s[2]['sliced_w2']:.4f}" if 2 in s else ""
        modes = " / ".join(f"{s[k]['modes_covered']}/{s[k]['num_modes']}" for k in sorted(s))
        mass = " / ".join(f"{s[k]['worst_mode_mass_err']:.1%}" for k in sorted(s))
        mixture = MIXTURES[run_config(run, "run", "pass a run folder").teacher.mixture]
        lines.append(f"| `{label}` | {mixture} | {m['steps']} | {wall:.0f} | {s[1]['sliced_w2']:.4f} | {two} | "
                     f"{modes} | {mass} | {t64['sliced_w2']:.4f} |")
    return "\n".join(lines) + "\n"


def _onestep(args: list[str], threads: int) -> float:
    cmd = [sys.executable, "-m", "onestep.cli", *args]
    print("$ onestep", " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - start


def _protocol(run: Path) -> str:
    """The evaluation protocol of a run (and of `onestep bench` on it), read from its config.yaml."""
    from onestep.eval.report import compare
    from onestep.runs import run_config

    cfg = run_config(run, "run", "pass a run folder")
    seed = compare.__kwdefaults__["seed"]
    what = {"gmm": "sliced-W2 against as many exact mixture samples, modes and per-mode masses by posterior",
            "digits": "FD / KID / precision / recall in the shipped digits feature space (not Inception FID) against "
                      "all 1,797 digits, class coverage and label accuracy from the same network's classifier"}
    return (f"{int(cfg.bench.num_samples or cfg.eval.num_samples):,} samples per row, the same noise and labels in "
            f"every row (seed {seed}); {what.get(cfg.teacher.kind, 'the experiment evaluator')}")


def run_report(experiment: str, run: Path, threads: int) -> str:
    from onestep.eval.report import COLUMNS, markdown_table

    m = json.loads((run / "metrics.json").read_text())
    sec = m.get("seconds", {})
    wall = sum(sec.get(k, 0.0) for k in ("setup", "distill", "evaluate"))
    rows = m["rows"]
    head = m.get("headline", "sliced_w2")
    label = next(title for key, title, _ in COLUMNS if key == head)
    student = next(r for r in rows if r["model"] == "student" and r["steps"] == 1)
    teachers = sorted((r for r in rows if r["model"] == "teacher"), key=lambda r: r["steps"])
    cmd = "onestep train" if experiment == "digits_dmd2" else f"onestep train experiment={experiment}"
    lines = [f"Command: `{cmd}` ({m['steps']} steps; `python tools/report_runs.py {experiment}`): {wall:.0f} s wall "
             f"(setup {sec.get('setup', 0):.0f} s, distillation {sec.get('distill', 0):.0f} s, evaluation "
             f"{sec.get('evaluate', 0):.0f} s) on {_where(threads)}.", "",
             f"Protocol: the run's final evaluation, {_protocol(run)}.", "", markdown_table(rows), "",
             f"The 1-step student's {label} is {student[head] / teachers[-1][head]:.2f}x the teacher's "
             f"{teachers[-1]['steps']}-step {label}; the teacher's own {teachers[0]['steps']}-step {label} is "
             f"{teachers[0][head] / student[head]:.1f}x the student's."]
    return "\n".join(lines) + "\n"


def bench_report(experiment: str, run: Path, out_root: Path, threads: int) -> str:
    folder = out_root / "bench" / experiment
    shutil.rmtree(folder, ignore_errors=True)
    wall = _onestep(["bench", f"bench.runs=[{run}]", f"out_root={out_root}"], threads)
    rows = (folder / "bench.md").read_text().strip()
    for ext in ("csv", "png"):
        shutil.copyfile(folder / f"bench.{ext}", ROOT / "results" / f"bench_{experiment}.{ext}")
    points = len(rows.splitlines()) - 2
    steps = json.loads((run / "metrics.json").read_text())["steps"]
    lines = [f"Command: `onestep bench bench.runs=[<the {steps}-step {experiment} run>]` (`python "
             f"tools/report_runs.py {'gmm_dmd2' if experiment == 'gmm_dmd2' else 'bench_' + experiment}`): {points} "
             f"points in {wall:.0f} s wall on {_where(threads)}.", "",
             f"Protocol: the run's own (its config.yaml), {_protocol(run)}. The run's final evaluation uses the same "
             "noise, so the student's 1-step row and the teacher's DDIM rows repeat its results table exactly.", "",
             rows, "", f"![quality vs NFE, {experiment}](results/bench_{experiment}.png)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", choices=sorted(REPORTS))
    ap.add_argument("--out-root", default="runs/report")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    experiment, with_bench, with_run = REPORTS[args.report]
    out_root = Path(args.out_root).resolve()
    if experiment is None:
        written = [("results/consistency_experiments.md", consistency_report(out_root, args.threads))]
    else:
        run = train_run(experiment, out_root, args.threads)
        written = []
    if with_run:
        written.append((f"results/{experiment}.md", run_report(experiment, run, args.threads)))
    if with_bench:
        written.append((f"results/bench_{experiment}.md", bench_report(experiment, run, out_root, args.threads)))
    for name, text in written:
        (ROOT / name).write_text(text, encoding="utf-8")
        print(text)
        print("README block updated" if update_readme(name) else f"README has no block for {name}")


if __name__ == "__main__":
    main()
