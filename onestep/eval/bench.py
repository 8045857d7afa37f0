"""`onestep bench`: quality vs number of function evaluations (NFE) for the teacher's samplers and for
student checkpoints, under one protocol: the same noise, labels, sample count and evaluator headline
metric (sliced-W2 for Gaussian mixtures, FD for images) for every point.

    <out>/points/<model>_<sampler>_<steps>_<key>.json   one finished point (the resume cache)
    <out>/bench.csv  <out>/bench.md  <out>/bench.png      this invocation's points: table and NFE plot

A point's cache key hashes the model's identity (teacher config + weights, or run folder + checkpoint
step), the sampler, step count, sample count, seed and evaluator settings, so a rerun skips finished points and
a newer checkpoint or another protocol computes fresh ones.

With student runs, the protocol (the eval section: sample count and evaluator; the bench's samplers, step counts
and seed) is the runs' own, read from their config.yaml (``runs_protocol``), and the output folder is named
after their experiment (``folder_name``); keys set on the command line win.

Everything goes through the runs layer (``runs.load_run``, ``runs.config_setup``), ``make_evaluator``, the Denoiser
interface, ``sampling.sample`` and ``Student.sample``: a
text-to-image teacher plugs in unchanged.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from omegaconf import OmegaConf

from onestep.data.setup import Setup
from onestep.denoisers.base import guided
from onestep.errors import ConfigError
from onestep.eval.evaluators import make_evaluator
from onestep.eval.report import chunked, eval_inputs, markdown_table
from onestep.progress import bar as progress_bar
from onestep.runs import Run, config_setup, load_run, run_config
from onestep.sampling import METHODS, nfe, sample


#: bench keys of a run's config.yaml that are part of its protocol (runs, out and progress belong to the invocation)
RUN_BENCH_KEYS = ("teacher_methods", "teacher_steps", "student_steps", "num_samples", "seed")
#: eval keys that choose the evaluator (hashed into each point's cache key)
EVALUATOR_KEYS = ("protocol", "features", "inception_path", "reference", "clip", "rewards")
RUNS_FIX = "pass bench.runs=[<run folder of onestep train>, ...]"


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


def curves(cfg, runs: list[Run], setup: Setup, device) -> list[Curve]:
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


def run_experiment(path: str | Path) -> str | None:
    """The experiment a run folder was trained with, as Hydra recorded it (<run>/.hydra/hydra.yaml); None for a
    run made from Python or with run_dir=<folder> (Hydra's record is then in the folder Hydra made for itself)."""
    import yaml
    from omegaconf.errors import OmegaConfBaseException

    record = Path(path) / ".hydra" / "hydra.yaml"
    try:
        name = OmegaConf.select(OmegaConf.load(record), "hydra.runtime.choices.experiment")
    except (OSError, yaml.YAMLError, OmegaConfBaseException):
        return None
    return str(name) if name else None


def folder_name(runs: Sequence[str], experiment: str | None = None) -> str:
    """The bench folder's name under <out_root>/bench/ for student ``runs``: the first run's experiment (a run
    without Hydra's record: its folder's name). ``experiment``: the one given on the command line, if any; it must
    be every recorded run's. Run folders are checked here, before any output folder is made."""
    for p in runs:
        run_config(p, "bench.runs", RUNS_FIX)
    names = [run_experiment(p) for p in runs]
    for p, name in zip(runs, names):
        if experiment is not None and name is not None and name != experiment:
            raise ConfigError(f"bench.runs: '{p}' was trained with experiment={name}, not experiment={experiment}; "
                              "leave experiment= out (the runs' config.yaml sets the protocol)")
    return names[0] or _slug(Path(runs[0]).resolve().name)


def runs_protocol(cfg, overrides: Sequence[str] = ()):
    """``cfg`` with bench.runs set: its eval section and bench protocol (RUN_BENCH_KEYS) become the runs' own, from
    their config.yaml, except the keys that ``overrides`` (the command line's key=value arguments) set: eval.<key>,
    bench.<key>, or eval=<option> for the whole section. Runs whose protocols still differ are refused with the key
    that would settle it. Without runs: ``cfg`` itself."""
    if not cfg.bench.runs:
        return cfg
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = {o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides)) if not o.is_delete()}
    first = None  # (run, eval section, bench section, protocol) of the first run
    for path in cfg.bench.runs:
        rc = run_config(path, "bench.runs", RUNS_FIX)
        ev = copy.deepcopy(cfg.eval if "eval" in given else rc.eval)
        for key in sorted(k for k in given if k.startswith("eval.")):
            OmegaConf.update(ev, key.removeprefix("eval."), OmegaConf.select(cfg, key), merge=False)
        bc = copy.deepcopy(cfg.bench)
        for key in RUN_BENCH_KEYS:
            if f"bench.{key}" not in given:
                bc[key] = rc.bench[key]
        protocol = {"bench.num_samples": bc.num_samples or ev.num_samples,
                    **{f"bench.{k}": OmegaConf.to_container(bc)[k] for k in RUN_BENCH_KEYS if k != "num_samples"},
                    **{f"eval.{k}": OmegaConf.to_container(ev)[k] for k in EVALUATOR_KEYS}}
        if first is None:
            first = (path, ev, bc, protocol)
            continue
        key = next((k for k in protocol if protocol[k] != first[3][k]), None)
        if key is not None:
            raise ConfigError(f"bench.runs: '{path}' and '{first[0]}' define different protocols ({key}: "
                              f"{protocol[key]} vs {first[3][key]}); pass {key}=<value> to bench them under one")
    out = copy.deepcopy(cfg)
    out.eval, out.bench = first[1], first[2]
    return out


def _evaluator_id(ev) -> str:
    return json.dumps({k: OmegaConf.to_container(ev)[k] for k in EVALUATOR_KEYS}, sort_keys=True)


def bench(cfg, out_dir: str | Path, progress: bool | None = None) -> dict:
    """Evaluate every (model, sampler, steps) point not cached yet; write bench.csv / .md / .png. The protocol is
    ``cfg``'s (eval section, bench keys): ``runs_protocol(cfg, overrides)`` makes it the runs' own, as the CLI does."""
    bc = cfg.bench
    check(bc)
    show = bc.progress if progress is None else progress
    out = Path(out_dir)
    (out / "points").mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = [load_run(p, device, eval_cfg=cfg.eval) for p in bc.runs]
    if runs:
        _check_same_teacher(runs)
        setup, evaluator = runs[0].data(), make_evaluator(runs[0].cfg, runs[0].setup)
    else:
        torch.manual_seed(cfg.seed)
        setup = config_setup(cfg, out, progress=show)
        evaluator = make_evaluator(cfg, setup)
    n = int(bc.num_samples or cfg.eval.num_samples)
    noise, cond = eval_inputs(setup, n, bc.seed)
    headline = evaluator.headline

    jobs = [(c, s) for c in curves(cfg, runs, setup, device) for s in c.steps]
    rows, computed, cached = [], 0, 0
    for c, steps in progress_bar(jobs, desc="bench", disable=not show):
        key = _digest(c.identity, c.sampler, steps, n, bc.seed, headline, _evaluator_id(cfg.eval))[:16]
        path = out / "points" / f"{_slug(c.model)}_{c.sampler}_{steps}_{key}.json"
        if path.is_file():
            row = json.loads(path.read_text())
            cached += 1
        else:
            rng = torch.Generator(device=device).manual_seed(bc.seed)
            x = chunked(lambda z, k: c.fn(z.to(device), None if k is None else k.to(device), steps, rng), noise, cond)
            metrics = evaluator.metrics(x, cond)
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
