"""Students that beat their teachers: the papers' full recipes on real data, two stages where the paper has two.

    python tools/report_full_recipes.py [--only digits_dmd2_gan,...] [--seeds 0 1 2] [--out-root runs/full_recipes]
                                        [--threads 1] [--note "..."] [--sweep]
    python tools/report_full_recipes.py render     # rewrite results/full_recipes.md from its JSON, running nothing

Each recipe is a list of `onestep train` stages run through the CLI, each stage after the first started from the one
before by trainer.init_from (DMD2's GAN stage resumed from its no-GAN run; SiD²A = SiDA started from SiD); a finished
run folder is reused. Per seed the table shows the last stage's 1-step student and the stage before it against the
teacher's many-step sampler, then mean ± std over seeds and each target (issue 34) met or NOT met, by how much:
  digits      1-step FD below the teacher's 32-step FD
  digits_t2i  1-step FD below the teacher's 25-step FD, prompt accuracy within 2 points of the teacher's
  grid25      25/25 modes on every seed, worst mode-mass error <= 1.5x the teacher's 64-step
  classes16   sliced-W2 <= 1.0x the teacher's 64-step
--sweep also reruns seed 0 of a recipe in SWEEPS at each of its values of one key (e.g. the GAN weight), shown as a
small table under the recipe. Writes results/full_recipes.{json,md} (results merge by recipe, and by seed within a recipe whose stages are
unchanged, so the tool can run in parts with --only and --seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_block import ROOT, only, rerender, update_readme  # noqa: E402

RESULTS, DATA = "results/full_recipes.md", "results/full_recipes.json"
#: the mixtures' evaluation: the teacher's 64-step sampler beside the student (onestep's gmm evaluator)
GMM_EVAL = ["eval.teacher_steps=[64]", "eval.num_samples=10000", "eval.plot=false"]
#: classes16 as the objectives bench builds it (bench_classes16) with the paper's GAN on the exact mixture samples,
#: each objective's settings as the grid25 experiments set them (configs/experiment/grid25_dmd2.yaml, grid25_sida.yaml)
CLASSES16_DMD2 = ["experiment=bench_classes16", "objective=dmd2", "objective.ttur=2", "objective.t_dist=grid",
                  "objective.critic_t_dist=grid", "objective.discriminator=critic", "objective.gan_weight=0.01",
                  "objective.disc_weight=1e-2", "objective.gan_t_dist=grid", "objective.gan_t_lo=0.0",
                  "objective.gan_t_hi=1.0"]
CLASSES16_SIDA = ["experiment=bench_classes16", "objective=sida", "objective.ttur=1", "objective.alpha=1.0",
                  "objective.critic_t_dist=lognormal", "objective.gan_balance=official", "objective.gan_weight=1e-4",
                  "objective.gan_head=channel_mean", "objective.t_dist=karras", "objective.t_lo=0.0",
                  "objective.t_hi=0.8"]


def _set(overrides: list[str], key: str, value: str) -> list[str]:
    """``overrides`` with ``key`` set to ``value`` (replaced in place, or appended)."""
    if not any(o.startswith(f"{key}=") for o in overrides):
        return [*overrides, f"{key}={value}"]
    return [f"{key}={value}" if o.startswith(f"{key}=") else o for o in overrides]


#: DMD2 on classes16 with the GAN weight the seed-0 sweep below picked (SWEEPS: 0.01 -> 10 brings the 1-step
#: sliced-W2 from 4.0x to 1.0x the teacher's; the pure adversarial student of the bench lands under the teacher)
CLASSES16_DMD2_GAN10 = _set(CLASSES16_DMD2, "objective.gan_weight", "10")
#: recipe -> (task, stages: each the CLI overrides of one `onestep train`)
RECIPES: dict[str, tuple[str, list[list[str]]]] = {
    "digits_dmd2_gan": ("digits", [["experiment=digits_dmd2"], ["experiment=digits_dmd2_gan"]]),
    "digits_sida": ("digits", [["experiment=digits_sid"], ["experiment=digits_sida"]]),
    "digits_t2i_dmd2_gan": ("digits_t2i", [["experiment=digits_t2i_dmd2"], ["experiment=digits_t2i_dmd2_gan"]]),
    "grid25_dmd2": ("grid25", [["experiment=grid25_dmd2", *GMM_EVAL]]),
    "grid25_sida": ("grid25", [["experiment=grid25_sida", *GMM_EVAL]]),
    "classes16_dmd2": ("classes16", [[*CLASSES16_DMD2, *GMM_EVAL]]),
    "classes16_dmd2_gan10": ("classes16", [[*CLASSES16_DMD2_GAN10, *GMM_EVAL]]),
    "classes16_sida": ("classes16", [[*CLASSES16_SIDA, *GMM_EVAL]]),
}
#: recipe -> (key, the recipe's own value, values): seed 0 of the recipe's last stage again at each value
#: (``--sweep``), shown under the recipe beside its own seed 0
SWEEPS: dict[str, tuple[str, str, list[str]]] = {
    "classes16_dmd2": ("objective.gan_weight", "0.01", ["0.1", "1.0", "3.0", "10.0"]),  # (CLASSES16_DMD2)
    "grid25_dmd2": ("objective.gan_weight", "0.01", ["0.1", "1.0", "10.0"]),  # (configs/experiment/grid25_dmd2.yaml)
}
#: the teacher row each task compares against (sampler steps)
TEACHER_STEPS = {"digits": 32, "digits_t2i": 25, "grid25": 64, "classes16": 64}


def stage_dir(out_root: Path, recipe: str, seed: int, i: int) -> Path:
    return out_root / recipe / f"seed{seed}" / f"stage{i + 1}"


def _order(recipe: str) -> int:
    """A recipe's place in the table: RECIPES' order (one no longer in RECIPES last)."""
    return list(RECIPES).index(recipe) if recipe in RECIPES else len(RECIPES)


def sweep_dir(out_root: Path, recipe: str, key: str, value: str) -> Path:
    return out_root / recipe / f"seed0_{key.split('.')[-1]}={value}"


def run_recipe(recipe: str, seed: int, out_root: Path, threads: int, extra: list[str],
               sweep: tuple[str, str] | None = None) -> list[Path]:
    """Each stage of ``recipe`` at ``seed`` (skipped when its folder already holds metrics.json), with ``extra``
    overrides after the recipe's, and ``sweep``'s (key, value) set in its last stage; the stage folders."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    folders: list[Path] = []
    stages = RECIPES[recipe][1]
    for i, overrides in enumerate(stages):
        run = stage_dir(out_root, recipe, seed, i)
        if sweep is not None and i == len(stages) - 1:
            overrides = _set(overrides, *sweep)
            run = sweep_dir(out_root, recipe, *sweep) / f"stage{i + 1}"
        if not (run / "metrics.json").is_file():
            start = [f"trainer.init_from={folders[-1]}"] if folders else []
            cmd = ["onestep", "train", *overrides, *extra, *start, f"seed={seed}", "trainer.progress=false",
                   f"out_root={out_root}", f"hydra.run.dir={run}"]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env=env)
        folders.append(run)
    return folders


