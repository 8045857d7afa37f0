"""Test-only launcher: `onestep <command> ...` that records, at the start of every micro-batch's loss, how many
gradient collectives this rank has issued so far.

    ONESTEP_TEST_COUNTS=<folder> torchrun --nproc_per_node 2 tests/count_collectives.py train ...

Counted: ``torch.distributed.all_reduce`` (the replicated gradients' reduction, Networks.reduce_gradients, and the
guard's flags) and ``torch.distributed.reduce_scatter_single`` (FSDP2's gradient reduce-scatter, looked up on the
module at each call). Each rank writes <folder>/rank<r>.json: a list of [micro-batch index k, all-reduces,
reduce-scatters], one entry per micro-batch in order. No production code carries this hook.
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

import torch.distributed as dist

from onestep.train.data_parallel import DataParallel

COUNTED = ("all_reduce", "reduce_scatter_single")


def count(folder: Path) -> list[list[int]]:
    """Patch the counted collectives and DataParallel.draws; the returned list fills as training runs and is written
    to ``folder`` when the process exits."""
    calls = dict.fromkeys(COUNTED, 0)
    for name in COUNTED:
        def counted(*args, _name=name, _fn=getattr(dist, name), **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        setattr(dist, name, counted)
    record: list[list[int]] = []
    draws = DataParallel.draws

    def recorded(self, k: int = 0):
        record.append([k, *calls.values()])
        return draws(self, k)

    DataParallel.draws = recorded
    atexit.register(lambda: (folder / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record)))
    return record


if __name__ == "__main__":
    count(Path(os.environ["ONESTEP_TEST_COUNTS"]))
    from onestep.cli import main

    main()
