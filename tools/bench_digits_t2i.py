"""The captioned-digits (text-to-image) student's 1/2/4-step curve beside its teacher's NFE curve, by `onestep bench`
with the digits protocol (FD and the other digits metrics of decoded samples on held-out prompts, plus the diversity
per prompt in the same feature space), written to results/bench_digits_t2i.{json,csv,md,png} and the README block.

    python tools/bench_digits_t2i.py [--out-root runs/report] [--threads 1]   # ~6 min: the run (reused when
                                                                               # finished), then the bench
    python tools/bench_digits_t2i.py render     # rewrite the markdown from the JSON and CSV, running nothing

The run is `onestep train` with TRAIN (experiment digits_t2i_lcm_lora as shipped: a 4-step LCM-LoRA student, 600
steps; its own final evaluation trimmed to 200 samples, since the bench evaluates it again); the bench runs afresh
each time (its point cache cleared first), so its wall time is the command's.
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

NAME = "bench_digits_t2i"
EXPERIMENT = "digits_t2i_lcm_lora"
TRAIN = [f"experiment={EXPERIMENT}", "eval.num_samples=200", "eval.teacher_steps=[1]", "eval.plot=false"]
BENCH = ["bench.teacher_methods=[ddim]", "bench.teacher_steps=[1,2,4,8,16,25]", "bench.student_steps=[1,2,4]",
         "bench.num_samples=1000", "eval.rewards.diversity=true", "bench.progress=false"]


def _where(threads: int) -> str:
    cpu = "CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {threads} torch thread(s), a machine shared with other jobs (times are indicative)"


def _onestep(args: list[str], threads: int) -> float:
    print("$ onestep", " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onestep.cli", *args], check=True, cwd=ROOT,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - start


def measure(out_root: Path, threads: int) -> dict:
    run = out_root / EXPERIMENT  # the bench labels the student by this folder's name
    train_s = None
    if not (run / "metrics.json").is_file():
        train_s = _onestep(["train", *TRAIN, f"run_dir={run}"], threads)
    folder = out_root / "bench" / NAME
    shutil.rmtree(folder, ignore_errors=True)
    wall = _onestep(["bench", f"bench.runs=[{run}]", *BENCH, f"bench.out={folder}"], threads)
    for ext in ("csv", "png"):
        shutil.copyfile(folder / f"bench.{ext}", ROOT / "results" / f"{NAME}.{ext}")
    steps = json.loads((run / "metrics.json").read_text())["steps"]
    return {"train": "onestep train " + " ".join(TRAIN), "bench": "onestep bench bench.runs=[<the run>] " +
            " ".join(BENCH), "steps": steps, "train_s": train_s, "wall_s": wall, "where": _where(threads)}


def read_csv(path: Path) -> list[dict]:
    def value(v: str):
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def render(d: dict, rows: list[dict]) -> str:
    from onestep.eval.report import markdown_table

    student = {r["steps"]: r for r in rows if r["kind"] == "student"}
    teacher = sorted((r for r in rows if r["kind"] == "teacher"), key=lambda r: r["nfe"])
    best = teacher[-1]
    # the fewest teacher evaluations that reach the 1-step student's FD, if any does
    reach = next((r for r in teacher if r["fd"] <= student[1]["fd"]), None)
    lines = [f"Command: `{d['bench']}` (`python tools/{NAME}.py`): {len(rows)} points in {d['wall_s']:.0f} s wall on "
             f"{d['where']}.", "",
             f"The run: `{d['train']}` ({d['steps']} steps; the shipped text-to-image digits teacher, CFG 3, "
             "distilled by LCM-LoRA into a 4-step student). Protocol: the run's own digits protocol on held-out "
             "prompts, 1,000 samples per row, the same noise and prompts in every row (seed 12345): FD / KID / "
             "precision / recall in the shipped digits feature space of decoded samples (pooled to 8x8) against all "
             "1,797 digits; label acc = prompt accuracy; diversity = mean pairwise cosine distance, in the same "
             "feature space, of the samples that share a prompt, averaged over prompts.", "",
             markdown_table(rows), "",
             f"The student's FD at 1 / 2 / 4 steps: {student[1]['fd']:.2f} / {student[2]['fd']:.2f} / "
             f"{student[4]['fd']:.2f}; the teacher's at {best['nfe']} NFE: {best['fd']:.2f}"
             + (f"; the teacher first reaches the 1-step student's FD at {reach['nfe']} NFE." if reach else
                "; no teacher point up to that NFE reaches the 1-step student's FD.")
             + f" Diversity: student 1 step {student[1]['diversity']:.4f}, teacher {best['nfe']} NFE "
               f"{best['diversity']:.4f}.", "",
             f"![digits text-to-image: quality vs NFE](results/{NAME}.png)"]
    return "\n".join(lines) + "\n"


def rendered(folder: Path) -> dict[str, str]:
    d = json.loads((folder / f"{NAME}.json").read_text())
    return {f"{NAME}.md": render(d, read_csv(folder / f"{NAME}.csv"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", choices=["measure", "render"], default="measure")
    ap.add_argument("--out-root", type=Path, default=ROOT / "runs" / "report")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    results = ROOT / "results"
    if args.what == "measure":
        d = measure(args.out_root, args.threads)
        (results / f"{NAME}.json").write_text(json.dumps(d, indent=1) + "\n")
    for name, text in rendered(results).items():
        (results / name).write_text(text)
        update_readme(f"results/{name}")
        print(f"wrote results/{name}")


if __name__ == "__main__":
    main()
