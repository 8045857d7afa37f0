"""Distill the shipped text-to-image digits teacher with the README's two experiments and report them.

    python tools/report_digits_t2i.py [--out-root runs/report] [--threads 2]
    python tools/report_digits_t2i.py render     # rewrite results/digits_t2i.md from its JSON, running nothing

Runs `onestep train experiment=digits_t2i_dmd2` and `experiment=digits_t2i_lcm_lora` (each alone on the
machine; a finished run folder is reused, with the wall seconds it recorded), then writes
  results/digits_t2i.json    each run's steps, phase and wall seconds and evaluation rows
  results/digits_t2i.md      rendered from that JSON: the tables, wall seconds and the targets, checked
  docs/digits_t2i_grid.png   held-out prompts as rows: teacher 25 DDIM steps | DMD2 1 step | LCM-LoRA 1 and 4 steps
and refreshes README.md's generated block.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_block import ROOT, rerender, update_readme  # noqa: E402

EXPERIMENTS = ("digits_t2i_dmd2", "digits_t2i_lcm_lora")
RESULTS, DATA, GRID = "results/digits_t2i.md", "results/digits_t2i.json", "docs/digits_t2i_grid.png"
PER_CELL = 3


def run_experiment(name: str, out_root: Path, threads: int) -> Path:
    run = out_root / name / "default"
    if not (run / "metrics.json").is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = ["onestep", "train", f"experiment={name}", f"out_root={out_root}", f"hydra.run.dir={run}"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
    return run


def grid_prompts() -> list[str]:
    from onestep.data.digits_text import HELDOUT_TEMPLATES, caption

    return [caption(d, HELDOUT_TEMPLATES[d % len(HELDOUT_TEMPLATES)]) for d in range(10)]


@torch.no_grad()
def grid(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from onestep.denoisers.base import guided
    from onestep.runs import load_run
    from onestep.sampling import sample

    prompts = grid_prompts()
    dmd2, lcm = (load_run(runs[n], torch.device("cpu")) for n in EXPERIMENTS)
    setup = dmd2.data()  # the conditioner reads the embedding cache that building the data fills
    n = len(prompts) * PER_CELL
    cond = setup.conditioner([p for p in prompts for _ in range(PER_CELL)])
    noise = torch.randn((n, *setup.teacher.data_shape), generator=torch.Generator().manual_seed(0))
    teacher = guided(setup.teacher, dmd2.cfg.teacher.guidance)
    columns = {
        "teacher, 25 DDIM steps": sample(teacher, noise, teacher.schedule.default_ts(25), cond, method="ddim"),
        "DMD2 student, 1 step": dmd2.student().sample(dmd2.generator, noise, cond, 1),
        "LCM-LoRA student, 1 step": lcm.student().sample(lcm.generator, noise, cond, 1,
                                                          torch.Generator().manual_seed(1)),
        "LCM-LoRA student, 4 steps": lcm.student().sample(lcm.generator, noise, cond, 4,
                                                           torch.Generator().manual_seed(1)),
    }
    fig, axes = plt.subplots(len(prompts), len(columns), figsize=(2.0 * len(columns) + 2.2, 0.62 * len(prompts) + 0.5),
                             squeeze=False)
    for j, (title, x) in enumerate(columns.items()):
        images = setup.codec.decode(x)[:, 0].clamp(-1, 1)
        for i, prompt in enumerate(prompts):
            row = torch.cat(list(images[i * PER_CELL:(i + 1) * PER_CELL]), dim=1)
            ax = axes[i, j]
            ax.imshow(row.numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
            if j == 0:
                ax.set_ylabel(f'"{prompt}"', rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_data(runs: dict[str, Path]) -> dict:
    """What results/digits_t2i.md shows of each run: steps, phase seconds, wall seconds, evaluation rows."""
    out = {}
    for name, run in runs.items():
        m = json.loads((run / "metrics.json").read_text())
        sec = {k: m.get("seconds", {}).get(k, 0.0) for k in ("setup", "distill", "evaluate")}
        out[name] = {"steps": m["steps"], "seconds": sec, "wall_s": sum(sec.values()), "rows": m["rows"]}
    return out


def render(data: dict) -> str:
    """results/digits_t2i.md from results/digits_t2i.json: the tables, wall seconds and the targets, checked."""
    from onestep.eval.report import markdown_table

    lines = ["Command: `python tools/report_digits_t2i.py`", "",
             "The shipped text-to-image digits teacher (`onestep/assets/digits_t2i`, CFG 3) distilled on this "
             "machine's 2 CPU cores by the two experiments as shipped; evaluation on held-out prompt templates "
             "(FD / KID / precision / recall in the digits feature space of decoded samples, 2,000 samples; label "
             "acc = prompt accuracy)."]
    for name, d in data.items():
        rows, sec, wall = d["rows"], d["seconds"], d["wall_s"]
        lines += ["", f"**`onestep train experiment={name}`** ({d['steps']} steps): {wall:.0f} s wall "
                  f"(setup {sec['setup']:.0f} s, distillation {sec['distill']:.0f} s, evaluation "
                  f"{sec['evaluate']:.0f} s)", "", markdown_table(rows)]
        t25 = next(r for r in rows if r["model"] == "teacher" and r["steps"] == 25)
        s1 = next(r for r in rows if r["model"] == "student" and r["steps"] == 1)
        ratio, gap = s1["fd"] / t25["fd"], 100 * (t25["label_acc"] - s1["label_acc"])
        lines += ["", f"Targets: 1-step student FD / teacher 25-step FD = {ratio:.2f} (target <= 1.3: "
                  f"{'met' if ratio <= 1.3 else 'NOT met'}); prompt accuracy {100 * s1['label_acc']:.1f}% vs teacher "
                  f"{100 * t25['label_acc']:.1f}% (within 3 points: {'met' if gap <= 3 else 'NOT met'}); teacher "
                  f"25-step prompt accuracy >= 95%: {'met' if t25['label_acc'] >= 0.95 else 'NOT met'}; wall <= 600 s: "
                  f"{'met' if wall <= 600 else 'NOT met'}."]
    lines += ["", f"![held-out prompts: teacher, DMD2 and LCM-LoRA students]({GRID})"]
    return "\n".join(lines) + "\n"


def rendered(folder: Path) -> dict[str, str]:
    """The markdown this tool writes, rendered from ``folder``'s digits_t2i.json alone."""
    return {"digits_t2i.md": render(json.loads((folder / "digits_t2i.json").read_text()))}


def main() -> None:
    if rerender(rendered):  # `render`: rewrite the markdown from its data, running nothing
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-root", default="runs/report")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_root = Path(args.out_root).resolve()
    runs = {name: run_experiment(name, out_root, args.threads) for name in EXPERIMENTS}
    grid(runs, ROOT / GRID)
    (ROOT / DATA).write_text(json.dumps(report_data(runs), indent=1) + "\n", encoding="utf-8")
    text = rendered(ROOT / "results")["digits_t2i.md"]
    (ROOT / RESULTS).write_text(text, encoding="utf-8")
    print(text)
    print("README block updated" if update_readme(RESULTS) else f"README has no block for {RESULTS}")


if __name__ == "__main__":
    main()
