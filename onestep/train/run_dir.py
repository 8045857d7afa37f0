"""The run folder is the run's identity: it holds the resolved config, checkpoints, stats and results.

Running the same command again resumes. A different config pointed at the same folder is refused
(except keys that may change between invocations, such as the total step count), so results in a
folder always come from one config. Resuming picks the newest readable checkpoint and cuts the logs back to
its step; checkpoint folders none of which loads stop the run (``trainer.resume=false`` starts afresh,
moving the old checkpoints and logs aside), never a silent restart from step 0.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from onestep import checkpoint
from onestep.config import Config
from onestep.errors import ConfigError

#: keys that may differ when resuming (extending a run, toggling progress output or tracking, sharding or not)
RESUMABLE_CHANGES = ("trainer.steps", "trainer.progress", "trainer.log_every", "trainer.sample_every", "trainer.eval_every",
                     "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.resume", "trainer.fsdp",
                     "trainer.checkpoint_format", "run_dir",
                     "out_root", "trainer.log_with")
#: per-step logs of a run folder: one JSON record with a "step" per line
LOGS = ("stats.jsonl", "evals.jsonl")


def prepare_run_dir(cfg, run_dir=None, write: bool = True) -> Path:
    """Create / check the run folder; ``write``: save config.yaml (only the main process of a multi-process run
    does; every process checks it against its own config)."""
    run_dir = run_dir or cfg.run_dir
    if not run_dir:
        raise ConfigError("no run folder: pass run_dir=<folder> (the CLI derives one from the experiment name)")
    path = Path(run_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run folder '{path}' cannot be created ({e.strerror}); pass run_dir=<writable folder> "
                          "or out_root=<writable folder>") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"run folder '{path}' is not writable; pass run_dir=<writable folder> or out_root=<...>")
    saved = path / "config.yaml"
    text = OmegaConf.to_yaml(cfg, resolve=True)
    if saved.exists():
        new = OmegaConf.create(text)
        diff = _differences(OmegaConf.load(saved), new, objective=OmegaConf.select(new, "objective.name"))
        if diff:
            raise ConfigError(f"run folder '{path}' holds a run with a different config ({'; '.join(diff[:3])}); "
                              "pass run_dir=<new folder> for a new run, or delete the old folder")
    if write:
        tmp = saved.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(saved)
    return path


def undo_on_bad_input(train):
    """``train(cfg, run_dir, ...)`` that stops on bad input (a ConfigError: a missing teacher folder, a corrupt
    file...) in a folder that held no run leaves the folder as it found it: what the call added is deleted, and
    the folder itself when the call created it, unless the call saved a checkpoint. A half-written folder would
    refuse the corrected command as "a run with a different config". A folder that held a run is never touched."""

    @functools.wraps(train)
    def guarded(cfg, run_dir=None, *args, **kwargs):
        path = Path(run_dir or cfg.run_dir or ".")
        fresh = bool(run_dir or cfg.run_dir) and not (path / "config.yaml").exists()
        before = {p.name for p in path.iterdir()} if fresh and path.is_dir() else None
        try:
            return train(cfg, run_dir, *args, **kwargs)
        except ConfigError:
            if fresh and path.is_dir() and not checkpoint.list_checkpoints(path):
                for p in [path] if before is None else [p for p in path.iterdir() if p.name not in before]:
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)  # other ranks may be deleting it too
                    else:
                        p.unlink(missing_ok=True)
            raise

    return guarded


def _differences(old, new, prefix: str = "", objective: str | None = None) -> list[str]:
    out = []
    for key in sorted(set(old.keys()) | set(new.keys()), key=str):
        full = f"{prefix}{key}"
        if full in RESUMABLE_CHANGES:
            continue
        a, b = old.get(key), new.get(key)
        # a key the schemas gained after the run was made, left at its default (what the run did without it)
        if key not in old and (_empty(b) or _schema_default(full, objective) == b):
            continue
        if OmegaConf.is_dict(a) and OmegaConf.is_dict(b):
            out += _differences(a, b, full + ".", objective)
        elif (OmegaConf.to_container(a) if OmegaConf.is_config(a) else a) != \
                (OmegaConf.to_container(b) if OmegaConf.is_config(b) else b):
            out.append(f"{full}: {a} -> {b}")
    return out


def _schema_default(key: str, objective: str | None = None):
    """The default onestep.config's schema gives ``key`` (dotted), objective.* keys from the run's objective's own
    config dataclass; None where no schema fixes one (the teacher's group)."""
    if key.startswith("objective.") and objective:
        from onestep.objectives import OBJECTIVES

        cls = OBJECTIVES.get(objective)
        return None if cls is None else OmegaConf.select(OmegaConf.structured(cls.Config),
                                                         key.removeprefix("objective."), default=None)
    return OmegaConf.select(OmegaConf.structured(Config), key, default=None)


def _empty(value) -> bool:
    return (OmegaConf.to_container(value) if OmegaConf.is_config(value) else value) in (None, [], {})


def resume_state(run_dir, modules: dict, resume: bool, acc, live=None) -> dict | None:
    """Load the newest readable checkpoint into ``modules`` (a dcp checkpoint into ``live``, when given:
    checkpoint.load_latest) and return its state (None: start at step 0).

    Log lines past that step (written by a killed process after its last checkpoint, the last one maybe cut
    in half) are dropped, so the logs read as one uninterrupted run once the lost steps are redone."""
    run_dir = Path(run_dir)
    if not resume and acc.is_main_process:
        _set_aside(run_dir)
    acc.wait_for_everyone()
    state = checkpoint.load_latest(run_dir, modules, live=live)
    found = checkpoint.list_checkpoints(run_dir)
    if state is None and found:
        names = ", ".join(p.name for p in found[-3:])
        raise ConfigError(f"no checkpoint in '{run_dir / 'checkpoints'}' is readable ({names}); delete that folder, "
                          "or pass trainer.resume=false to start fresh (the old checkpoints are moved aside)")
    if acc.is_main_process:
        for name in LOGS:
            _truncate_log(run_dir / name, state["step"] if state else 0)
    return state


def _set_aside(run_dir: Path) -> None:
    """trainer.resume=false: move checkpoints and logs of an earlier run into <run>/discarded-<time>/."""
    old = [p for p in (run_dir / "checkpoints", *(run_dir / n for n in LOGS)) if p.exists()]
    if not old:
        return
    aside = run_dir / time.strftime("discarded-%Y%m%d-%H%M%S")
    while aside.exists():
        aside = aside.with_name(aside.name + "+")
    aside.mkdir()
    for p in old:
        p.rename(aside / p.name)
    print(f"trainer.resume=false: moved {', '.join(p.name for p in old)} to {aside}; starting at step 0", flush=True)


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # cut off by a kill mid-write
            continue
        if record.get("step", 0) <= step:
            keep.append(line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)
