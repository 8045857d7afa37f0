"""The run folder is the run's identity: it holds the resolved config, checkpoints, stats and results.

Running the same command again resumes. A different config pointed at the same folder is refused
(except keys that may change between invocations, such as the total step count), so results in a
folder always come from one config.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from onestep.errors import ConfigError

#: keys that may differ when resuming (extending a run, toggling progress output)
RESUMABLE_CHANGES = ("trainer.steps", "trainer.progress", "trainer.log_every", "trainer.sample_every", "trainer.eval_every",
                     "trainer.checkpoint_every", "trainer.keep_checkpoints", "run_dir", "out_root")


def prepare_run_dir(cfg, run_dir=None) -> Path:
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
        diff = _differences(OmegaConf.load(saved), OmegaConf.create(text))
        if diff:
            raise ConfigError(f"run folder '{path}' holds a run with a different config ({'; '.join(diff[:3])}); "
                              "pass run_dir=<new folder> for a new run, or delete the old folder")
    tmp = saved.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(saved)
    return path


def _differences(old, new, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old.keys()) | set(new.keys()), key=str):
        full = f"{prefix}{key}"
        if full in RESUMABLE_CHANGES:
            continue
        a, b = old.get(key), new.get(key)
        if OmegaConf.is_dict(a) and OmegaConf.is_dict(b):
            out += _differences(a, b, full + ".")
        elif (OmegaConf.to_container(a) if OmegaConf.is_config(a) else a) != \
                (OmegaConf.to_container(b) if OmegaConf.is_config(b) else b):
            out.append(f"{full}: {a} -> {b}")
    return out
