"""`onestep eval`: a run's checkpoints evaluated under one protocol from a process of its own, now or as they appear
(the pattern of DMD2's evaluation scripts: a second GPU evaluates while the first trains).

    <run>/eval/<protocol>.jsonl     one row per evaluated checkpoint step: the metrics and their provenance
    <run>/tb/eval_<protocol>/        the same numbers as TensorBoard scalars, when the run logs to TensorBoard

Each checkpoint is evaluated once: the rows already in the jsonl are skipped, so a watcher killed at any point
resumes by running the same command again (a row is one appended line; a line cut short by the kill is dropped).
With ``watch``, the folder is polled every ``poll_s`` seconds until the run's last checkpoint (step ==
trainer.steps, which the trainer always writes; the config is read again each poll, so a run resumed with more
steps is followed further) has been evaluated. A checkpoint the trainer deleted (trainer.keep_checkpoints) before
its turn is skipped with a note: poll faster than checkpoints are rotated to see every one.

The student is sampled at its trained step count from the fixed evaluation noise and conditioning of the final
evaluation (report.eval_inputs, seed SEED), so the row of the last checkpoint repeats metrics.json's student row
under the run's own protocol.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from onestep import checkpoint, teachers
from onestep.errors import ConfigError
from onestep.eval.evaluators import make_evaluator
from onestep.eval.report import chunked, eval_inputs
from onestep.runs import Run, load_run, run_config

#: the evaluation noise and conditioning: the final evaluation's (report.compare's default seed)
SEED = 12345
#: where the rows go, inside the run folder
FOLDER = "eval"
#: TensorBoard's folder of the run (train/tracking.TB_FOLDER, which eval may not import); the watcher writes a
#: sibling run ``eval_<protocol>`` beside the trainer's events
TB_FOLDER = "tb"
FIX = "pass run_dir=<run folder of onestep train>"


def protocol_name(cfg) -> str:
    """The protocol a run config evaluates with: eval.protocol, else its teacher family's own."""
    return cfg.eval.protocol or teachers.family(cfg.teacher.kind).evaluation


def eval_section(run_dir: str | Path, protocol: str | None, overrides: Sequence[str] = ()):
    """The run's eval section with ``protocol`` (None: the run's own) and ``overrides`` (eval.<key>=value) applied;
    unknown keys and bad values are one line."""
    cfg = run_config(run_dir, "run_dir", FIX)
    ev = cfg.eval
    if protocol is not None:
        ev.protocol = protocol
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            OmegaConf.update(ev, key.removeprefix("eval."), OmegaConf.from_dotlist([f"v={value}"]).v, merge=False)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key}: {str(e).splitlines()[0]}; `onestep train --help` lists the eval keys") from None
    return ev


def done_steps(path: Path, ev: dict) -> set[int]:
    """Checkpoint steps with a row in ``path``; a last line without its newline (the writer was killed mid-line) is
    cut off so that the next row starts on a line of its own. Rows made with other eval settings than ``ev`` are
    refused: one file holds one protocol's numbers."""
    if not path.is_file():
        return set()
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        path.write_text(text)
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for row in rows:
        old = row["provenance"]["eval"]
        key = next((k for k in sorted(set(old) | set(ev)) if old.get(k) != ev.get(k)), None)
        if key is not None:
            raise ConfigError(f"eval.{key}: {path} holds rows made with eval.{key}={old.get(key)}, not "
                              f"{ev.get(key)}; pass eval.{key}={old.get(key)} to continue it, or move the file away")
    return {int(row["step"]) for row in rows}


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


