"""`onestep runs`: the run folders under out_root, one line each, read from what the trainer leaves in them
(nothing is loaded but small files and checkpoint headers):

    config.yaml                       a run folder (the trainer writes it first); trainer.steps
    .hydra/hydra.yaml                 the experiment (Hydra's choice), when the CLI made the folder
    checkpoints/step_XXXXXXXX         the step reached: the newest checkpoint whose files open
    metrics.json                      the final evaluation: finished, and its headline metric

A run is *finished* once its final evaluation is written for its current trainer.steps, *resumable* with a
checkpoint (run the same command again), *unreadable* when it has checkpoints none of which opens, and *empty*
without any (it failed, or was stopped, before its first checkpoint; a run still training shows the same way).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from onestep import checkpoint
from onestep.config import Config
from onestep.errors import ConfigError

#: metrics tried, in order, for the headline of a metrics.json written before it named one
HEADLINES = ("clip_score", "fd", "sliced_w2")
COLUMNS = ("run", "experiment", "step", "headline", "status")


@dataclass
class RunInfo:
    path: str  # relative to out_root
    experiment: str
    step: int | None  # the newest checkpoint whose files open
    steps: int  # trainer.steps
    headline: str  # "<metric>=<value>" of the final evaluation's student row, or "-"
    status: str  # finished | resumable | unreadable | empty


def list_runs(out_root: str | None = None) -> list[RunInfo]:
    """Every run folder under ``out_root`` (None: Config.out_root, the trainer's default), sorted by path."""
    root = Path(out_root or Config.out_root)
    if not root.is_dir():
        raise ConfigError(f"out_root '{root}' is not a folder; pass out_root=<the folder onestep train wrote runs to>")
    runs = []
    for folder, subdirs, files in os.walk(root):
        if "config.yaml" in files and (info := _read(root, Path(folder))) is not None:
            runs.append(info)
            subdirs.clear()  # checkpoints, caches: nothing below a run folder is another run
        else:
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]  # Hydra's .hydra/config.yaml is no run
    return sorted(runs, key=lambda r: r.path)


def table(runs: list[RunInfo]) -> str:
    """The runs as aligned columns."""
    rows = [COLUMNS] + [(r.path, r.experiment, f"{'-' if r.step is None else r.step}/{r.steps}", r.headline,
                         r.status) for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _read(root: Path, folder: Path) -> RunInfo | None:
    try:
        cfg = OmegaConf.load(folder / "config.yaml")
        steps = int(cfg.trainer.steps)
        objective, teacher = cfg.objective.name, cfg.teacher.kind
    except Exception:  # noqa: BLE001 - a config.yaml that is not the trainer's (or is damaged): not a run folder
        return None
    found = checkpoint.list_checkpoints(folder)
    step = next((int(c.name.split("_")[1]) for c in reversed(found) if checkpoint.looks_readable(c)), None)
    metrics = _json(folder / "metrics.json")
    if metrics is not None and metrics.get("steps", steps) == steps:
        status = "finished"
    else:
        status, metrics = ("resumable" if step is not None else "unreadable" if found else "empty"), None
    return RunInfo(str(folder.relative_to(root)), _experiment(folder) or f"({teacher}/{objective})", step, steps,
                   _headline(metrics, cfg), status)


def _experiment(folder: Path) -> str | None:
    """Hydra's choice of experiment, saved by the CLI in .hydra/hydra.yaml (absent for a run_dir=... or API run)."""
    try:
        return str(OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra.runtime.choices.experiment)
    except Exception:  # noqa: BLE001 - no or unreadable Hydra record
        return None


def _headline(metrics: dict | None, cfg) -> str:
    """The headline metric (the evaluator's, as metrics.json names it) of the student at its trained step count."""
    students = [r for r in (metrics or {}).get("rows", []) if r.get("model") == "student"]
    if not students:
        return "-"
    trained = OmegaConf.select(cfg, "generator.steps", default=1)
    row = next((r for r in students if r.get("steps") == trained), students[0])
    name = metrics.get("headline") or next((k for k in HEADLINES if k in row), None)
    value = row.get(name)
    return f"{name}={value:.4g}" if isinstance(value, (int, float)) else "-"


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