def _student(rows: list[dict]) -> dict:
    return next(r for r in rows if r["model"] == "student" and r["steps"] == 1)


def _teacher(rows: list[dict], steps: int) -> dict:
    return next(r for r in rows if r["model"] == "teacher" and r["steps"] == steps)


def seed_row(task: str, folders: list[Path]) -> dict:
    """What the table shows of one seed: the last stage's 1-step student, the stage before it (when there is one),
    the teacher's many-step row, and each stage's wall seconds."""
    metrics = [json.loads((f / "metrics.json").read_text()) for f in folders]
    rows = metrics[-1]["rows"]
    keys = ("fd", "label_acc") if task.startswith("digits") else ("sliced_w2", "modes_covered", "num_modes",
                                                                    "worst_mode_mass_err")
    pick = lambda r: {k: r[k] for k in keys if k in r}  # noqa: E731
    out = {"student": pick(_student(rows)), "teacher": pick(_teacher(rows, TEACHER_STEPS[task])),
           "steps": [m["steps"] for m in metrics],
           "wall_s": [round(sum(v for k, v in m["seconds"].items() if k != "resumed_at_step"), 1) for m in metrics]}
    if len(metrics) > 1:
        out["before"] = pick(_student(metrics[-2]["rows"]))
    return out


def _ms(values: list[float], fmt: str, scale: float = 1.0) -> str:
    vals = [scale * v for v in values]
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{format(statistics.mean(vals), fmt)} ± {format(statistics.stdev(vals), fmt)}"


