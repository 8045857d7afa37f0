"""Atomic checkpoints: one folder per step, written under a temporary name and renamed into place.

    <run>/checkpoints/step_00000250/{<net>.safetensors..., state.pt}

rename(2) is atomic, so a folder named step_* is always complete; a crash mid-write leaves only a
``.tmp-*`` folder, which the next save removes. Loading validates every file and falls back to the
previous checkpoint (with a warning) if the newest one is unreadable. ``state.pt`` holds plain tensors,
numbers and containers only (step, optimizer states) and is loaded with ``weights_only=True``: a checkpoint
someone hands you cannot run code through pickle.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from onestep.errors import ConfigError

_STEP = re.compile(r"^step_(\d{8})$")


def _dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, step: int, modules: dict[str, nn.Module], state: dict, keep: int = 2) -> Path:
    root = _dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    tmp.mkdir()
    for name, m in modules.items():
        tensors = {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}
        save_file(tensors, str(tmp / f"{name}.safetensors"))
    torch.save(state, tmp / "state.pt")
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = _dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name))


def load_latest(run_dir: Path, modules: dict[str, nn.Module], upto: int | None = None) -> dict | None:
    """Load the newest readable checkpoint (of step <= ``upto``, if given) into ``modules``; return its state, with
    the checkpoint folder under "checkpoint" (None if there is none)."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        if upto is not None and step_of(ckpt) > upto:
            continue
        try:
            weights = {name: load_file(str(ckpt / f"{name}.safetensors")) for name in modules}
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file means: try the previous checkpoint
            warnings.warn(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {e}); trying an older one")
            continue
        for name, m in modules.items():
            m.load_state_dict(weights[name])
        return {**state, "checkpoint": str(ckpt)}
    return None


def step_of(ckpt: Path) -> int:
    """The training step a checkpoint folder (step_XXXXXXXX) holds."""
    return int(_STEP.match(ckpt.name).group(1))


def looks_readable(ckpt: Path) -> bool:
    """Whether a checkpoint folder's files open (each safetensors header against the file's size, state.pt's zip
    directory) without reading the tensors: what listing runs can afford; load_latest checks everything."""
    try:
        for f in ckpt.glob("*.safetensors"):
            with safe_open(str(f), "pt"):
                pass
        zipfile.ZipFile(ckpt / "state.pt").close()
    except Exception:  # noqa: BLE001 - any unreadable file (a SafetensorError, BadZipFile, OSError)
        return False
    return True


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir() if path.is_dir() else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


#: the checkpointed role another run's generator is read from (what `onestep sample` reads)
GENERATOR_ROLE = "generator_ema"


def generator_weights_file(path: str, key: str) -> Path:
    """The file of a run's generator weights: ``path`` is a .safetensors file itself, a checkpoint folder (its
    generator_ema.safetensors) or a run folder (the newest checkpoint that has one); ``key`` is the config key that
    gave the path, for the error."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".safetensors":
        return p
    if (p / f"{GENERATOR_ROLE}.safetensors").is_file():
        return p / f"{GENERATOR_ROLE}.safetensors"
    for ckpt in reversed(list_checkpoints(p) if p.is_dir() else []):
        if (ckpt / f"{GENERATOR_ROLE}.safetensors").is_file():
            return ckpt / f"{GENERATOR_ROLE}.safetensors"
    raise ConfigError(f"{key}='{path}' is not a run folder with a checkpoint, a checkpoint folder or a .safetensors "
                      f"file of generator weights; pass {key}=<the run folder of a finished run of this generator>")


def read_run_weights(paths: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """The generator weights an objective reads from other runs (``Objective.run_weights()``: config field of the
    objective -> path), by the same names; objectives know no checkpoint layout, the trainer reads them here."""
    return {name: load_file(str(generator_weights_file(path, f"objective.{name}"))) for name, path in paths.items()}
