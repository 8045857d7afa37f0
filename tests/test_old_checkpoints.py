"""A run folder written by an earlier version of the trainer still resumes, bit-identically.

tests/fixtures/gmm_dmd2_step4 was written by main at c0aef37 (before the trainer's redesign, issue 30) with
``train(compose(OLD_RUN), run_dir)``: 4 steps, one checkpoint kept (step 4), only the files resume reads
(config.yaml, teacher_net.safetensors, stats.jsonl, the checkpoint). Do not regenerate it with newer code: its
point is that it was not written by the code that resumes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import TINY, compose
from onestep import checkpoint
from onestep.train.trainer import train

FIXTURE = Path(__file__).parent / "fixtures" / "gmm_dmd2_step4"
#: the overrides the fixture was trained with, except trainer.steps (a change resuming allows)
OLD_RUN = [o for o in TINY if not o.startswith(("trainer.steps=", "trainer.checkpoint_every="))] + [
    "trainer.checkpoint_every=2", "trainer.log_every=1", "trainer.log_with=none", "trainer.keep_checkpoints=1"]


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def _last_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    last = checkpoint.list_checkpoints(run_dir)[-1]
    return {f.stem: load_file(str(f)) for f in sorted(last.glob("*.safetensors"))}


def test_a_checkpoint_from_before_the_redesign_resumes_bit_identically(tmp_path, capsys):
    resumed = tmp_path / "resumed"
    shutil.copytree(FIXTURE, resumed)
    old_lines = (FIXTURE / "stats.jsonl").read_text().splitlines()
    cfg = compose(OLD_RUN + ["trainer.steps=8"])

    train(cfg, resumed)
    assert "resuming from step 4" in capsys.readouterr().out
    assert checkpoint.list_checkpoints(resumed)[-1].name == "step_00000008"
    assert _steps(resumed) == list(range(1, 9))  # the old lines kept, one new line per step
    assert (resumed / "stats.jsonl").read_text().splitlines()[:4] == old_lines

    train(cfg, tmp_path / "straight")  # the same 8 steps uninterrupted, by today's code
    a, b = _last_weights(tmp_path / "straight"), _last_weights(resumed)
    assert a.keys() == b.keys() == {"generator", "generator_ema", "critic"}
    for net in a:
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k} differs from an uninterrupted run"