class TensorBoardLog:
    """The rows as scalars ``eval_<protocol>/<metric>`` at the checkpoint's step, in <run>/tb/eval_<protocol>."""

    def __init__(self, run_dir: Path, protocol: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.prefix = SummaryWriter(str(run_dir / TB_FOLDER / f"eval_{protocol}")), f"eval_{protocol}"

    def __call__(self, row: dict) -> None:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{self.prefix}/{k}", v, row["step"])
        self.writer.flush()


def tracker(cfg, run_dir: Path, protocol: str) -> Callable[[dict], None] | None:
    """The run's tracker (trainer.log_with) as a row logger: TensorBoard, or None (none configured, or wandb:
    its run belongs to the training process; the jsonl has the rows)."""
    import importlib.util

    name = cfg.trainer.log_with
    if name == "tensorboard" or (name == "auto" and importlib.util.find_spec("tensorboard")):
        return TensorBoardLog(run_dir, protocol)
    return None


def _steps(run_dir: Path) -> list[int]:
    return [checkpoint.step_of(c) for c in checkpoint.list_checkpoints(run_dir)]


def evaluate_run(run_dir: str | Path, protocol: str | None = None, overrides: Sequence[str] = (), *,
                 watch: bool = False, poll_s: float = 60.0, device: torch.device | None = None,
                 progress: bool = True, say: Callable[[str], None] = print) -> Path:
    """Evaluate every checkpoint of ``run_dir`` without a row yet (with ``watch``: and those still to come, until
    the run's last one); return the jsonl path."""
    run_dir = Path(run_dir)
    ev = eval_section(run_dir, protocol, overrides)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run, evaluator, inputs, name, out, log = None, None, None, None, None, None
    while True:
        total = int(run_config(run_dir, "run_dir", FIX).trainer.steps)  # a resumed run may have raised it
        present = _steps(run_dir)
        if not present and not watch:
            raise ConfigError(f"run_dir: '{run_dir}' has no checkpoint yet; train it (onestep train run_dir="
                              f"{run_dir}) first, or pass watch=true to wait for its checkpoints")
        if present and run is None:
            run = load_run(run_dir, device, "run_dir", FIX, progress=progress, eval_cfg=ev)
            name = run.cfg.eval.protocol = protocol_name(run.cfg)  # rows name it, also when it is the default
            evaluator = make_evaluator(run.cfg, run.data())
            inputs = eval_inputs(run.setup, int(ev.num_samples), SEED)
            out = run_dir / FOLDER / f"{name}.jsonl"
            out.parent.mkdir(exist_ok=True)
            log = tracker(run.cfg, run_dir, name)
        done = done_steps(out, OmegaConf.to_container(run.cfg.eval, resolve=True)) if out is not None else set()
        for step in [s for s in present if s not in done]:
            row = _evaluate(run, step, evaluator, inputs, name, device)
            if row is None:
                say(f"checkpoint step {step}: gone or unreadable before its turn (trainer.keep_checkpoints); skipped")
                continue
            _append(out, row)
            done.add(step)
            if log is not None:
                log(row)
            say(f"step {step}: {evaluator.headline}={row.get(evaluator.headline)} -> {out}")
        if not watch or any(s >= total and s in done for s in present):
            return out if out is not None else run_dir / FOLDER
        time.sleep(poll_s)


def _evaluate(run: Run, step: int, evaluator, inputs, name: str, device) -> dict | None:
    """The row of checkpoint ``step``: the student at its trained step count on the fixed inputs; None when that
    checkpoint can no longer be read (another one was loaded in its place)."""
    try:
        at = run.at_checkpoint(step, device)
    except ConfigError:  # every checkpoint up to ``step`` is gone or unreadable
        return None
    if at.step != step:
        return None
    t0 = time.perf_counter()
    noise, cond = inputs
    student = at.student()
    rng = torch.Generator(device=device).manual_seed(SEED)
    with torch.no_grad():
        x = chunked(lambda z, c: student.sample(at.generator, z.to(device), None if c is None else c.to(device),
                                                None, rng), noise, cond)
    metrics = {k: v for k, v in evaluator.metrics(x, cond).items() if isinstance(v, (int, float))}
    ev = run.cfg.eval
    return {"step": step, "protocol": name, "headline": evaluator.headline, "student_steps": len(student.ts),
            **metrics,
            "provenance": {"run_dir": str(run.path.resolve()), "checkpoint": f"checkpoints/step_{step:08d}",
                           "role": checkpoint.GENERATOR_ROLE, "num_samples": int(noise.shape[0]), "seed": SEED,
                           "evaluator": getattr(evaluator, "what", type(evaluator).__name__),
                           "eval": OmegaConf.to_container(ev, resolve=True),
                           "seconds": round(time.perf_counter() - t0, 2),
                           "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}}
