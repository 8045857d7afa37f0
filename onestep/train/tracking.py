"""Experiment tracking (trainer.log_with) through accelerate's trackers: TensorBoard event files in <run>/tb/, or
a wandb run (wandb's own WANDB_MODE=offline / WANDB_PROJECT apply). The trackers mirror the run folder's files,
they replace none of them:

    stats.jsonl line      -> the same names at the same step (losses, it_per_s, bad_steps), plus lr/<optimizer>
    evals.jsonl line      -> eval/<metric>
    samples_<step>.png    -> image "samples"
    final evaluation      -> final/<model>_<steps>step_<sampler>/<metric> at trainer.steps, and results.md as text

Only the main process logs (accelerate's ``init_trackers`` and ``log`` run there alone; elsewhere the trackers list
is empty). Resuming logs into the same place: TensorBoard hides the events a killed process wrote past the resumed
checkpoint (SummaryWriter's purge_step), as stats.jsonl drops their lines; wandb continues the run whose id the
folder keeps (a run started at step 0 gets a new id).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

#: TensorBoard's folder inside the run folder (accelerate: <project_dir>/<project_name>)
TB_FOLDER = "tb"
#: the wandb run id of a run folder, kept so that a resumed run logs into the same wandb run
WANDB_ID = Path("wandb") / "onestep_run_id"


def tracker_name(log_with: str) -> str | None:
    """trainer.log_with -> accelerate's tracker name; None = no tracking."""
    if log_with == "auto":
        return "tensorboard" if importlib.util.find_spec("tensorboard") else None
    return None if log_with == "none" else log_with


def accelerator_args(log_with: str, run_dir) -> dict:
    """Keyword arguments of ``Accelerator`` that attach the tracker (none without a run folder: the trainer then
    stops on that with its own message)."""
    name = tracker_name(log_with)
    return {"log_with": name, "project_dir": str(run_dir)} if name and run_dir else {}


class Tracker:
    def __init__(self, acc, run_dir: Path, cfg, start: int):
        """Start the Accelerator's tracker (if it has one) for a run that continues at step ``start``."""
        self.acc = acc
        if not acc.log_with:
            return
        if str(acc.log_with[0]) == "tensorboard":
            # events past ``start`` in the folder are a killed process's lost steps (stats.jsonl dropped their lines)
            acc.init_trackers(TB_FOLDER, init_kwargs={"tensorboard": {"purge_step": start + 1}})
        elif acc.is_main_process:
            run_dir = Path(run_dir)
            acc.init_trackers(os.environ.get("WANDB_PROJECT", "onestep"), init_kwargs={"wandb": {
                "id": _wandb_id(run_dir, start), "resume": "allow", "dir": str(run_dir),
                "reinit": "finish_previous",  # a run still open here is a train() call's that raised
                "name": "/".join(run_dir.resolve().parts[-2:]),
                "config": OmegaConf.to_container(cfg, resolve=True)}})

    def stats(self, record: dict, opt_g, opt_c) -> None:
        """A stats.jsonl record, and the optimizers' learning rates."""
        lrs = {f"lr/{role}": opt.param_groups[0]["lr"] for role, opt in (("generator", opt_g), ("critic", opt_c))
               if opt is not None}
        self._log(record, lrs)

    def evals(self, record: dict) -> None:
        """An evals.jsonl record."""
        self._log({"step": record["step"], **{f"eval/{k}": v for k, v in record.items() if k != "step"}})

    def samples(self, step: int, png: Path) -> None:
        """A sample grid written to ``png``."""
        from PIL import Image

        image = np.asarray(Image.open(png).convert("RGB"))[None]  # (1, H, W, 3) uint8
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": image}, step=step, dataformats="NHWC")
                tracker.writer.flush()  # add_images leaves it queued; a killed run would lose it
            else:
                tracker.log_images({"samples": image}, step=step)

    def finish(self, step: int, rows: list[dict], table: str) -> None:
        """The final evaluation (one scalar per row and metric, and the results.md table as text); then close."""
        values = {f"final/{r['model']}_{r['steps']}step_{r['sampler']}/{k}": v for r in rows for k, v in r.items()
                  if k not in ("model", "sampler", "steps", "nfe")}
        self._log({"step": step, **values, "final/results": table})
        self.close()

    def close(self) -> None:
        """Flush and close the trackers (also when the run stops early on a signal)."""
        # not acc.end_training(): that also destroys the process group, which is not the trainer's to end
        for tracker in self.acc.trackers:
            tracker.finish()

    def _log(self, record: dict, extra: dict | None = None) -> None:
        if not self.acc.trackers:
            return
        values = {k: v for k, v in record.items() if k != "step" and _loggable(v)}
        self.acc.log(values | (extra or {}), step=record["step"])


def _loggable(v) -> bool:
    return isinstance(v, (int, float, str))


def _wandb_id(run_dir: Path, start: int) -> str:
    """The wandb run id kept in the run folder; a run that starts at step 0 (new, or trainer.resume=false) gets a
    new one, since wandb drops steps logged below the ones it has."""
    path = run_dir / WANDB_ID
    if start == 0 or not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(8))
    return path.read_text().strip()
