"""Atomic checkpoints: one folder per step, written under a temporary name and renamed into place.

    <run>/checkpoints/step_00000250/{<net>.safetensors..., state.pt}                  (safetensors: whole tensors)
    <run>/checkpoints/step_00000250/{format.txt, .metadata, __<rank>_0.distcp..., state.pt}   (dcp: shards)

rename(2) is atomic, so a folder named step_* is always complete; a crash mid-write leaves only a
``.tmp-*`` folder, which the next save removes. Loading validates every file and falls back to the
previous checkpoint (with a warning) if the newest one is unreadable. ``state.pt`` holds plain tensors,
numbers and containers only (step, optimizer states) and is loaded with ``weights_only=True``.

The dcp format (trainer.checkpoint_format) is torch.distributed.checkpoint's: every process writes the shards it
holds of the networks and AdamW moments (replicated tensors once), nothing is gathered; ``state.pt`` then keeps only
the step, bad steps and data positions, and ``format.txt`` marks the folder. The main process renames the folder
into place once every process has finished writing (``save_dcp``). DCP stores each tensor's global shape and
chunks, so it loads into any layout: other process counts, FSDP or not, one process without a process group
(``load_latest``; ``role_weights`` consolidates one role on the CPU, one tensor at a time, for export and
sampling). Its ``.metadata`` file is a pickle (torch's format): load dcp checkpoints only from sources you trust.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from onestep.errors import ConfigError

_STEP = re.compile(r"^step_(\d{8})$")
#: the file that marks a dcp checkpoint folder, and its text
FORMAT_FILE, DCP = "format.txt", "torch.distributed.checkpoint"


def _dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, step: int, modules: dict[str, nn.Module], state: dict, keep: int = 2) -> Path:
    """Whole tensors, written by the main process alone."""
    return save_weights(run_dir, step, {name: m.state_dict() for name, m in modules.items()}, state, keep)


def save_weights(run_dir: Path, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict,
                 keep: int = 2) -> Path:
    """``save`` from state dicts (role -> tensors): a checkpoint written without the networks (a merged student)."""
    tmp = _fresh_tmp(run_dir, step)
    for name, sd in weights.items():
        tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
        save_file(tensors, str(tmp / f"{name}.safetensors"))
    torch.save(state, tmp / "state.pt")
    return _publish(run_dir, tmp, step, keep)


@dataclass
class Live:
    """The networks and optimizers of a run in their own layout (FSDP shards or whole tensors): what a dcp
    checkpoint is written from and read into. ``optimizers``: "opt_<role>" -> (a module holding every parameter the
    optimizer steps, the optimizer)."""
    modules: dict[str, nn.Module]
    optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]]

    def state_dict(self) -> dict:
        """Every module's and optimizer's state, keyed by parameter names (an optimizer's too, so a different
        layout maps onto it); sharded tensors stay DTensors. Every rank calls it."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        sd = {name: get_model_state_dict(m) for name, m in self.modules.items()}
        for name, (owner, opt) in self.optimizers.items():  # (initializes a fresh optimizer's moments: the target)
            sd[name] = get_optimizer_state_dict(owner, opt)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        for name, m in self.modules.items():
            set_model_state_dict(m, sd[name])
        for name, (owner, opt) in self.optimizers.items():
            set_optimizer_state_dict(owner, opt, sd[name])


def save_dcp(run_dir: Path, step: int, live: Live, state: dict, keep: int, main: bool,
             barrier: Callable[[], None]) -> Path | None:
    """Every rank writes its shards with torch.distributed.checkpoint into the main process's temporary folder;
    once all have (dcp.save returns after the main process wrote .metadata from every rank's plan), the main
    process adds ``state`` and the marker and renames the folder into place. Every rank calls it; the main process
    gets the folder."""
    import torch.distributed.checkpoint as dcp

    tmp = _fresh_tmp(run_dir, step) if main else _dir(run_dir) / f".tmp-step_{step:08d}"
    barrier()  # the folder exists, emptied of stale ones, before anyone writes into it
    with _one_process_is_fine():
        dcp.save(live.state_dict(), checkpoint_id=str(tmp))
    if not main:
        return None
    torch.save(state, tmp / "state.pt")
    (tmp / FORMAT_FILE).write_text(DCP + "\n")
    return _publish(run_dir, tmp, step, keep)


def _fresh_tmp(run_dir: Path, step: int) -> Path:
    root = _dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step_{step:08d}"
    tmp.mkdir()
    return tmp


def _publish(run_dir: Path, tmp: Path, step: int, keep: int) -> Path:
    """Rename a written temporary folder into place, then drop all but the ``keep`` newest checkpoints."""
    root, final = _dir(run_dir), _dir(run_dir) / f"step_{step:08d}"
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_dcp(ckpt: Path) -> bool:
    return (Path(ckpt) / FORMAT_FILE).is_file()


def roles(ckpt: Path) -> list[str]:
    """The network roles a checkpoint folder holds (generator, critic, generator_ema, heads...)."""
    if not is_dcp(ckpt):
        return sorted(f.stem for f in Path(ckpt).glob("*.safetensors"))
    keys = _metadata(ckpt).state_dict_metadata
    return sorted({k.split(".", 1)[0] for k in keys if not k.startswith("opt_")})


def role_weights(ckpt: Path, role: str) -> dict[str, torch.Tensor]:
    """One role's whole state dict on the CPU, from either format; a dcp checkpoint is consolidated one tensor at a
    time from its shards (no process group, no GPU). A role the folder lacks is a FileNotFoundError."""
    ckpt = Path(ckpt)
    if not is_dcp(ckpt):
        return load_file(str(ckpt / f"{role}.safetensors"))
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(ckpt))
    prefix, out = f"{role}.", {}
    for key, meta in reader.read_metadata().state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
            one = {key: torch.empty(meta.size, dtype=meta.properties.dtype)}
            with _one_process_is_fine():
                dcp.load(one, storage_reader=reader, no_dist=True)
            out[key[len(prefix):]] = one[key]
    if not out:
        raise FileNotFoundError(f"{ckpt} holds no {role}")
    return out


