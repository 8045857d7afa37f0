"""Progress bars: smooth on a terminal, one refresh every 10 s when output goes to a log or CI."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from tqdm.auto import tqdm


def bar(iterable=None, **kwargs):
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 10.0)
    return tqdm(iterable, **kwargs)


def restart_clock(bar) -> None:
    """Make the rate and ETA count from now (after a slow first step: allocation, warm-up, compilation), as if
    the bar had started at its current position."""
    if getattr(bar, "disable", True):
        return
    from tqdm.std import EMA

    now = bar._time()
    bar.initial = bar.last_print_n = bar.n
    bar.start_t = bar.last_print_t = now
    bar._ema_dn, bar._ema_dt, bar._ema_miniters = EMA(bar.smoothing), EMA(bar.smoothing), EMA(bar.smoothing)


@contextmanager
def phase(what: str, show: bool = True, quiet_below: float = 2.0):
    """Say what a possibly slow part of the start is doing ("setup: <what> ..."), and how long it took when
    that was at least ``quiet_below`` seconds."""
    t = time.perf_counter()
    if show:
        print(f"setup: {what} ...", flush=True)
    yield
    dt = time.perf_counter() - t
    if show and dt >= quiet_below:
        print(f"setup: {what}: {dt:.1f} s", flush=True)
