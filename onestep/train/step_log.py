"""What a run shows and records per step, behind one call (``StepLog.step``): the tqdm bar with the losses and
it/s, its rate and ETA counted from the second step (the first allocates and warms up), the first-step notice,
a stats.jsonl line per log step and the tracker's copy of it (tracking.py).

Logged values stay on the device between log steps; a log step reads them all in one transfer and averages them
over the processes (data_parallel.py), so a step that logs nothing never waits for the device.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from onestep import progress
from onestep.train.phases import PhaseClock
from onestep.train.tracking import Tracker

#: a first step slower than this many seconds is explained on the console (allocation, warm-up, compilation)
SLOW_FIRST_STEP_S = 10


class StepLog:
    def __init__(self, acc, run_dir: Path, cfg, start: int, clock: PhaseClock, *, show: bool, optimizers: tuple,
                 mean: Callable[[dict[str, float]], dict[str, float]]):
        """A run continuing at step ``start``; ``show``: progress output on this process; ``optimizers``: the
        generator's and the critic's (or None), whose learning rates the tracker records; ``mean``: the average
        of a read dict over the processes (every rank calls ``step`` at the same steps)."""
        tc = cfg.trainer
        self.main, self.show, self.start, self.steps = acc.is_main_process, show, start, tc.steps
        self.clock, self.optimizers, self.mean = clock, optimizers, mean
        self.stats_file = Path(run_dir) / "stats.jsonl"
        self.track = Tracker(acc, run_dir, cfg, start)  # mirrors the JSONL lines and sample grids (tracking.py)
        self.bar = progress.bar(range(start, tc.steps), initial=start, total=tc.steps, desc="distill",
                                disable=not show)
        self.t0 = self.t_rate = time.perf_counter()  # the loop's start; the rate counts from t_rate

    def __iter__(self):
        return iter(self.bar)

    def step(self, done: int, logs: dict[str, torch.Tensor], *, read: bool, bad_steps: int) -> dict:
        """After step ``done``: on a log step (``read``) the values read and averaged over the processes (the
        returned dict: floats), the bar's postfix and a stats line with the phase times; else ``logs`` as they
        are (on the device)."""
        if done == self.start + 1:
            self._first_step_done()
        if not read:
            return logs
        logs, phases = self.mean(_read(logs)), self.clock.read()
        if self.main:
            rate = self._rate(done)
            self.bar.set_postfix({k.split("/")[0][0] + ":" + k.split("/")[1]: f"{v:.3g}" for k, v in logs.items()
                                  if k.endswith("loss")} | {"it/s": f"{rate:.1f}"}, refresh=False)
            with self.clock("log"):
                record = {"step": done, "it_per_s": rate, "bad_steps": bad_steps, **logs, **phases}
                append(self.stats_file, record)
                self.track.stats(record, *self.optimizers)
        return logs

    def close(self, trackers: bool = False) -> None:
        """Close the bar; ``trackers``: also the trackers (a run stopping early; a finished one closes them with
        its final evaluation)."""
        self.bar.close()
        if trackers:
            self.track.close()

    def _rate(self, done: int) -> float:
        """Steps per second since the first step (at the first step itself: its own rate)."""
        if done == self.start + 1:
            return 1 / (self.t_rate - self.t0)
        return (done - self.start - 1) / (time.perf_counter() - self.t_rate)

    def _first_step_done(self) -> None:
        self.t_rate = time.perf_counter()
        progress.restart_clock(self.bar)
        if self.show and self.t_rate - self.t0 > SLOW_FIRST_STEP_S:
            print(f"\nfirst step: {self.t_rate - self.t0:.0f} s (one-time allocation and warm-up); the rate counts "
                  "from the second", flush=True)


def _read(logs: dict) -> dict[str, float]:
    """The logged values as floats, read from the device in one transfer."""
    if not logs:
        return {}
    values = torch.stack([torch.as_tensor(v).detach().reshape(()).to(torch.float64) for v in logs.values()])
    return dict(zip(logs, values.tolist()))


def append(path: Path, record: dict) -> None:
    """One JSON line (stats.jsonl, evals.jsonl)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
