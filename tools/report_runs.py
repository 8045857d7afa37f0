"""The README's measured single-experiment runs and benches: run them with the CLI, write their data and results
files (the command, wall time and evaluation protocol on top of the table), and refresh the README blocks they feed.

    python tools/report_runs.py digits_dmd2         [--out-root runs/report] [--threads 1]   # ~4 min
    python tools/report_runs.py gmm_dmd2                                                       # ~4 min, + its bench
    python tools/report_runs.py bench_digits_dmd2                                              # ~10 min
    python tools/report_runs.py consistency                                                    # ~10 min, 5 runs
    python tools/report_runs.py digits_methods                                                 # ~20 min, 4 runs
    python tools/report_runs.py render              # rewrite every markdown file below from its data, running nothing

  digits_dmd2         `onestep train` (the default job)            -> results/digits_dmd2.{json,md}
  gmm_dmd2            `onestep train experiment=gmm_dmd2`          -> results/gmm_dmd2.{json,md}
                      `onestep bench bench.runs=[<that run>]`      -> results/bench_gmm_dmd2.{json,csv,md,png}
  bench_digits_dmd2   `onestep bench bench.runs=[<the digits run>]` -> results/bench_digits_dmd2.{json,csv,md,png}
  consistency         the consistency experiments as shipped (CONSISTENCY) -> results/consistency_experiments.{json,md}
  digits_methods      the newer methods' digits experiments as shipped (DIGITS_METHODS) -> results/digits_methods.{json,md}

The markdown is always rendered from the data (the JSON; a bench's rows from its CSV), so `render` reproduces it
byte for byte (tests/test_results.py). consistency_experiments.json also keeps ``recorded``: a measured 1-step
figure of an earlier commit per experiment; a row worse than its recorded figure says so in the table.
A finished run folder (<out-root>/<experiment>) is reused with the wall seconds it recorded; delete it to
measure again. The bench runs afresh each time (its point cache is cleared first), so its wall time is the command's.
"""

from __future__ import annotations

import argparse
import csv
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
           "bench_digits_dmd2": ("digits_dmd2", True, False), "consistency": (None, False, False),
           "digits_methods": (None, False, False)}
#: the consistency experiment yamls as shipped; "2-step" runs train the same way and are also sampled at sigma 80 -> 0.8
TWO_STEP = ["generator.steps=2", "generator.ts=[80.0,0.8]", "eval.student_steps=[1,2]"]
CONSISTENCY_EVAL = ["eval.num_samples=5000", "eval.teacher_steps=[64]", "eval.plot=false"]
CONSISTENCY = {"gmm_cd": ["experiment=gmm_cd", *TWO_STEP], "gmm_ict": ["experiment=gmm_ict", *TWO_STEP],
               "gmm_scd": ["experiment=gmm_scd", *TWO_STEP],
               "gmm_scd teacher=gmm_grid": ["experiment=gmm_scd", "teacher=gmm_grid"],
               "gmm_rcm": ["experiment=gmm_rcm"]}
#: the digits experiments of the newer methods (issue 37), as shipped -> the teacher's many-step reference (DDIM steps:
#: 32 on the class-conditional digits teacher, 25 on the captioned one, as results/digits_dmd2.md and digits_t2i.md)
DIGITS_METHODS = {"digits_tdm": 32, "digits_apex": 32, "digits_flow_map": 32, "digits_mlcm": 32, "digits_t2i_hipa": 25}
DIGITS_EVAL = ["eval.num_samples=2000", "eval.plot=false"]
MIXTURES = {"ring": "ring 8", "grid": "grid 25", "class_mixture": "classes"}
PHASES = ("setup", "distill", "evaluate")
#: the results files rendered from <name>.json (runs) and bench_<experiment>.{json,csv} (benches)
RUN_REPORTS = ("digits_dmd2", "gmm_dmd2")
BENCH_REPORTS = ("gmm_dmd2", "digits_dmd2")


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


