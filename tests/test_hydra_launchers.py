"""Hydra launchers: a 2-job ``-m`` sweep through hydra-submitit-launcher's local executor (the SLURM executor's
stand-in on a machine without SLURM) trains both jobs into the run folders the same overrides get without ``-m``,
so either command resumes the other's run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

SMALL = ["experiment=gmm_dmd2", "teacher.net_steps=40", "teacher.net_hidden=32", "trainer.steps=4",
         "trainer.checkpoint_every=4", "trainer.progress=false", "objective.regression_pairs=64",
         "objective.regression_steps=4", "eval.num_samples=256", "eval.teacher_steps=[2]", "eval.plot=false",
         "trainer.generator_optim.lr=5e-4"]


def _cli(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "onestep.cli", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_submitit_local_multirun_lands_in_the_usual_run_folders(tmp_path):
    root = tmp_path / "runs"
    r = _cli(["-m", "hydra/launcher=submitit_local", *SMALL, "trainer.batch_size=32,64", f"out_root={root}"],
             tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted((root / "gmm_dmd2").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert (run / "checkpoints" / "step_00000004").is_dir() and (run / "metrics.json").exists()
    batch = {run: OmegaConf.load(run / "config.yaml").trainer.batch_size for run in runs}
    assert sorted(batch.values()) == [32, 64]

    # without -m, the same overrides (typed as usual: false, 5e-4) name the same folder: the run resumes at its end
    r = _cli([*SMALL, "trainer.batch_size=32", f"out_root={root}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted((root / "gmm_dmd2").iterdir()) == runs
    (run,) = [run for run in runs if batch[run] == 32]
    assert json.loads((run / "metrics.json").read_text())["seconds"]["resumed_at_step"] == 4
