"""Soak run: a long GMM distillation with a tiny net, watching memory, disk and checkpoint cost.

    OMP_NUM_THREADS=1 python tools/soak.py [steps=20000] [checkpoint_every=500] [out=results] \
        [root=runs/soak] [hydra.key=value ...]
    python tools/soak.py render     # rewrite results/soak.md from results/soak.json, running nothing

Trains gmm_dmd2 (MLPs of width 32, batch 64, ttur 1) for ``steps`` steps in this process,
a checkpoint every ``checkpoint_every`` steps (keep_checkpoints=2), then resumes the finished run once for
``checkpoint_every`` more steps. Measures
  - RSS of this process every 100 steps (fewer in short runs); after warm-up (the first 10% of the steps) it
    may grow by <= 10%
  - the size of <run>/checkpoints after every save: bounded by keep_checkpoints checkpoints
  - checkpoint save time in % of the training time between two checkpoints, and the resume time (load the
    newest checkpoint, cut the logs back) in steps' worth of time
and writes <out>/soak.json (the measurements), <out>/soak.md rendered from it (the command at the top, a
table, PASS / FAIL per bound) and <out>/soak.png.
Arguments with a dot are Hydra overrides added to the run. The run folder ``root`` is deleted first.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import psutil

import onestep.config  # noqa: F401
import onestep.objectives  # noqa: F401
from onestep import checkpoint
from onestep.train import trainer

ROOT = Path(__file__).resolve().parents[1]
#: the loop's bookkeeping is what soaks, not the objective's quality: one critic update per step, no regression
TINY = ["experiment=gmm_dmd2", "teacher.net_hidden=32", "teacher.net_steps=200", "trainer.batch_size=64",
        "objective.ttur=1", "objective.regression_weight=0", "trainer.keep_checkpoints=2", "trainer.log_every=100",
        "trainer.progress=false", "eval.num_samples=1000", "eval.teacher_steps=[8]", "eval.plot=false"]
#: bounds the soak checks
MAX_RSS_GROWTH = 0.10
WARMUP_FRACTION = 0.10


def _compose(overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module("onestep.configs", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


class Probe:
    """Step callback plus timers around checkpoint.save and the trainer's resume_state."""

    def __init__(self, steps: int):
        self.proc, self.rss_every = psutil.Process(), min(100, max(1, steps // 200))
        self.step_times: dict[int, float] = {}  # step -> seconds since the previous callback
        self.rss: list[tuple[int, float]] = []  # (step, MiB)
        self.saves: list[tuple[int, float, int]] = []  # (step, seconds, bytes of checkpoints/ after the save)
        self.resumes: list[float] = []
        self._last = None

    def __call__(self, step, logs):
        now = time.perf_counter()
        if self._last is not None:
            self.step_times[step] = now - self._last
        self._last = now
        if step % self.rss_every == 0:
            self.rss.append((step, self.proc.memory_info().rss / 2**20))

    def patch(self):
        save, resume = checkpoint.save, trainer.resume_state

        def timed_save(run_dir, step, *a, **k):
            t = time.perf_counter()
            out = save(run_dir, step, *a, **k)
            self.saves.append((step, time.perf_counter() - t, _du(Path(run_dir) / "checkpoints")))
            return out

        def timed_resume(*a, **k):
            t = time.perf_counter()
            out = resume(*a, **k)
            self.resumes.append(time.perf_counter() - t)
            return out

        checkpoint.save, trainer.resume_state = timed_save, timed_resume
        return lambda: (setattr(checkpoint, "save", save), setattr(trainer, "resume_state", resume))


def soak(steps: int, every: int, root: Path, overrides: list[str]) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    base = TINY + [f"trainer.checkpoint_every={every}"] + overrides
    probe = Probe(steps)
    unpatch = probe.patch()
    try:
        t0 = time.perf_counter()
        trainer.train(_compose(base + [f"trainer.steps={steps}"]), root, callbacks=(probe,))
        wall = time.perf_counter() - t0
        probe._last = None
        trainer.train(_compose(base + [f"trainer.steps={steps + every}"]), root)  # the same run, resumed
    finally:
        unpatch()
    return {"probe": probe, "wall": wall, "keep": 2, "steps": steps, "every": every}


def summarize(r: dict) -> dict:
    p, steps, every = r["probe"], r["steps"], r["every"]
    plain = sorted(dt for s, dt in p.step_times.items() if s % every)  # steps without a save
    step_s = plain[len(plain) // 2]
    warm = int(steps * WARMUP_FRACTION)
    after = [m for s, m in p.rss if s >= warm]
    base = next(m for s, m in p.rss if s >= warm)
    # the first save: one checkpoint in the folder, in whole 4 KiB blocks (later checkpoints of the same tensors differ
    # by a few bytes of zip padding in state.pt)
    one = -(-max(b for _, _, b in p.saves[:1]) // 4096) * 4096
    saves = [t for s, t, _ in p.saves if s <= steps]
    return {
        "step_ms": 1000 * step_s,
        "rss_warm": base, "rss_end": after[-1], "rss_max": max(after),
        "rss_growth": max(after) / base - 1,
        "disk_max": max(b for _, _, b in p.saves), "disk_bound": r["keep"] * one,
        "save_ms": 1000 * sum(saves) / len(saves),
        "save_pct": 100 * (sum(saves) / len(saves)) / (every * step_s),
        "resume_ms": 1000 * p.resumes[-1],
        "resume_steps": p.resumes[-1] / step_s,
        "resume_pct": 100 * p.resumes[-1] / (every * step_s),
    }


def write(r: dict, s: dict, out: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = r["probe"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(*zip(*p.rss))
    ax[0].axvline(r["steps"] * WARMUP_FRACTION, color="gray", ls=":", label="end of warm-up")
    ax[0].axhline(s["rss_warm"] * (1 + MAX_RSS_GROWTH), color="red", ls="--", label="+10% bound")
    ax[0].set(xlabel="step", ylabel="RSS (MiB)", title="process memory")
    ax[0].legend()
    ax[1].plot([st for st, _, _ in p.saves], [b / 2**10 for _, _, b in p.saves], "o-")
    ax[1].axhline(s["disk_bound"] / 2**10, color="red", ls="--", label="keep_checkpoints x one checkpoint")
    ax[1].set(xlabel="step", ylabel="checkpoints/ (KiB)", title="disk after each save")
    ax[1].legend()
    xs = sorted(p.step_times)
    ax[2].plot(xs, [1000 * p.step_times[x] for x in xs], lw=0.3)
    ax[2].set(xlabel="step", ylabel="ms", yscale="log", title="wall time per step (spikes: checkpoint saves)")
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=110)

    data = {"command": command, "steps": r["steps"], "every": r["every"], "keep": r["keep"], "wall_s": r["wall"],
            "summary": s}
    (out / "soak.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "soak.md").write_text(rendered(out)["soak.md"])


def render(d: dict) -> str:
    """soak.md from soak.json: the command, a table of the measurements, PASS / FAIL per bound."""
    s, every, keep = d["summary"], d["every"], d["keep"]

    def verdict(ok):
        return "PASS" if ok else "FAIL"

    rows = [
        ("steps run (checkpoint every)", f"{d['steps']} ({every})", ""),
        ("wall time of the run", f"{d['wall_s']:.0f} s", ""),
        ("median step time", f"{s['step_ms']:.1f} ms", ""),
        ("RSS after warm-up / at the end / max",
         f"{s['rss_warm']:.0f} / {s['rss_end']:.0f} / {s['rss_max']:.0f} MiB", ""),
        ("RSS growth after warm-up (max)", f"{100 * s['rss_growth']:+.1f}%",
         f"{verdict(s['rss_growth'] <= MAX_RSS_GROWTH)} (<= {100 * MAX_RSS_GROWTH:.0f}%)"),
        ("checkpoints/ on disk, max after a save", f"{s['disk_max'] / 2**10:.0f} KiB",
         f"{verdict(s['disk_max'] <= s['disk_bound'])} (<= {keep} x {s['disk_bound'] / keep / 2**10:.0f} KiB)"),
        ("checkpoint save (mean)", f"{s['save_ms']:.1f} ms = {s['save_pct']:.2f}% of {every} steps", ""),
        ("resume (load newest checkpoint, cut logs)",
         f"{s['resume_ms']:.1f} ms = {s['resume_steps']:.1f} steps = {s['resume_pct']:.2f}% of {every} steps", ""),
    ]
    md = [f"# Soak run\n\nWritten by `{d['command']}` (CPU, 1 thread, a machine shared with other jobs: times are "
          "indicative).\n",
          "| quantity | value | bound |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    md += ["", "![soak](soak.png)", ""]
    return "\n".join(md)


def rendered(folder: Path) -> dict[str, str]:
    """The markdown this tool writes, rendered from ``folder``'s soak.json alone."""
    return {"soak.md": render(json.loads((folder / "soak.json").read_text()))}


def main(argv: list[str]) -> dict:
    if argv == ["render"]:  # rewrite the markdown from its data, running nothing
        for name, text in rendered(ROOT / "results").items():
            (ROOT / "results" / name).write_text(text, encoding="utf-8")
        return {}
    opts = {"steps": "20000", "checkpoint_every": "500", "out": "results", "root": "runs/soak"}
    overrides = []
    for a in argv:
        key, _, value = a.partition("=")
        if key in opts:
            opts[key] = value
        elif "." in key:
            overrides.append(a)
        else:
            sys.exit(f"soak.py: unknown argument {a!r}; keys: {', '.join(opts)} or hydra.key=value")
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    r = soak(int(opts["steps"]), int(opts["checkpoint_every"]), Path(opts["root"]), overrides)
    s = summarize(r)
    write(r, s, out, " ".join(["OMP_NUM_THREADS=1 python tools/soak.py", *argv]))
    print((out / "soak.md").read_text())
    return s


if __name__ == "__main__":
    main(sys.argv[1:])