def targets(task: str, seeds: dict[str, dict]) -> str:
    """The issue's target for ``task`` over the seeds, met or NOT met, with the margin."""
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    s = list(seeds.values())
    mean = lambda f: statistics.mean(f(r) for r in s)  # noqa: E731
    if task == "digits":
        ratio = mean(lambda r: r["student"]["fd"] / r["teacher"]["fd"])
        return (f"1-step FD / teacher 32-step FD = {ratio:.3f} (mean over {len(s)} seeds; target < 1: "
                f"{met(ratio < 1)})")
    if task == "digits_t2i":
        ratio = mean(lambda r: r["student"]["fd"] / r["teacher"]["fd"])
        gap = mean(lambda r: 100 * (r["teacher"]["label_acc"] - r["student"]["label_acc"]))
        return (f"1-step FD / teacher 25-step FD = {ratio:.3f} (target < 1: {met(ratio < 1)}); prompt accuracy "
                f"{abs(gap):.1f} points {'below' if gap > 0 else 'above'} the teacher's (target: at most 2 below: "
                f"{met(gap <= 2)}) (means over {len(s)} seeds)")
    if task == "grid25":
        every = all(r["student"]["modes_covered"] == r["student"]["num_modes"] for r in s)
        ratio = mean(lambda r: r["student"]["worst_mode_mass_err"] / r["teacher"]["worst_mode_mass_err"])
        return (f"all modes on every seed: {met(every)}; worst mode-mass error / teacher 64-step = {ratio:.2f} "
                f"(mean over {len(s)} seeds; target <= 1.5: {met(ratio <= 1.5)})")
    ratio = mean(lambda r: r["student"]["sliced_w2"] / r["teacher"]["sliced_w2"])
    return f"sliced-W2 / teacher 64-step = {ratio:.2f} (mean over {len(s)} seeds; target <= 1.0: {met(ratio <= 1.0)})"


def _cells(task: str, r: dict) -> list[str]:
    if task.startswith("digits"):
        return [f"{r['fd']:.3f}", f"{100 * r['label_acc']:.1f}%"]
    return [f"{r['sliced_w2']:.4f}", f"{r['modes_covered']}/{r['num_modes']}", f"{100 * r['worst_mode_mass_err']:.1f}%"]


