"""Benchmark every objective on the exact Gaussian-mixture tasks, next to the teacher's own sampler.

    OMP_NUM_THREADS=1 python tools/bench_objectives.py [tasks=ring8,grid25,classes16] [only=dmd2,sid] \
        [out=results] [root=runs/bench_objectives] [samples=5000] [budget_s=1500] [hydra.key=value ...]

Arguments with a dot are Hydra overrides added to every run (e.g. trainer.steps=20 for a smoke run). Runs that
would start after ``budget_s`` seconds are skipped and listed as such.

For each task (TASKS: a base experiment) it evaluates the teacher (DDIM) at 1/2/4/8/16/32/64 steps, then trains a
1-step student per BENCH row (task overrides + row overrides), reading sliced-W2, modes covered and the worst
per-mode mass error of the EMA generator on the same evaluation noise, the training wall time, and the first
checkpoint step at which sliced-W2 falls below the threshold (THRESHOLD_X times the teacher's 64-step value).
Writes <out>/objectives_gmm.{md,json,png}: one table per task and one scatter panel per objective and teacher, and
<out>/objectives_gmm_summary.md: the README's table (tasks as columns). ``render`` alone writes both markdown files
again from objectives_gmm.json without running anything: ``python tools/bench_objectives.py render``.
Rows not run by this invocation (other tasks, or objectives left out by only=) are kept from the previous
objectives_gmm.json, so a new row can be benchmarked alone: ``only=<new row>``.

To add an objective, add one row to BENCH (e.g. ``"cd": ["objective=cd"]``).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file

import onestep.config  # noqa: F401
import onestep.objectives  # noqa: F401
from onestep import experiment
from onestep.denoisers.base import guided
from onestep.eval.report import chunked, eval_inputs
from onestep.generator import Student
from onestep.sampling import sample
from onestep import checkpoint
from onestep.train.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_block import ROOT, update_readme  # noqa: E402

TASKS: dict[str, dict] = {
    "ring8": {"title": "2-D ring, 8 modes", "overrides": ["experiment=bench_ring8"]},
    "grid25": {"title": "2-D grid, 25 modes, unequal weights", "overrides": ["experiment=bench_grid25"]},
    "classes16": {"title": "16-D, 10 classes x 2 components, CFG 2", "overrides": ["experiment=bench_classes16"],
                  "samples": 3000},  # the exact 16-D posterior is costly: fewer evaluation samples
}

CD = ["objective=cd", "generator.sigma_init=null", "generator.consistency_boundary=true", "trainer.generator_optim.lr=1e-3"]
SCD = ["objective=scd", "generator.sigma_init=null", "objective.warmup_steps=200", "trainer.generator_optim.lr=1e-3"]
RCM = ["objective=rcm", "generator.sigma_init=null", "objective.warmup_steps=200", "objective.dm_weight=0.1",
       "objective.ttur=2", "trainer.generator_optim.lr=1e-3", "trainer.critic_optim.lr=1e-3"]
TWO_STEP = ["generator.steps=2", "generator.ts=[80.0,0.8]", "eval.student_steps=[2]"]

#: objective rows: name -> overrides added to each task's bench_<task>.yaml (unset keys: the objective's defaults)
BENCH: dict[str, list[str]] = {
    "dmd": ["objective=dmd", "objective.regression_weight=0.25"],
    "dmd2": ["objective=dmd2", "objective.discriminator=critic", "objective.gan_weight=0.01"],
    "vsd": ["objective=vsd"],
    "sid": ["objective=sid"],
    "sida": ["objective=sida"],
    "sim": ["objective=sim"],
    "fdistill": ["objective=fdistill"],
    "adversarial": ["objective=adversarial"],
    # consistency family (configs/experiment/gmm_{cd,scd,rcm}.yaml): sampling starts at sigma_max as consistency
    # models are trained to (no sigma_init); the 2-step rows sample at EDM sigma 80 -> 0.8
    "cd": CD,
    "cd_2step": CD + TWO_STEP,
    "scd": SCD,
    "scd_2step": SCD + TWO_STEP,
    "rcm": RCM,
    "rcm_2step": RCM + TWO_STEP,
}

TEACHER_STEPS = (1, 2, 4, 8, 16, 32, 64)
THRESHOLD_X = 3.0  # "converged": sliced-W2 within 3x of the teacher's 64-step sampler
EVAL_SEED = 12345  # the trainer's evaluation seed (onestep.eval.report.compare)
CHECKPOINTS = 8  # checkpoints per run, evaluated for steps-to-threshold
#: the summary's rows: the distribution-matching objectives (the consistency family's rows: results/consistency_gmm.md)
SUMMARY_ROWS = ("dmd", "dmd2", "vsd", "sid", "sida", "sim", "fdistill", "adversarial")
SUMMARY_TEACHER_STEPS = (1, 4, 16, 64)
SUMMARY_LABELS = {"fdistill": "`fdistill` (js)"}
SUMMARY_COLUMNS = {"ring8": "ring8 (8 modes)", "grid25": "grid25 (25 modes, weights up to 4x apart)",
                   "classes16": "classes16 (16-D, 10 classes, CFG 2)"}


def compose_cfg(overrides: list[str]):
    with initialize_config_module("onestep.configs", version_base="1.3"):
        return compose("config", overrides=overrides)


def teacher_rows(task: str, root: Path, n: int, extra: list[str]):
    """Teacher DDIM at TEACHER_STEPS on the evaluation noise; also trains and caches the task's teacher net."""
    cfg = compose_cfg(TASKS[task]["overrides"] + ["objective=dmd2", f"eval.num_samples={n}"] + extra)
    cache = root / task / "_teacher"
    cache.mkdir(parents=True, exist_ok=True)
    setup = experiment.build(cfg, cache, progress=False)
    teacher = guided(setup.teacher, cfg.teacher.guidance)
    noise, cond = eval_inputs(setup, n, EVAL_SEED)
    rows, samples = [], {}
    for k in TEACHER_STEPS:
        rng = torch.Generator().manual_seed(EVAL_SEED)
        ts = teacher.schedule.default_ts(k)
        t0 = time.perf_counter()
        x = chunked(lambda z, c: sample(teacher, z, ts, c, method="ddim", generator=rng), noise, cond)  # noqa: B023
        m = setup.evaluator.metrics(x, cond)
        rows.append(_row(f"teacher {k} step{'s' if k > 1 else ''}", m, time.perf_counter() - t0, None))
        samples[rows[-1]["name"]] = (x, cond)
    return setup, cache / "teacher_net.safetensors", rows, samples


