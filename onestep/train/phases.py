"""Where a training step's time goes: wall time per phase (data, critic update, generator update, teacher
forward passes, target/EMA update, logging, checkpoints, periodic evaluation), averaged over each log interval
and written to stats.jsonl as ``time/<phase>_ms`` per step.

On CUDA each phase records a pair of events and nothing waits for them until the log step reads them all
(one synchronisation per log interval, not per phase); on the CPU the phases are timed with perf_counter.
"teacher" is measured by forward hooks on the teacher's view, so it overlaps the critic and generator phases
that run it (the others do not overlap each other).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


#: the phases every stats line carries (0 when a phase did not occur in the interval: no checkpoint, no critic)
PHASES = ("data", "critic", "generator", "teacher", "targets", "log", "checkpoint", "eval")


class PhaseClock:
    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)  # seconds, CPU clock
        self.events: list[tuple[str, object, object]] = []  # (phase, start, end) CUDA events not read yet
        self.steps = 0
        self._open: list[tuple[str, object]] = []

    def start(self, name: str) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self._open.append((name, e))
        else:
            self._open.append((name, time.perf_counter()))

    def stop(self) -> None:
        name, begin = self._open.pop()
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((name, begin, end))
        else:
            self.totals[name] += time.perf_counter() - begin

    @contextmanager
    def __call__(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop()

    def watch(self, module: torch.nn.Module, name: str) -> None:
        """Time every forward pass of ``module`` as phase ``name``."""
        module.register_forward_pre_hook(lambda *_: self.start(name))
        module.register_forward_hook(lambda *_: self.stop())

    def step(self) -> None:
        self.steps += 1

    def read(self) -> dict[str, float]:
        """Milliseconds per step of each phase since the previous read (CUDA: waits for the recorded events)."""
        for name, begin, end in self.events:
            end.synchronize()
            self.totals[name] += begin.elapsed_time(end) / 1000
        self.events.clear()
        n = max(self.steps, 1)
        totals = {**dict.fromkeys(PHASES, 0.0), **self.totals}
        out = {f"time/{k}_ms": round(1000 * v / n, 3) for k, v in totals.items()}
        self.totals.clear()
        self.steps = 0
        return out