def render(data: dict) -> str:
    """results/full_recipes.md from results/full_recipes.json."""
    lines = ["Command: `python tools/report_full_recipes.py`" + (f" ({data['note']})" if data.get("note") else ""),
             "",
             "The papers' full recipes on real data (two stages where the paper has two: DMD2's GAN stage resumed "
             "from its no-GAN run, SiD²A = SiDA started from SiD), each stage an `onestep train` through the CLI; "
             "per seed the final 1-step student, the stage before it, and the teacher's many-step sampler on the "
             "same evaluation."]
    for recipe, d in data["recipes"].items():
        task, seeds = d["task"], d["seeds"]
        digits = task.startswith("digits")
        head = ["seed", "stage", "steps", "wall s"] + (["FD", "prompt / label acc"] if digits else
                                                       ["sliced-W2", "modes", "worst mass err"])
        lines += ["", f"**{recipe}** ({task}): " + " -> ".join(f"`onestep train {' '.join(s)}`" for s in d["stages"]),
                  "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for seed, r in seeds.items():
            n = len(r["steps"])
            if "before" in r:
                lines.append(f"| {seed} | student, stage {n - 1} | {r['steps'][-2]} | {r['wall_s'][-2]:.0f} | "
                             + " | ".join(_cells(task, r["before"])) + " |")
            lines.append(f"| {seed} | student, stage {n} | {r['steps'][-1]} | {r['wall_s'][-1]:.0f} | "
                         + " | ".join(_cells(task, r["student"])) + " |")
            lines.append(f"| {seed} | teacher, {TEACHER_STEPS[task]} steps | | | "
                         + " | ".join(_cells(task, r["teacher"])) + " |")
        key = "fd" if digits else "sliced_w2"
        fmt = ".3f" if digits else ".4f"
        lines += ["", f"Mean ± std over {len(seeds)} seed(s): student {_ms([r['student'][key] for r in seeds.values()], fmt)}"
                  f", teacher {_ms([r['teacher'][key] for r in seeds.values()], fmt)} ({'FD' if digits else 'sliced-W2'}). "
                  f"Target: {targets(task, seeds)}."]
        if recipe in data.get("sweeps", {}):
            lines += ["", *render_sweep(task, data["sweeps"][recipe], d)]
    return "\n".join(lines) + "\n"


def render_sweep(task: str, sweep: dict, recipe: dict) -> list[str]:
    """The seed-0 sweep of one key under its recipe: the recipe's own value first, then each swept value."""
    key, rows = sweep["key"], dict(sweep["rows"])
    rows = {sweep["own"]: recipe["seeds"]["0"], **rows} if "0" in recipe["seeds"] else rows
    teacher = next(iter(rows.values()))["teacher"]
    metric, label = ("fd", "FD") if task.startswith("digits") else ("sliced_w2", "sliced-W2")
    head = [f"`{key}`", *(["FD", "prompt / label acc"] if task.startswith("digits") else
                          ["sliced-W2", "modes", "worst mass err"]), f"{label} / teacher's {TEACHER_STEPS[task]}-step"]
    out = [f"Seed 0 of the same run at other values of `{key}` (the first row: the recipe's own):", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for value, r in rows.items():
        out.append(f"| {value} | " + " | ".join(_cells(task, r["student"]))
                   + f" | {r['student'][metric] / teacher[metric]:.2f}x |")
    return out


def rendered(folder: Path) -> dict[str, str]:
    """The markdown this tool writes, rendered from ``folder``'s full_recipes.json alone."""
    return {"full_recipes.md": render(json.loads((folder / "full_recipes.json").read_text()))}


def main() -> None:
    if rerender(rendered):  # `render`: rewrite the markdown from its data, running nothing
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help=f"comma-separated recipes (default: all of {', '.join(RECIPES)})")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                    help="seeds to run (none: only --sweep; the JSON keeps the seeds it has)")
    ap.add_argument("--out-root", default="runs/full_recipes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", help="how the runs were made (e.g. a machine shared with other jobs)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides after every stage's (a smoke run: trainer.steps=4 eval.num_samples=64)")
    ap.add_argument("--results", default=str(ROOT / "results"), help="folder for full_recipes.{json,md}")
    ap.add_argument("--sweep", action="store_true", help=f"also run the seed-0 sweeps of {', '.join(SWEEPS)}")
    args = ap.parse_args()
    names = only(ap, args.only, RECIPES, "recipe")
    out_root = Path(args.out_root).resolve()
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    data = results / Path(DATA).name
    saved = json.loads(data.read_text()) if data.is_file() else {"recipes": {}}
    if args.note:
        saved["note"] = args.note

    def save() -> None:
        """The JSON as it stands (written as each run lands): recipes in RECIPES' order, seeds in number order."""
        saved["recipes"] = {k: {**r, "seeds": dict(sorted(r["seeds"].items(), key=lambda kv: int(kv[0])))}
                            for k, r in sorted(saved["recipes"].items(), key=lambda kv: _order(kv[0]))}
        data.write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")

    for name in names:
        task, stages = RECIPES[name]
        before = saved["recipes"].get(name, {})
        # seeds measured before with the same stages stay (seeds can run in parts, or side by side)
        kept = before.get("stages") == stages
        if not args.seeds and not kept:
            ap.error(f"--seeds with no seed: {data} holds no seeds of '{name}' as it runs now to show a sweep under")
        seeds = dict(before["seeds"]) if kept else {}
        for seed in args.seeds:
            seeds[str(seed)] = seed_row(task, run_recipe(name, seed, out_root, args.threads, args.set))
            saved["recipes"][name] = {"task": task, "stages": stages, "seeds": seeds}
            save()
        if args.sweep and name in SWEEPS:
            key, own, values = SWEEPS[name]
            old = saved.setdefault("sweeps", {}).get(name, {})
            rows = old["rows"] if old.get("key") == key else {}  # (values of another key are no longer this sweep)
            saved["sweeps"][name] = {"key": key, "own": own, "rows": rows}
            for value in values:
                rows[value] = seed_row(task, run_recipe(name, 0, out_root, args.threads, args.set, (key, value)))
                save()
    text = rendered(results)["full_recipes.md"]
    (results / Path(RESULTS).name).write_text(text, encoding="utf-8")
    print(text)
    if results == (ROOT / "results").resolve():
        print("README block updated" if update_readme(RESULTS) else f"README has no block for {RESULTS}")


if __name__ == "__main__":
    main()