def consistency_data(out_root: Path, threads: int, previous: dict) -> dict:
    """Train (or reuse) each CONSISTENCY run and read its final evaluation; ``previous``'s recorded figures are kept."""
    from onestep.runs import run_config

    rows = []
    for label, overrides in CONSISTENCY.items():
        run = out_root / "consistency" / label.replace(" ", "_").replace("=", "-")
        if not (run / "metrics.json").is_file():
            _onestep(["train", *overrides, *CONSISTENCY_EVAL, f"out_root={out_root}", f"hydra.run.dir={run}"], threads)
        m = json.loads((run / "metrics.json").read_text())
        keys = ("sliced_w2", "modes_covered", "num_modes", "worst_mode_mass_err")
        students = {str(r["steps"]): {k: r[k] for k in keys} for r in m["rows"] if r["model"] == "student"}
        teacher = next(r for r in m["rows"] if r["model"] == "teacher")
        rows.append({"label": label, "mixture": MIXTURES[run_config(run, "run", "pass a run folder").teacher.mixture],
                     "steps": m["steps"], "wall_s": sum(m.get("seconds", {}).get(k, 0.0) for k in PHASES),
                     "students": students, "teacher_sliced_w2": teacher["sliced_w2"]})
    return {"where": _where(threads), "rows": rows, "recorded": previous.get("recorded", {})}


def render_consistency(d: dict) -> str:
    """consistency_experiments.md. A row whose 1-step figure is worse than the one ``recorded`` for it (a measured
    figure of an earlier commit) says so next to the figure, until the experiment is back at that figure."""
    lines = [f"Commands: `onestep train <experiment> {' '.join(CONSISTENCY_EVAL)}` (+ `{' '.join(TWO_STEP)}` for the "
             "rows with a 2-step column: the same training, the student also sampled at EDM sigma 80 -> 0.8; `python "
             f"tools/report_runs.py consistency`), {d['where']}.", "",
             "Protocol: each run's final evaluation, 5,000 samples per row, the same noise in every row; sliced-W2 "
             "against as many exact mixture samples, modes and per-mode masses by posterior.", "",
             "| experiment | mixture | steps | wall (s) | 1 step | 2 steps | modes (1 / 2 step) | worst mode mass err "
             "(1 / 2 step) | teacher DDIM 64 |", "|---|---|---|---|---|---|---|---|---|"]
    regressed = []
    for r in d["rows"]:
        s = {int(k): v for k, v in r["students"].items()}
        one = f"{s[1]['sliced_w2']:.4f}"
        rec = d["recorded"].get(r["label"])
        if rec and s[1]["sliced_w2"] > rec["sliced_w2"]:
            one += f" (regressed: {rec['sliced_w2']:.4f} at {rec['commit']})"
            regressed.append(rec)
        two = f"{s[2]['sliced_w2']:.4f}" if 2 in s else ""
        modes = " / ".join(f"{s[k]['modes_covered']}/{s[k]['num_modes']}" for k in sorted(s))
        mass = " / ".join(f"{s[k]['worst_mode_mass_err']:.1%}" for k in sorted(s))
        lines.append(f"| `{r['label']}` | {r['mixture']} | {r['steps']} | {r['wall_s']:.0f} | {one} | {two} | "
                     f"{modes} | {mass} | {r['teacher_sliced_w2']:.4f} |")
    for rec in regressed:
        lines += ["", f"Regressed: {rec['note']} (recorded in `results/consistency_experiments.json`)."]
    return "\n".join(lines) + "\n"


def digits_methods_data(out_root: Path, threads: int) -> dict:
    """Train (or reuse) each DIGITS_METHODS run and read its final evaluation: FD per student step count, the
    teacher's FD at the experiment's reference step count."""
    rows = []
    for experiment, teacher_steps in DIGITS_METHODS.items():
        run = out_root / "digits_methods" / experiment
        if not (run / "metrics.json").is_file():
            _onestep(["train", f"experiment={experiment}", *DIGITS_EVAL, f"eval.teacher_steps=[{teacher_steps}]",
                      f"out_root={out_root}", f"hydra.run.dir={run}"], threads)
        m = json.loads((run / "metrics.json").read_text())
        student = {str(r["steps"]): {k: r[k] for k in ("fd", "label_acc")} for r in m["rows"]
                   if r["model"] == "student"}
        teacher = next(r for r in m["rows"] if r["model"] == "teacher" and r["steps"] == teacher_steps)
        rows.append({"experiment": experiment, "objective": m["objective"], "steps": m["steps"],
                     "teacher_steps": teacher_steps,
                     "wall_s": sum(m.get("seconds", {}).get(k, 0.0) for k in PHASES), "students": student,
                     "teacher_fd": teacher["fd"], "teacher_label_acc": teacher["label_acc"]})
    return {"where": _where(threads), "rows": rows}


