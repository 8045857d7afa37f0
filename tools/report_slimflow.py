"""A one-step student smaller than its teacher (SlimFlow, generator.arch) against the full-size student of the same
recipe, on the shipped digits teacher: parameters, FD, label accuracy, training wall time and sampling speed.

    python tools/report_slimflow.py [--out-root runs/report] [--threads 1] [--note "..."]
    python tools/report_slimflow.py render     # rewrite results/slimflow_digits.md from its JSON, running nothing

Runs `onestep train experiment=digits_slimflow` as shipped and with `generator.arch=` (empty: the teacher's
architecture) through the CLI (a finished run folder is reused), then times each run's EMA generator at one step on
the same noise (batch 500, best of 5 calls, this process, --threads torch threads) and writes
results/slimflow_digits.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_block import ROOT, rerender  # noqa: E402

RESULTS, DATA = "results/slimflow_digits.md", "results/slimflow_digits.json"
#: label -> the overrides after experiment=digits_slimflow
VARIANTS = {"smaller student (digits_slimflow as shipped)": [],
            "full-size student (generator.arch='')": ["generator.arch="]}
BATCH, REPEATS = 500, 5


def run_variant(label: str, overrides: list[str], out_root: Path, threads: int) -> Path:
    run = out_root / "digits_slimflow" / ("small" if not overrides else "full")
    if not (run / "metrics.json").is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = ["onestep", "train", "experiment=digits_slimflow", *overrides, "trainer.progress=false",
               f"out_root={out_root}", f"hydra.run.dir={run}"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
    return run


def measure(run: Path) -> dict:
    """Parameters and 1-step sampling milliseconds per sample of the run's EMA generator; its evaluation rows."""
    import torch

    from onestep.runs import load_run

    r = load_run(run, torch.device("cpu"), key="report_slimflow")
    g = r.generator.eval()
    student = r.student()
    noise = torch.randn(BATCH, *g.data_shape, generator=torch.Generator().manual_seed(0))
    cond = torch.arange(BATCH) % r.setup.num_classes
    best = float("inf")
    with torch.no_grad():
        student.sample(g, noise[:8], cond[:8])  # warm-up
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            student.sample(g, noise, cond)
            best = min(best, time.perf_counter() - t0)
    m = json.loads((run / "metrics.json").read_text())
    row = next(x for x in m["rows"] if x["model"] == "student" and x["steps"] == 1)
    teacher = max((x for x in m["rows"] if x["model"] == "teacher"), key=lambda x: x["steps"])
    wall = sum(v for k, v in m["seconds"].items() if k != "resumed_at_step")
    return {"params": sum(p.numel() for p in g.parameters()), "fd": row["fd"], "label_acc": row["label_acc"],
            "teacher_fd": teacher["fd"], "teacher_steps": teacher["steps"], "steps": m["steps"],
            "wall_s": round(wall, 1), "ms_per_sample": 1000 * best / BATCH}


def render(data: dict) -> str:
    """results/slimflow_digits.md from results/slimflow_digits.json."""
    lines = ["Command: `python tools/report_slimflow.py`" + (f" ({data['note']})" if data.get("note") else ""), "",
             "SlimFlow on the shipped digits teacher: `onestep train experiment=digits_slimflow` (annealing reflow, "
             "then flow-guided distillation) with the smaller student it ships and with the teacher's own "
             f"architecture; 1-step EMA generator; sampling timed on {BATCH} samples (best of {REPEATS}, "
             f"{data['threads']} torch thread(s)).", "",
             "| student | params | x teacher params | steps | FD | label acc | train + eval wall s | ms / sample |",
             "|---|---|---|---|---|---|---|---|"]
    full = data["variants"][list(VARIANTS)[1]]
    for label, v in data["variants"].items():
        lines.append(f"| {label} | {v['params'] / 1e6:.3f}M | {v['params'] / full['params']:.2f} | {v['steps']} | "
                     f"{v['fd']:.2f} | {100 * v['label_acc']:.1f}% | {v['wall_s']:.0f} | {v['ms_per_sample']:.3f} |")
    small = data["variants"][list(VARIANTS)[0]]
    lines += ["", f"Teacher {full['teacher_steps']}-step FD {full['teacher_fd']:.2f}. The smaller student has "
              f"{small['params'] / full['params']:.2f}x the parameters, {small['fd'] / full['fd']:.2f}x the FD and "
              f"{small['ms_per_sample'] / full['ms_per_sample']:.2f}x the sampling time of the full-size one."]
    return "\n".join(lines) + "\n"


def rendered(folder: Path) -> dict[str, str]:
    """The markdown this tool writes, rendered from ``folder``'s slimflow_digits.json alone."""
    return {"slimflow_digits.md": render(json.loads((folder / "slimflow_digits.json").read_text()))}


def main() -> None:
    if rerender(rendered):  # `render`: rewrite the markdown from its data, running nothing
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-root", default="runs/report")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", help="how the runs were timed (e.g. a machine shared with other jobs)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out_root = Path(args.out_root).resolve()
    data = {"threads": args.threads, "variants": {}, **({"note": args.note} if args.note else {})}
    for label, overrides in VARIANTS.items():
        data["variants"][label] = measure(run_variant(label, overrides, out_root, args.threads))
    (ROOT / DATA).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    text = rendered(ROOT / "results")["slimflow_digits.md"]
    (ROOT / RESULTS).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
