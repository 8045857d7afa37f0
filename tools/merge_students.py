"""Merge two students of one init by weight interpolation (Cideron et al. 2024's LERP; onestep/export/merge.py):

    python tools/merge_students.py quality=<run of diversity_weight=0> diversity=<run of diversity_weight>0> \
        weight=0.5 out=<new run folder>

then ``onestep eval run_dir=<out>`` (or sample / export) reads the merged student like any run.
"""

from __future__ import annotations

import sys

from onestep.errors import ConfigError
from onestep.export.merge import merge_runs

KEYS = ("quality", "diversity", "weight", "out")


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    bad = [a for a in argv if "=" not in a or a.split("=", 1)[0] not in KEYS]
    missing = [k for k in KEYS if k not in args]
    if bad or missing:
        print(f"usage: merge_students.py {' '.join(f'{k}=...' for k in KEYS)}"
              f"{f' (unknown: {bad})' if bad else ''}{f' (missing: {missing})' if missing else ''}", file=sys.stderr)
        return 2
    try:
        weight = float(args["weight"])
    except ValueError:
        print(f"merge.weight={args['weight']!r} is not a number", file=sys.stderr)
        return 2
    try:
        ckpt = merge_runs(args["quality"], args["diversity"], weight, args["out"])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged student (lambda = {weight}): {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