def student_row(task: str, name: str, root: Path, teacher_cache: Path, n: int, threshold: float, setup,
                extra: list[str]):
    run = root / task / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    shutil.copy(teacher_cache, run / "teacher_net.safetensors")
    base = compose_cfg(TASKS[task]["overrides"] + BENCH[name] + extra)
    every = max(1, base.trainer.steps // CHECKPOINTS)
    cfg = compose_cfg(TASKS[task]["overrides"] + BENCH[name] + extra + [
        "trainer.progress=false", "eval.teacher_steps=[1]", f"eval.num_samples={n}", "eval.plot=false",
        f"trainer.checkpoint_every={every}", f"trainer.keep_checkpoints={CHECKPOINTS + 1}"])
    t0 = time.perf_counter()
    out = train(cfg, run)
    wall = time.perf_counter() - t0
    student = [r for r in out["rows"] if r["model"] == "student"][0]
    reached = steps_to_threshold(cfg, run, setup, threshold, min(n, 2000))
    row = _row(name, student, wall, reached)
    x = _final_samples(cfg, run, setup, n)
    return row, x


def _generator(setup, ckpt: Path, gc):
    net = experiment.shape_student(gc, copy.deepcopy(setup.student_init))  # e.g. consistency_boundary (CD rows)
    net.load_state_dict(load_file(str(ckpt / "generator_ema.safetensors")))
    return net.eval()


def _student_samples(cfg, setup, ckpt: Path, n: int):
    gc = cfg.generator
    student = Student(setup.teacher.schedule, gc.steps, gc.ts, gc.method, gc.sigma_init)
    net = _generator(setup, ckpt, gc)
    noise, cond = eval_inputs(setup, n, EVAL_SEED)
    rng = torch.Generator().manual_seed(EVAL_SEED)
    with torch.no_grad():
        return chunked(lambda z, c: student.sample(net, z, c, None, rng), noise, cond), cond


def steps_to_threshold(cfg, run: Path, setup, threshold: float, n: int):
    for ckpt in checkpoint.list_checkpoints(run):
        x, cond = _student_samples(cfg, setup, ckpt, n)
        if setup.evaluator.metrics(x, cond)["sliced_w2"] <= threshold:
            return int(ckpt.name.split("_")[1])
    return None


def _final_samples(cfg, run: Path, setup, n: int):
    return _student_samples(cfg, setup, checkpoint.list_checkpoints(run)[-1], n)


def _row(name, m, wall, reached):
    return {"name": name, "nfe": m.get("nfe", 1), "sliced_w2": m["sliced_w2"],
            "modes": f"{m['modes_covered']}/{m['num_modes']}",
            "all_modes": m["modes_covered"] == m["num_modes"], "worst_mass_err": m["worst_mode_mass_err"],
            "wall_s": wall, "steps_to_threshold": reached}


def markdown(task: str, rows: list[dict], threshold: float) -> str:
    t64 = [r for r in rows if r["name"] == "teacher 64 steps"][0]["sliced_w2"]
    lines = [f"### {TASKS[task]['title']} (`{task}`)", "",
             f"Threshold for 'steps to threshold': sliced-W2 <= {threshold:.4f} ({THRESHOLD_X:g}x the teacher's "
             f"64-step {t64:.4f}).", "",
             "| model | NFE | sliced-W2 | x teacher-64 | modes | worst mode mass err | wall (s) | steps to threshold |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['name']} | 1 | not run (bench time budget spent) | | | | | |")
            continue
        nfe = r["name"].split()[1] if r["name"].startswith("teacher") else str(r.get("nfe", 1))
        reached = "" if r["name"].startswith("teacher") else (str(r["steps_to_threshold"]) if r["steps_to_threshold"]
                                                               is not None else "not reached")
        lines.append(f"| {r['name']} | {nfe} | {r['sliced_w2']:.4f} | {r['sliced_w2'] / t64:.2f} | {r['modes']} | "
                     f"{r['worst_mass_err']:.1%} | {r['wall_s']:.1f} | {reached} |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    """One row per teacher step count / objective, one column per task: sliced-W2 (x the teacher's 64-step), modes,
    worst mode mass error[, wall time, steps to threshold]."""
    tasks = [t for t in TASKS if t in results]
    by_name = {t: {r["name"]: r for r in results[t]} for t in tasks}

    def cell(task: str, name: str) -> str:
        r = by_name[task].get(name)
        if r is None or r.get("skipped"):
            return "not run"
        base = f"{r['sliced_w2']:.3f}, {r['modes']}, {r['worst_mass_err']:.0%}"
        if name.startswith("teacher"):
            return base
        t64 = by_name[task]["teacher 64 steps"]["sliced_w2"]
        reached = r["steps_to_threshold"] if r["steps_to_threshold"] is not None else "not reached"
        return (f"**{r['sliced_w2']:.3f}** ({r['sliced_w2'] / t64:.1f}x), {r['modes']}, {r['worst_mass_err']:.0%}, "
                f"{r['wall_s']:.0f} s, {reached}")

    lines = ["Written by `OMP_NUM_THREADS=1 python tools/bench_objectives.py` (from `results/objectives_gmm.json`). "
             f"Each cell: sliced-W2 (x the teacher's 64-step DDIM), modes covered, worst per-mode relative mass error, "
             f"training wall time, and the first checkpoint (every 1/{CHECKPOINTS} of the run) whose sliced-W2 is "
             f"within {THRESHOLD_X:g}x of the teacher's 64-step value.", "",
             "| | " + " | ".join(SUMMARY_COLUMNS.get(t, t) for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for k in SUMMARY_TEACHER_STEPS:
        name = f"teacher {k} step{'s' if k > 1 else ''}"
        lines.append(f"| teacher DDIM {k} NFE | " + " | ".join(cell(t, name) for t in tasks) + " |")
    for name in SUMMARY_ROWS:
        if any(name in by_name[t] for t in tasks):
            label = SUMMARY_LABELS.get(name, f"`{name}`")
            lines.append(f"| {label} 1 NFE | " + " | ".join(cell(t, name) for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, panels_by_task: dict[str, tuple]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(p) for _, p in panels_by_task.values())
    fig, axes = plt.subplots(len(panels_by_task), cols, figsize=(2.1 * cols, 2.3 * len(panels_by_task)),
                             squeeze=False)
    for row, (task, (setup, panels)) in enumerate(panels_by_task.items()):
        ev = setup.evaluator
        ref = ev.mixture.sample(20000, generator=torch.Generator().manual_seed(0)) @ ev.view
        lim = float(ref.abs().max()) * 1.2
        for col in range(cols):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(panels):
                ax.axis("off")
                continue
            title, (x, _), sw2 = panels[col]
            ax.hist2d(ref[:, 0].numpy(), ref[:, 1].numpy(), bins=100, range=[[-lim, lim], [-lim, lim]], cmap="Greys",
                      density=True)
            p = (x.double() @ ev.view)[:3000]
            ax.scatter(p[:, 0].numpy(), p[:, 1].numpy(), s=1, alpha=0.5,
                       color="tab:blue" if title.startswith("teacher") else "tab:red")
            ax.set_title(f"{title}\nSW2 {sw2:.3f}", fontsize=7)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
        axes[row][0].set_ylabel(task, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    if argv == ["render"]:
        _write(Path("results"), json.loads(Path("results/objectives_gmm.json").read_text()))
        return 0
    extra = [a for a in argv if "." in a.split("=", 1)[0]]
    args = dict(a.split("=", 1) for a in argv if a not in extra)
    budget, start = float(args.get("budget_s", 1500)), time.perf_counter()
    tasks = args.get("tasks", ",".join(TASKS)).split(",")
    names = args.get("only", ",".join(BENCH)).split(",")
    out, root = Path(args.get("out", "results")), Path(args.get("root", "runs/bench_objectives"))
    samples_default = int(args.get("samples", 5000))
    unknown = [t for t in tasks if t not in TASKS] + [b for b in names if b not in BENCH]
    if unknown:
        print(f"bench_objectives: unknown task/objective {unknown}; tasks {list(TASKS)}, objectives {list(BENCH)}",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    # merge: rows of objectives/tasks not run now are kept from the previous results (and re-plotted from their
    # run folders), so one invocation can add rows without re-running the rest
    saved = out / "objectives_gmm.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    panels_by_task = {}
    for task in tasks + [t for t in TASKS if t in results and t not in tasks]:
        n = TASKS[task].get("samples", samples_default)
        setup, cache, rows, samples = teacher_rows(task, root, n, extra)
        panels = [(r["name"].replace(" steps", "").replace(" step", ""), samples[r["name"]], r["sliced_w2"])
                  for r in rows]
        if task not in tasks:  # a task kept from before: its table keeps the teacher rows it was measured with
            rows = [r for r in results[task] if r["name"].startswith("teacher")]
        threshold = THRESHOLD_X * rows[-1]["sliced_w2"]
        kept = {r["name"]: r for r in results.get(task, []) if not r["name"].startswith("teacher")}
        for name in BENCH:
            if task not in tasks or name not in names:
                if name in kept:
                    rows.append(kept[name])
                    x = _saved_samples(task, name, root, n, setup, extra)
                    if x is not None and not kept[name].get("skipped"):
                        panels.append((name, x, kept[name]["sliced_w2"]))
                continue
            if time.perf_counter() - start > budget:
                print(f"[{task}] {name}: skipped (budget_s={budget:g} spent)", flush=True)
                rows.append({"name": name, "skipped": True})
                continue
            print(f"[{task}] {name} ...", flush=True)
            row, x = student_row(task, name, root, cache, n, threshold, setup, extra)
            rows.append(row)
            panels.append((name, x, row["sliced_w2"]))
            print(f"[{task}] {name}: sliced-W2 {row['sliced_w2']:.4f} modes {row['modes']} "
                  f"mass err {row['worst_mass_err']:.1%} {row['wall_s']:.0f} s", flush=True)
            results[task] = rows
            _write(out, results)
        results[task] = rows
        _write(out, results)
        panels_by_task[task] = (setup, panels)
        plot(out / "objectives_gmm.png", panels_by_task)
    return 0


def _saved_samples(task: str, name: str, root: Path, n: int, setup, extra: list[str]):
    """Final samples of an earlier run of this row, from its run folder (None if it is gone)."""
    run = root / task / name
    if not checkpoint.list_checkpoints(run):
        return None
    cfg = compose_cfg(TASKS[task]["overrides"] + BENCH[name] + extra)
    return _final_samples(cfg, run, setup, n)


def _write(out: Path, results: dict) -> None:
    head = ("# Objectives on exact Gaussian mixtures\n\n1-step students (EMA generator) vs the teacher's DDIM "
            "sampler on the same evaluation noise; written by `tools/bench_objectives.py`.\n\n")
    sections = []
    for task in [t for t in TASKS if t in results]:
        t64 = [r for r in results[task] if r["name"] == "teacher 64 steps"][0]["sliced_w2"]
        sections.append(markdown(task, results[task], THRESHOLD_X * t64))
    (out / "objectives_gmm.md").write_text(head + "\n\n".join(sections) + "\n")
    (out / "objectives_gmm.json").write_text(json.dumps(results, indent=1))
    (out / "objectives_gmm_summary.md").write_text(summary(results))
    if out.resolve() == ROOT / "results":
        update_readme("results/objectives_gmm_summary.md")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
