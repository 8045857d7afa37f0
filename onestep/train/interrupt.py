"""Ctrl-C and SIGTERM (a cluster's preemption or time limit) during training: finish the current step, write a
checkpoint at it (atomically, every rank taking part), and stop with one line saying how to resume.

The signal only sets a flag; the ranks OR it once per step through a CPU (gloo) all-reduce in the numerics
guard (guard.py, ``end_step``), so every process stops after the same step. A second Ctrl-C while the checkpoint is written
interrupts at once (the previous checkpoint is intact: checkpoint.py writes atomically). Handlers are installed
only where the signal still has Python's default behaviour, so a launcher's own handler (submitit's) is kept.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint at ``step``."""

    def __init__(self, step: int, run_dir, signum: int):
        self.step, self.run_dir, self.signum = step, run_dir, signum
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped after step {step}; checkpoint {run_dir}/checkpoints/step_{step:08d} "
                         "written; rerun the same command to resume from it")


class StopOnSignal:
    """Context manager; ``requested()`` is true once SIGINT or SIGTERM arrived inside it."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                current = signal.getsignal(s)
                if current in (signal.SIG_DFL, signal.default_int_handler):
                    self._previous[s] = current
                    signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
