"""The CLI explains itself: `onestep --help` lists commands and experiments, `onestep train experiment=X --help`
the keys that run reads with their doc comments; a key no code reads (a typo, or +key=...) is a one-line error
with "did you mean"; libraries' noise stays out of a run's output; the ETA ignores a slow first step."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from onestep import progress
from onestep.help import did_you_mean, experiments

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "experiment").glob("*.yaml"))


def _onestep(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "onestep.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), timeout=300)


def test_help_lists_the_commands_and_every_experiment_with_one_line():
    r = _onestep("--help")
    assert r.returncode == 0, r.stderr
    assert "Powered by Hydra" not in r.stdout and "== Flags ==" not in r.stdout  # not Hydra's help
    for command in ("train", "bench", "sample", "export", "runs"):
        assert f"\n  {command} " in r.stdout
    lines = r.stdout.splitlines()
    for name in EXPERIMENTS:
        (line,) = [ln for ln in lines if ln.startswith(f"  {name} ")]
        assert len(line.split(name, 1)[1].strip()) > 20, line  # its own description
    assert experiments()["digits_t2i_lcm_lora"].startswith("Latent consistency distillation with a LoRA student "
                                                           "(LCM-LoRA, Luo et al. 2023)")
    assert _onestep().returncode == 2  # no command: the same overview, as an error


def _section(text: str, name: str) -> str:
    part = text.split(f"\n{name}:", 1)[1]
    return part.split("\n\n", 1)[0]


def test_train_help_shows_the_keys_of_the_chosen_experiment_with_their_comments():
    digits = _onestep("train", "experiment=digits_dmd2", "--help")
    assert digits.returncode == 0, digits.stderr
    assert digits.stdout.startswith("onestep train experiment=digits_dmd2: DMD2")
    teacher, trainer = _section(digits.stdout, "teacher"), _section(digits.stdout, "trainer")
    assert "  kind = digits" in teacher and "  path = None" in teacher
    for key in ("schedule", "mixture", "net_hidden", "negative_prompt"):  # other teachers' keys
        assert f"  {key} =" not in teacher
    assert "  batch_size = 64" in trainer  # the experiment's value, not the schema default
    assert "# dtype of the frozen networks" in trainer
    assert "bench" not in digits.stdout.split("\n\n", 1)[1].split("top level")[0]

    gmm = _onestep("train", "experiment=gmm_dmd2", "--help").stdout
    assert "  mixture = ring" in _section(gmm, "teacher") and "  path =" not in _section(gmm, "teacher")
    assert "features" not in _section(gmm, "eval")
    assert "# critic (fake-score) updates per generator" in _section(gmm, "objective")  # the base class's docs too
    sd = _onestep("train", "experiment=sd15_dmd2", "--help").stdout
    assert "  negative_prompt = None" in _section(sd, "teacher") and "\ncritic:" in sd
    assert "\ncritic:" not in _onestep("train", "experiment=gmm_scd", "--help").stdout  # sCD trains no critic
    sample = _onestep("sample", "--help")
    assert sample.returncode == 0 and "  run_dir = None" in sample.stdout and "# student steps" in sample.stdout


@pytest.mark.parametrize("args, words", [
    (["trainer.batchsize=8"], "unknown config key 'trainer.batchsize' (did you mean trainer.batch_size?)"),
    (["+objective.lr=1e-3"], "config key 'objective.lr' is not read by any code"),
    (["experiment=gmm_dmd2", "trainer.generator_optim.lrr=1"], "did you mean trainer.generator_optim.lr"),
    (["experiment=gmm_dmd2", "+trainer.warmup=100"], "config key 'trainer.warmup' is not read by any code"),
])
def test_a_key_no_code_reads_is_one_line_with_a_suggestion(tmp_path, args, words):
    r = _onestep("train", *args, f"out_root={tmp_path}/runs", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    assert not any((tmp_path / "runs").rglob("*.yaml"))  # nothing created
    if "objective.lr" in words:
        assert "trainer.generator_optim.lr" in r.stderr  # where the real key is


def test_did_you_mean_prefers_the_same_last_part():
    keys = ["trainer.generator_optim.lr", "trainer.critic_optim.lr", "objective.ttur", "objective.t_lo"]
    assert did_you_mean("objective.lr", keys) == " (did you mean trainer.generator_optim.lr or trainer.critic_optim.lr?)"
    assert did_you_mean("zzz.qqq", keys) == ""
    assert "train" in _onestep("trian").stderr


@pytest.mark.slow
def test_a_run_prints_no_library_noise(tmp_path):
    """A fresh matplotlib config folder (its font cache is built: an INFO line under Hydra's logging) and the
    first torch.func.jvp (torch scripts its JVP decompositions with the deprecated torch.jit.script): neither
    reaches the output of a run."""
    r = _onestep("train", "experiment=gmm_scd", "trainer.steps=2", "teacher.net_steps=20", "eval.num_samples=64",
                 "eval.teacher_steps=[2]", f"out_root={tmp_path}", cwd=tmp_path,
                 env={"MPLCONFIGDIR": str(tmp_path / "mpl")})
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert (tmp_path / "mpl").is_dir()  # matplotlib did start from nothing
    assert "fontManager" not in out and "font cache" not in out and "Warning" not in out, out[-2000:]


def test_the_eta_counts_from_the_second_step():
    """A first step of 100 s and then 1 s per step: after progress.restart_clock the bar's rate is 1 it/s and
    its remaining time 8 s, not the 10-hour ETA of a rate that includes the warm-up."""
    clock = [0.0]
    bar = progress.bar(range(10), total=10, file=io.StringIO(), mininterval=0, smoothing=0)
    bar._time = lambda: clock[0]
    bar.start_t = bar.last_print_t = 0.0
    it = iter(bar)
    next(it)
    clock[0] = 100.0
    next(it)  # step 1 done
    progress.restart_clock(bar)
    for _ in range(2):
        clock[0] += 1.0
        next(it)
    d = bar.format_dict
    rate = (d["n"] - d["initial"]) / d["elapsed"]
    assert rate == pytest.approx(1.0)
    assert "00:07" in bar.__str__() or "00:08" in bar.__str__(), bar.__str__()
    bar.close()
