"""`onestep bench`: quality vs number of function evaluations (NFE) for the teacher's samplers and for
student checkpoints, under one protocol: the same noise, labels, sample count and evaluator headline
metric (sliced-W2 for Gaussian mixtures, FD for images) for every point.

    <out>/points/<model>_<sampler>_<steps>_<key>.json   one finished point (the resume cache)
    <out>/bench.csv  <out>/bench.md  <out>/bench.png      this invocation's points: table and NFE plot

A point's cache key hashes the model's identity (teacher config + weights, or run folder + checkpoint
step), the sampler, step count, sample count and seed, so a rerun skips finished points and a newer
checkpoint or another protocol computes fresh ones. Everything goes through ``experiment.build``, the
Denoiser interface, ``sampling.sample`` and ``Student.sample``: a text-to-image teacher plugs in unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

from onestep import experiment
from onestep.denoisers.base import guided
from onestep.errors import ConfigError
from onestep.eval.report import chunked, eval_inputs, markdown_table
from onestep.eval.runs import Run, load_run
from onestep.progress import bar as progress_bar
from onestep.sampling import METHODS, nfe, sample


@dataclass
class Curve:
    """One line of the plot: a model sampled with one sampler at several step counts."""

    model: str  # label: "teacher" or the run folder's name
    kind: str  # teacher | student
    sampler: str
    steps: list[int]
    identity: str  # hashed into each point's cache key
    fn: Callable  # fn(noise, cond, steps, rng) -> samples


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.nn.Module):
            for k, v in sorted(p.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(str(p).encode())
    return h.hexdigest()


def _labels(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    return [n if names.count(n) == 1 else f"{p.parent.name}/{n}" for n, p in zip(names, paths)]


def check(bc) -> None:
    for m in bc.teacher_methods:
        if m not in METHODS:
            raise ConfigError(f"bench.teacher_methods: '{m}' is not a sampler; choose from {METHODS}")
    for key in ("teacher_steps", "student_steps"):
        if any(int(s) < 1 for s in bc[key]):
            raise ConfigError(f"bench.{key}={list(bc[key])} must hold step counts >= 1")
    if bc.num_samples is not None and bc.num_samples < 2:
        raise ConfigError(f"bench.num_samples={bc.num_samples} must be >= 2 (or null for eval.num_samples)")


def curves(cfg, runs: list[Run], setup: experiment.Setup, device) -> list[Curve]:
    bc = cfg.bench
    teacher_cfg = runs[0].cfg.teacher if runs else cfg.teacher
    teacher = guided(setup.teacher, teacher_cfg.guidance).to(device).eval()
    t_id = _digest(OmegaConf.to_yaml(teacher_cfg), teacher)
    out = []
    for method in bc.teacher_methods:
        def fn(z, c, steps, rng, method=method):
            return sample(teacher, z, teacher.schedule.default_ts(steps), c, method=method, generator=rng)
        out.append(Curve("teacher", "teacher", method, list(bc.teacher_steps), t_id, fn))
    for run, label in zip(runs, _labels([r.path for r in runs])):
        gc = run.cfg.generator
        student = run.student()

        def fn(z, c, steps, rng, student=student, g=run.generator):
            return student.sample(g, z, c, steps, rng)
        out.append(Curve(label, "student", gc.method, list(bc.student_steps),
                         _digest(run.path.resolve(), run.step), fn))
    return out


def _check_same_teacher(runs: list[Run]) -> None:
    first = OmegaConf.to_container(runs[0].cfg.teacher, resolve=True)
    for r in runs[1:]:
        other = OmegaConf.to_container(r.cfg.teacher, resolve=True)
        if other != first:
            key = next(k for k in sorted(set(first) | set(other)) if first.get(k) != other.get(k))
            raise ConfigError(f"bench.runs: '{r.path}' was distilled from another teacher than '{runs[0].path}' "
                              f"(teacher.{key}: {first.get(key)} vs {other.get(key)}); bench runs of one teacher")


def bench(cfg, out_dir: str | Path, progress: bool | None = None) -> dict:
    """Evaluate every (model, sampler, steps) point not cached yet; write bench.csv / .md / .png."""
    bc = cfg.bench
    check(bc)
    show = bc.progress if progress is None else progress
    out = Path(out_dir)
    (out / "points").mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = [load_run(p, device) for p in bc.runs]
    if runs:
        _check_same_teacher(runs)
        setup = runs[0].setup
    else:
        torch.manual_seed(cfg.seed)
        setup = experiment.build(cfg, out, progress=show)
    n = int(bc.num_samples or cfg.eval.num_samples)
    noise, cond = eval_inputs(setup, n, bc.seed)
    headline = setup.evaluator.headline

    jobs = [(c, s) for c in curves(cfg, runs, setup, device) for s in c.steps]
    rows, computed, cached = [], 0, 0
    for c, steps in progress_bar(jobs, desc="bench", disable=not show):
        key = _digest(c.identity, c.sampler, steps, n, bc.seed, headline)[:16]
        path = out / "points" / f"{_slug(c.model)}_{c.sampler}_{steps}_{key}.json"
        if path.is_file():
            row = json.loads(path.read_text())
            cached += 1
        else:
            rng = torch.Generator(device=device).manual_seed(bc.seed)
            x = chunked(lambda z, k: c.fn(z.to(device), None if k is None else k.to(device), steps, rng), noise, cond)
            metrics = setup.evaluator.metrics(x, cond)
            row = {"model": c.model, "kind": c.kind, "sampler": c.sampler, "steps": steps, "nfe": nfe(c.sampler, steps),
                   **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(row, indent=1))
            tmp.replace(path)
            computed += 1
        rows.append(row)

    files = {"csv": out / "bench.csv", "md": out / "bench.md", "png": out / "bench.png"}
    write_csv(files["csv"], rows)
    files["md"].write_text(markdown_table(rows) + "\n")
    plot(files["png"], rows, headline)
    return {"rows": rows, "computed": computed, "cached": cached, "headline": headline,
            **{k: str(v) for k, v in files.items()}}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot(path: Path, rows: list[dict], headline: str) -> None:
    """NFE (log axis) vs the headline metric, one line per (model, sampler)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    lines: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        lines.setdefault((r["model"], r["sampler"]), []).append(r)
    for (model, sampler), pts in lines.items():
        pts = sorted(pts, key=lambda r: r["nfe"])
        style = "o--" if pts[0]["kind"] == "teacher" else "s-"
        ax.plot([r["nfe"] for r in pts], [r[headline] for r in pts], style, label=f"{model} ({sampler})", ms=4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE (denoiser evaluations per sample)")
    ax.set_ylabel(headline)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