def render_digits_methods(d: dict, dmd2: dict | None = None) -> str:
    """digits_methods.md: one row per experiment, the student's FD at 1 (and 2) steps against the teacher's many;
    ``dmd2``: the default job's data (digits_dmd2.json), its 1-step FD quoted for reference."""
    lines = [f"Commands: `onestep train experiment=<experiment> {' '.join(DIGITS_EVAL)} eval.teacher_steps=[<n>]` "
             "(`python tools/report_runs.py "
             f"digits_methods`), {d['where']}.", "",
             "Protocol: each run's final evaluation (seed 0, one run each), 2,000 samples per row, the same noise and "
             "labels in every row; FD "
             "in the shipped digits feature space (not Inception FID) against all 1,797 digits, label accuracy from "
             "the same network's classifier (of the prompted digit on the captioned teacher). Lower FD is better; the "
             "ratio is the 1-step student's FD over the teacher's n-step DDIM FD (n = 32 on the class-conditional "
             "teacher, 25 on the captioned one: `digits_t2i_*`).", "",
             "| experiment | objective | steps | wall (s) | FD 1 step | FD 2 steps | label acc (1 step) | teacher FD "
             "(n steps) | 1-step / teacher |", "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        s = r["students"]
        two = f"{s['2']['fd']:.3f}" if "2" in s else ""
        lines.append(f"| `{r['experiment']}` | {r['objective']} | {r['steps']} | {r['wall_s']:.0f} | "
                     f"{s['1']['fd']:.3f} | {two} | {s['1']['label_acc']:.1%} | {r['teacher_fd']:.3f} "
                     f"({r['teacher_steps']}) | "
                     f"{s['1']['fd'] / r['teacher_fd']:.2f}x |")
    if dmd2 is not None:
        student, teachers = _student_and_teachers(dmd2["rows"])
        lines += ["", f"For reference, the default job (`onestep train`, DMD2, {dmd2['steps']} steps; "
                      f"results/digits_dmd2.md): 1-step FD {student['fd']:.3f}, {dmd2['student_x_teacher']:.2f}x the "
                      f"teacher's {teachers[-1]['steps']}-step FD."]
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


def run_data(experiment: str, run: Path, threads: int) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    rows, head = m["rows"], m.get("headline", "sliced_w2")
    student, teachers = _student_and_teachers(rows)
    return {"command": "onestep train" if experiment == "digits_dmd2" else f"onestep train experiment={experiment}",
            "report": experiment, "steps": m["steps"], "seconds": {k: m.get("seconds", {}).get(k, 0.0) for k in PHASES},
            "wall_s": sum(m.get("seconds", {}).get(k, 0.0) for k in PHASES), "where": _where(threads),
            "protocol": _protocol(run), "headline": head, "rows": rows,
            "student_x_teacher": student[head] / teachers[-1][head], "teacher_x_student": teachers[0][head] / student[head]}


def _student_and_teachers(rows: list[dict]) -> tuple[dict, list[dict]]:
    """The 1-step student's row and the teacher's rows, fewest steps first."""
    student = next(r for r in rows if r["model"] == "student" and r["steps"] == 1)
    return student, sorted((r for r in rows if r["model"] == "teacher"), key=lambda r: r["steps"])


def render_run(d: dict) -> str:
    """results/<experiment>.md: the command and wall time, the protocol, the run's table, the ratios to the teacher."""
    from onestep.eval.report import COLUMNS, markdown_table

    sec = d["seconds"]
    label = next(title for key, title, _ in COLUMNS if key == d["headline"])
    _, teachers = _student_and_teachers(d["rows"])
    lines = [f"Command: `{d['command']}` ({d['steps']} steps; `python tools/report_runs.py {d['report']}`): "
             f"{d['wall_s']:.0f} s wall (setup {sec['setup']:.0f} s, distillation {sec['distill']:.0f} s, evaluation "
             f"{sec['evaluate']:.0f} s) on {d['where']}.", "",
             f"Protocol: the run's final evaluation, {d['protocol']}.", "", markdown_table(d["rows"]), "",
             f"The 1-step student's {label} is {d['student_x_teacher']:.2f}x the teacher's "
             f"{teachers[-1]['steps']}-step {label}; the teacher's own {teachers[0]['steps']}-step {label} is "
             f"{d['teacher_x_student']:.1f}x the student's."]
    return "\n".join(lines) + "\n"


def bench_data(experiment: str, run: Path, out_root: Path, threads: int) -> dict:
    """Run `onestep bench` on the run afresh (its wall time is the command's); its CSV becomes results/bench_*.csv."""
    folder = out_root / "bench" / experiment
    shutil.rmtree(folder, ignore_errors=True)
    wall = _onestep(["bench", f"bench.runs=[{run}]", f"out_root={out_root}"], threads)
    for ext in ("csv", "png"):
        shutil.copyfile(folder / f"bench.{ext}", ROOT / "results" / f"bench_{experiment}.{ext}")
    return {"experiment": experiment, "report": "gmm_dmd2" if experiment == "gmm_dmd2" else f"bench_{experiment}",
            "steps": json.loads((run / "metrics.json").read_text())["steps"], "wall_s": wall, "where": _where(threads),
            "protocol": _protocol(run)}


def render_bench(d: dict, rows: list[dict]) -> str:
    """results/bench_<experiment>.md from its JSON (command, wall time, protocol) and its CSV (the points)."""
    from onestep.eval.report import markdown_table

    exp = d["experiment"]
    measured = (f"{len(rows)} points in {d['wall_s']:.0f} s wall on {d['where']}" if d["wall_s"] is not None
                else f"{len(rows)} points (wall time and machine not recorded)")
    lines = [f"Command: `onestep bench bench.runs=[<the {d['steps']}-step {exp} run>]` (`python "
             f"tools/report_runs.py {d['report']}`): {measured}.", "",
             f"Protocol: the run's own (its config.yaml), {d['protocol']}. The run's final evaluation uses the same "
             "noise, so the student's 1-step row and the teacher's DDIM rows repeat its results table exactly.", "",
             markdown_table(rows), "", f"![quality vs NFE, {exp}](results/bench_{exp}.png)"]
    return "\n".join(lines) + "\n"


def read_csv(path: Path) -> list[dict]:
    """The rows `onestep bench` wrote, with its numbers as numbers (an empty cell stays empty)."""
    def value(v: str):
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def rendered(folder: Path) -> dict[str, str]:
    """Every markdown file this tool writes, rendered from the data files in ``folder`` alone."""
    def data(name: str) -> dict:
        return json.loads((folder / f"{name}.json").read_text())

    out = {f"{name}.md": render_run(data(name)) for name in RUN_REPORTS}
    for exp in BENCH_REPORTS:
        out[f"bench_{exp}.md"] = render_bench(data(f"bench_{exp}"), read_csv(folder / f"bench_{exp}.csv"))
    out["consistency_experiments.md"] = render_consistency(data("consistency_experiments"))
    if (folder / "digits_methods.json").is_file():
        out["digits_methods.md"] = render_digits_methods(data("digits_methods"), data("digits_dmd2"))
    return out


def write(name: str, data: dict) -> str:
    """results/<name>.json, then results/<name>.md rendered from what was written."""
    (ROOT / "results" / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    text = rendered(ROOT / "results")[f"{name}.md"]
    (ROOT / "results" / f"{name}.md").write_text(text, encoding="utf-8")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", choices=sorted(REPORTS) + ["render"])
    ap.add_argument("--out-root", default="runs/report")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.report == "render":
        written = list(rendered(ROOT / "results").items())
        for name, text in written:
            (ROOT / "results" / name).write_text(text, encoding="utf-8")
    else:
        written = measure(args.report, Path(args.out_root).resolve(), args.threads)
    for name, text in written:
        print(text)
        print("README block updated" if update_readme(f"results/{name}") else f"README has no block for {name}")


def measure(report: str, out_root: Path, threads: int) -> list[tuple[str, str]]:
    experiment, with_bench, with_run = REPORTS[report]
    if report == "digits_methods":
        return [("digits_methods.md", write("digits_methods", digits_methods_data(out_root, threads)))]
    if experiment is None:
        saved = ROOT / "results" / "consistency_experiments.json"
        previous = json.loads(saved.read_text()) if saved.exists() else {}
        return [("consistency_experiments.md", write("consistency_experiments",
                                                      consistency_data(out_root, threads, previous)))]
    run = train_run(experiment, out_root, threads)
    written = []
    if with_run:
        written.append((f"{experiment}.md", write(experiment, run_data(experiment, run, threads))))
    if with_bench:
        written.append((f"bench_{experiment}.md", write(f"bench_{experiment}",
                                                         bench_data(experiment, run, out_root, threads))))
    return written


if __name__ == "__main__":
    main()