@contextmanager
def _one_process_is_fine():
    """dcp warns on every save / load without a process group; one process (or none) is a layout we support."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*assuming the intent is to")
        yield


def _metadata(ckpt: Path):
    import torch.distributed.checkpoint as dcp

    return dcp.FileSystemReader(str(ckpt)).read_metadata()


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = _dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name))


def load_latest(run_dir: Path, modules: dict[str, nn.Module], upto: int | None = None,
                live: Live | None = None) -> dict | None:
    """Load the newest readable checkpoint (of step <= ``upto``, if given) into ``modules``; return its state, with
    the checkpoint folder under "checkpoint" (None if there is none). A dcp checkpoint loads into ``live`` when
    given (networks and optimizers in their own layout, every rank calling; the state then says
    "optimizers_loaded"), else each of ``modules`` gets its role's whole tensors."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        if upto is not None and step_of(ckpt) > upto:
            continue
        try:
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
            if is_dcp(ckpt) and live is not None:
                import torch.distributed.checkpoint as dcp

                sd = live.state_dict()
                with _one_process_is_fine():
                    dcp.load(sd, checkpoint_id=str(ckpt))
                live.load_state_dict(sd)
                return {**state, "checkpoint": str(ckpt), "optimizers_loaded": True}
            weights = {name: role_weights(ckpt, name) for name in modules}
        except Exception as e:  # noqa: BLE001 - any unreadable file means: try the previous checkpoint
            warnings.warn(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {e}); trying an older one")
            continue
        for name, m in modules.items():
            m.load_state_dict(weights[name])
        return {**state, "checkpoint": str(ckpt)}
    return None


def load_start(path: str, modules: dict[str, nn.Module], key: str = "trainer.init_from") -> list[str]:
    """Load every role of ``modules`` that the checkpoint ``path`` names (a run folder: its newest checkpoint; or a
    checkpoint folder, either format) holds into it in place, weights only; return the roles loaded. The generator
    role must be there; a role of ``modules`` the checkpoint lacks keeps its fresh weights."""
    p = Path(path).expanduser()
    found = [p] if (p / "state.pt").is_file() else list_checkpoints(p)
    ckpt = found[-1] if found else None
    if ckpt is None:
        raise ConfigError(f"{key}='{path}' is not a run folder with a checkpoint or a checkpoint folder: pass the "
                          "folder of the run to start from (its checkpoints/step_* folder or the run itself)")
    have = set(roles(ckpt))
    if "generator" not in have:
        raise ConfigError(f"{key}='{path}': checkpoint {ckpt.name} has no generator weights (roles: "
                          f"{', '.join(sorted(have)) or 'none'}); pass a distillation run of this teacher")
    loaded = []
    for name, m in modules.items():
        if name not in have:
            continue
        try:
            m.load_state_dict(role_weights(ckpt, name))
        except RuntimeError as e:
            first = str(e).strip().splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise ConfigError(f"{key}='{path}': its {name} does not fit this run's ({first}); start from a run of "
                              "the same teacher and generator settings") from None
        loaded.append(name)
    return loaded


def step_of(ckpt: Path) -> int:
    """The training step a checkpoint folder (step_XXXXXXXX) holds."""
    return int(_STEP.match(ckpt.name).group(1))


def looks_readable(ckpt: Path) -> bool:
    """Whether a checkpoint folder's files open (each safetensors header against the file's size, state.pt's zip
    directory; a dcp folder's metadata and the shard files it names) without reading the tensors: what listing
    runs can afford; load_latest checks everything."""
    try:
        for f in ckpt.glob("*.safetensors"):
            with safe_open(str(f), "pt"):
                pass
        if is_dcp(ckpt):
            files = {item.relative_path for item in _metadata(ckpt).storage_data.values()}
            if not all((ckpt / f).is_file() for f in files):
                return False
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
    """Where a run's generator weights are: ``path`` is a .safetensors file itself, a checkpoint folder (its
    generator_ema.safetensors, or the folder itself when it is a dcp checkpoint with that role) or a run folder
    (the newest checkpoint that has one); ``key`` is the config key that gave the path, for the error."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".safetensors":
        return p
    for ckpt in [p, *reversed(list_checkpoints(p) if p.is_dir() else [])]:
        if (ckpt / f"{GENERATOR_ROLE}.safetensors").is_file():
            return ckpt / f"{GENERATOR_ROLE}.safetensors"
        if is_dcp(ckpt) and GENERATOR_ROLE in roles(ckpt):
            return ckpt
    raise ConfigError(f"{key}='{path}' is not a run folder with a checkpoint, a checkpoint folder or a .safetensors "
                      f"file of generator weights; pass {key}=<the run folder of a finished run of this generator>")


def read_generator_weights(path: str, key: str) -> dict[str, torch.Tensor]:
    """The whole generator weights ``generator_weights_file`` finds, on the CPU."""
    found = generator_weights_file(path, key)
    return load_file(str(found)) if found.is_file() else role_weights(found, GENERATOR_ROLE)


def read_run_weights(paths: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """The generator weights an objective reads from other runs (``Objective.run_weights()``: config field of the
    objective -> path), by the same names; objectives know no checkpoint layout, the trainer reads them here."""
    return {name: read_generator_weights(path, f"objective.{name}") for name, path in paths.items()}
