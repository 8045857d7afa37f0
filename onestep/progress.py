"""Progress bars: smooth on a terminal, one refresh every 10 s when output goes to a log or CI."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(iterable=None, **kwargs):
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 10.0)
    return tqdm(iterable, **kwargs)
