"""Distill the shipped text-to-video moving-digits teacher with the README's experiment and report it.

    python tools/report_moving_digits.py [--only moving_digits_rcm,...] [--out-root runs/report] [--threads 2]
                                         [--note "..."]
    python tools/report_moving_digits.py render     # rewrite results/moving_digits.md from its JSON, running nothing

Runs `onestep train experiment=moving_digits_dmd2`, `experiment=moving_digits_mcm` and `experiment=moving_digits_rcm` (alone on the machine; a
finished run folder is reused, with the wall seconds it recorded; --only reruns some and keeps the JSON's other
entries as they were, each with its own timing note), then writes
  results/moving_digits.json    the run's steps, phase and wall seconds and evaluation rows
  results/moving_digits.md      rendered from that JSON: the table, wall seconds and the targets, checked
  docs/moving_digits.gif        held-out prompts, teacher (many steps) above the 1-step student (the run's panels)
and refreshes README.md's generated block.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_block import ROOT, only, rerender, update_readme  # noqa: E402

EXPERIMENTS = ("moving_digits_dmd2", "moving_digits_mcm", "moving_digits_rcm")
RESULTS, DATA, GIF = "results/moving_digits.md", "results/moving_digits.json", "docs/moving_digits.gif"
#: the targets of the issue: student FD <= FD_RATIO x the teacher's many-step FD, prompt accuracy within ACC_POINTS
FD_RATIO, ACC_POINTS, WALL_S = 1.3, 3.0, 600


def run_experiment(name: str, out_root: Path, threads: int) -> Path:
    run = out_root / name / "default"
    if not (run / "metrics.json").is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = ["onestep", "train", f"experiment={name}", f"out_root={out_root}", f"hydra.run.dir={run}"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
    return run


def report_data(runs: dict[str, Path], note: str | None = None) -> dict:
    """What results/moving_digits.md shows of each run: steps, phase seconds, wall seconds, evaluation rows (and
    ``note``: how the runs were timed, when not alone on the machine)."""
    out = {}
    for name, run in runs.items():
        m = json.loads((run / "metrics.json").read_text())
        sec = {k: m.get("seconds", {}).get(k, 0.0) for k in ("setup", "distill", "evaluate")}
        out[name] = {"steps": m["steps"], "seconds": sec, "wall_s": sum(sec.values()), "rows": m["rows"],
                     **({"note": note} if note else {})}
    return out


def targets(rows: list[dict], wall: float) -> str:
    """The issue's targets against the teacher's most-step row, each marked met / NOT met."""
    teacher = max((r for r in rows if r["model"] == "teacher"), key=lambda r: r["steps"])
    # the student at the most steps it was evaluated at: 1 for DMD2, the shipped 4 for a multistep consistency model
    s1 = max((r for r in rows if r["model"] == "student"), key=lambda r: r["steps"])
    ratio, gap = s1["fd"] / teacher["fd"], 100 * (teacher["prompt_acc"] - s1["prompt_acc"])
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    return (f"Targets: {s1['steps']}-step student per-frame FD / teacher {teacher['steps']}-step FD = {ratio:.2f} "
            f"(target <= "
            f"{FD_RATIO}: {met(ratio <= FD_RATIO)}); prompt accuracy {100 * s1['prompt_acc']:.1f}% vs teacher "
            f"{100 * teacher['prompt_acc']:.1f}% (within {ACC_POINTS:.0f} points: {met(gap <= ACC_POINTS)}); wall "
            f"<= {WALL_S} s: {met(wall <= WALL_S)}.")


def render(data: dict) -> str:
    """results/moving_digits.md from results/moving_digits.json."""
    from onestep.eval.report import markdown_table

    lines = ["Command: `python tools/report_moving_digits.py`", "",
             "The shipped text-to-video moving-digits teacher (`onestep/assets/moving_digits`, a Wan 2.1-shaped "
             "pipeline, CFG 3) distilled on this machine's 2 CPU cores by the experiment as shipped; evaluation on "
             "held-out prompt templates: per-frame FD in the digits feature space of decoded videos, prompt accuracy "
             "(every frame of the prompt's digit and the centroid moving the prompt's way), temporal consistency."]
    for name, d in data.items():
        sec, wall = d["seconds"], d["wall_s"]
        lines += ["", f"**`onestep train experiment={name}`** ({d['steps']} steps): {wall:.0f} s wall "
                  f"(setup {sec['setup']:.0f} s, distillation {sec['distill']:.0f} s, evaluation "
                  f"{sec['evaluate']:.0f} s){', ' + d['note'] if d.get('note') else ''}", "",
                  markdown_table(d["rows"]), "", targets(d["rows"], wall)]
    lines += ["", f"![held-out prompts: teacher and 1-step student]({GIF})"]
    return "\n".join(lines) + "\n"


def rendered(folder: Path) -> dict[str, str]:
    """The markdown this tool writes, rendered from ``folder``'s moving_digits.json alone."""
    return {"moving_digits.md": render(json.loads((folder / "moving_digits.json").read_text()))}


def main() -> None:
    if rerender(rendered):  # `render`: rewrite the markdown from its data, running nothing
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-root", default="runs/report")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--note", help="how the runs were timed, shown beside the wall seconds (e.g. a shared machine)")
    ap.add_argument("--only", help=f"comma-separated experiments to run (default: all of {', '.join(EXPERIMENTS)}); "
                                   "the JSON keeps the others' entries")
    args = ap.parse_args()
    names = only(ap, args.only, EXPERIMENTS, "experiment")
    out_root = Path(args.out_root).resolve()
    runs = {name: run_experiment(name, out_root, args.threads) for name in names}
    if EXPERIMENTS[0] in runs:  # the run's final evaluation panels: the same held-out prompts and noise for both
        shutil.copyfile(runs[EXPERIMENTS[0]] / "samples.gif", ROOT / GIF)
    saved = json.loads((ROOT / DATA).read_text()) if (ROOT / DATA).is_file() else {}
    merged = {**saved, **report_data(runs, args.note)}
    data = {name: merged[name] for name in EXPERIMENTS if name in merged}  # (the shipped order)
    (ROOT / DATA).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    text = rendered(ROOT / "results")["moving_digits.md"]
    (ROOT / RESULTS).write_text(text, encoding="utf-8")
    print(text)
    print("README block updated" if update_readme(RESULTS) else f"README has no block for {RESULTS}")


if __name__ == "__main__":
    main()
