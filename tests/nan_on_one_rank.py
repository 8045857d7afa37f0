"""Test-only launcher: `onestep <command> ...` with DMD2's generator loss made non-finite on one rank.

    ONESTEP_TEST_NAN_RANK=1 ONESTEP_TEST_NAN_STEPS=4 torchrun --nproc_per_node 2 tests/nan_on_one_rank.py train ...

ONESTEP_TEST_NAN_STEPS: comma-separated 1-based steps (``done``), or ``N-`` for every step from N on. The loss
gets a NaN constant added: its value is non-finite but its gradients stay finite, so only the all-reduced skip
flag (onestep/train/guard.py) can make the other ranks skip the update too (NaN gradients would reach every
rank through the gradient all-reduce anyway). No production code carries this hook.
"""

from __future__ import annotations

import math
import os

import torch

from onestep.objectives.dmd2 import DMD2


def steps_from(spec: str):
    if spec.endswith("-"):
        first = int(spec[:-1])
        return lambda done: done >= first
    chosen = {int(s) for s in spec.split(",") if s}
    return lambda done: done in chosen


def poison(rank: int, spec: str) -> None:
    """Patch DMD2.generator_loss: non-finite loss (finite gradients) at the chosen steps on ``rank``."""
    clean, hit = DMD2.generator_loss, steps_from(spec)
    mine = int(os.environ.get("RANK", "0")) == rank

    def poisoned(self, nets, batch, step):
        out = clean(self, nets, batch, step)
        if mine and hit(step + 1):
            out["loss"] = out["loss"] + torch.tensor(math.nan, device=out["loss"].device)
        return out

    DMD2.generator_loss = poisoned


if __name__ == "__main__":
    poison(int(os.environ["ONESTEP_TEST_NAN_RANK"]), os.environ["ONESTEP_TEST_NAN_STEPS"])
    from onestep.cli import main

    main()
