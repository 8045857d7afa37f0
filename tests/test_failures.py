"""Failures: kill -9 and the same command again is bit-identical to an uninterrupted run; non-finite losses or
gradients skip the step on every rank, are counted, and stop the run with the last good checkpoint intact;
state.pt loads without pickle; checkpoint folders none of which loads stop the run instead of restarting it."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, Interrupt, compose
from onestep import checkpoint
from onestep.errors import ConfigError
from onestep.objectives.dmd2 import DMD2
from onestep.train.guard import NonFiniteLoss, any_rank
from onestep.train.trainer import train


def _weights(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f.stem: load_file(str(f)) for f in sorted(ckpt.glob("*.safetensors"))}


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for net in a:
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k} differs"


def _stats(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "stats.jsonl").read_text().splitlines()]


# --- kill -9 ----------------------------------------------------------------------------------------------------

#: 60 steps, a checkpoint every 12, a stats line per step: the kill lands at a random step between two checkpoints
KILLED = {
    "dmd2": [a for a in TINY if not a.startswith(("trainer.steps", "trainer.checkpoint_every"))],
    "cd_ema_target": ["experiment=gmm_cd", "objective.target_ema=0.9", "teacher.net_steps=40", "teacher.net_hidden=32",
                      "trainer.batch_size=64", "trainer.progress=false", "eval.num_samples=256",
                      "eval.teacher_steps=[2]", "eval.plot=false"],
}
STEPS, EVERY = 60, 12


def _logged_step(run: Path) -> int:
    """The last step in stats.jsonl (complete lines only: the trainer may be writing one)."""
    text = (run / "stats.jsonl").read_text() if (run / "stats.jsonl").exists() else ""
    lines = text[:text.rfind("\n") + 1].splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def _default_signals() -> None:
    """In the child: Ctrl-C and SIGTERM as a terminal gives them. A pytest started in the background of a
    non-interactive shell inherits SIGINT ignored, and the trainer rightly leaves an ignored signal alone."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _cli(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "onestep.cli", "train", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_default_signals)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(KILLED))
def test_kill_9_between_checkpoints_then_rerun_is_bit_identical(tmp_path, name):
    args = KILLED[name] + [f"trainer.steps={STEPS}", f"trainer.checkpoint_every={EVERY}", "trainer.log_every=1"]
    train(compose(args), tmp_path / "straight")

    run = tmp_path / "killed"
    command = args + [f"run_dir={run}", f"out_root={tmp_path}"]
    target = random.choice([s for s in range(EVERY + 1, STEPS - EVERY) if s % EVERY])  # after >= 1 checkpoint
    proc = _cli(command, tmp_path)
    while _logged_step(run) < target:
        assert proc.poll() is None, f"exited at step {_logged_step(run)}: {proc.stderr.read()[-2000:]}"
        time.sleep(0.002)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, "the run finished before the kill"
    proc.stderr.close()
    left = checkpoint.list_checkpoints(run)[-1].name
    assert EVERY <= int(left.removeprefix("step_")) < STEPS, f"killed at step {target}, newest checkpoint {left}"

    rerun = _cli(command, tmp_path)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-2000:]
    straight, resumed = (checkpoint.list_checkpoints(r)[-1] for r in (tmp_path / "straight", run))
    assert straight.name == resumed.name == f"step_{STEPS:08d}"
    nets = {"dmd2": {"generator", "generator_ema", "critic"}, "cd_ema_target": {"generator", "generator_ema", "target"}}
    a, b = _weights(straight), _weights(resumed)
    assert set(a) == nets[name], set(a)
    _assert_equal(a, b)
    # the steps redone after the kill replace their first log lines: one line per step, the same losses
    logs = _stats(run)
    assert [s["step"] for s in logs] == list(range(1, STEPS + 1)), f"killed at step {target}"
    assert [s["gen/loss"] for s in logs] == [s["gen/loss"] for s in _stats(tmp_path / "straight")]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_checkpoints_the_current_step_and_the_rerun_resumes_it(tmp_path, sig):
    """Ctrl-C (SIGINT) or SIGTERM between checkpoints: the step in progress finishes, a checkpoint at that step is
    written, the CLI exits 128 + signal with one line saying how to resume; the same command again prints where it
    resumes and ends bit-identical to an uninterrupted run, with one log line per step."""
    args = KILLED["dmd2"] + [f"trainer.steps={STEPS}", f"trainer.checkpoint_every={EVERY}", "trainer.log_every=1"]
    train(compose(args), tmp_path / "straight")

    run = tmp_path / "stopped"
    command = args + [f"run_dir={run}", f"out_root={tmp_path}"]
    # a step at least 6 before the next checkpoint: the process may run a few more before the signal lands
    target = random.choice([s for s in range(EVERY + 1, STEPS - EVERY) if 0 < s % EVERY <= EVERY // 2])
    proc = _cli(command, tmp_path)
    while _logged_step(run) < target:
        assert proc.poll() is None, f"exited at step {_logged_step(run)}: {proc.stderr.read()[-2000:]}"
        time.sleep(0.002)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    stopped = int(checkpoint.list_checkpoints(run)[-1].name.removeprefix("step_"))
    assert target <= stopped < STEPS and stopped % EVERY, f"signal at step {target}, newest checkpoint {stopped}"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"onestep: {sig.name}: stopped after step {stopped}; checkpoint ") and \
        "rerun the same command to resume" in last, err[-2000:]
    assert "Traceback" not in err

    rerun = subprocess.run([sys.executable, "-m", "onestep.cli", "train", *command], cwd=tmp_path, text=True,
                           capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming from step {stopped} (checkpoint {run / 'checkpoints' / f'step_{stopped:08d}'})" in rerun.stdout
    _assert_equal(_weights(checkpoint.list_checkpoints(tmp_path / "straight")[-1]),
                  _weights(checkpoint.list_checkpoints(run)[-1]))
    assert [s["step"] for s in _stats(run)] == list(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A TINY run (a line per step) stopped after step 7 (checkpoint at 4), with half a line written at the
    kill, then run again to its end."""
    run = tmp_path_factory.mktemp("resumed")
    cfg = compose(TINY + ["trainer.log_every=1"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (a module fixture runs outside conftest's per-test thread setting)

    def stop(step, logs):
        if step == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, run, callbacks=(stop,))
    with open(run / "stats.jsonl", "a") as f:
        f.write('{"step": 8, "gen/lo')
    train(cfg, run)
    torch.set_num_threads(threads)
    return run


def test_resume_cuts_the_logs_back_to_its_checkpoint(resumed_run):
    assert [s["step"] for s in _stats(resumed_run)] == list(range(1, 13))


# --- checkpoint loading ---------------------------------------------------------------------------------------

def test_state_pt_is_plain_data(resumed_run):
    state = torch.load(checkpoint.list_checkpoints(resumed_run)[-1] / "state.pt", weights_only=True)
    assert state["step"] == 12 and state["bad_steps"] == 0
    assert "rng" not in state  # every step reseeds from (seed, step): an RNG state would never be restored
    assert state["opt_generator"]["state"] and state["opt_critic"]["state"]


class _RunsCode:
    """Unpickling this runs code (touches ``marker``)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_state_pt_that_needs_pickle_is_not_loaded(tmp_path):
    net = torch.nn.Linear(3, 2)
    marker = tmp_path / "code_ran"
    checkpoint.save(tmp_path, 1, {"g": net}, {"step": 1}, keep=3)
    checkpoint.save(tmp_path, 2, {"g": net}, {"step": 2, "payload": _RunsCode(marker)}, keep=3)
    with pytest.warns(UserWarning, match="step_00000002 is unreadable"):
        state = checkpoint.load_latest(tmp_path, {"g": torch.nn.Linear(3, 2)})
    assert state["step"] == 1 and not marker.exists()


def test_no_readable_checkpoint_is_an_error_not_a_restart(tmp_path):
    run = tmp_path / "run"
    for step in (4, 8):
        bad = run / "checkpoints" / f"step_{step:08d}"
        bad.mkdir(parents=True)
        (bad / "generator.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"), pytest.raises(ConfigError) as e:
        train(compose(TINY), run)
    msg = str(e.value)
    assert "\n" not in msg and str(run / "checkpoints") in msg and "trainer.resume=false" in msg and "delete" in msg
    assert not (run / "stats.jsonl").exists()

    train(compose(TINY + ["trainer.resume=false"]), run)  # starts fresh; the broken folders are kept aside
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_00000008", "step_00000012"]
    aside = list(run.glob("discarded-*/checkpoints/step_*"))
    assert sorted(p.name for p in aside) == ["step_00000004", "step_00000008"]
    assert [s["step"] for s in _stats(run)] == [12]


# --- NaN / Inf guard --------------------------------------------------------------------------------------------

class _NaNGrad(torch.autograd.Function):
    """0 in the forward pass, NaN gradients in the backward pass: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum() * 0

    @staticmethod
    def backward(ctx, g):
        return torch.full(ctx.shape, math.nan)


def _poison_generator(monkeypatch, steps, kind):
    """Make DMD2's generator loss (kind=loss) or its gradients (kind=grad) non-finite at the given steps."""
    clean = DMD2.generator_loss

    def poisoned(self, nets, batch, step):
        out = clean(self, nets, batch, step)
        if step in steps:
            if kind == "loss":
                out["loss"] = out["loss"] * math.nan
            else:
                out["loss"] = out["loss"] + _NaNGrad.apply(next(nets.generator.parameters()))
        return out

    monkeypatch.setattr(DMD2, "generator_loss", poisoned)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, kind):
    """Non-finite from step 6 on, max_bad_steps=1: step 6 steps on zeroed gradients, step 7 stops the run;
    checkpoint 4 stays."""
    _poison_generator(monkeypatch, range(5, 100), kind)  # (0-based steps: done = step + 1)
    with pytest.raises(NonFiniteLoss, match="generator loss or gradients were non-finite in 2 consecutive steps"):
        train(compose(TINY + ["trainer.max_bad_steps=1", "trainer.log_every=1"]), tmp_path)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000004"]
    weights = _weights(checkpoint.list_checkpoints(tmp_path)[-1])
    assert all(torch.isfinite(t).all() for w in weights.values() for t in w.values())
    assert [(s["step"], s["bad_steps"]) for s in _stats(tmp_path)][-3:] == [(4, 0), (5, 0), (6, 1)]


def test_the_stop_rule_acts_at_the_next_log_or_checkpoint_step(tmp_path, monkeypatch):
    """The guard reads its device counters only where the trainer reads anything (log and checkpoint steps):
    non-finite from step 6 on, max_bad_steps=1, logs every 5 and checkpoints every 4: steps 6 and 7 step on
    zeroed gradients, step 8's check stops the run before checkpoint 8 is written; checkpoint 4 stays."""
    _poison_generator(monkeypatch, range(5, 100), "grad")
    with pytest.raises(NonFiniteLoss, match="non-finite in 3 consecutive steps"):
        train(compose(TINY + ["trainer.max_bad_steps=1", "trainer.log_every=5"]), tmp_path)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000004"]
    assert [(s["step"], s["bad_steps"]) for s in _stats(tmp_path)] == [(5, 0)]


def test_the_training_loop_reads_the_device_only_at_log_and_checkpoint_steps(tmp_path, monkeypatch):
    """No host synchronisation per step: between log / checkpoint steps, onestep's own code never turns a tensor
    into a Python value (losses stay on the device; the NaN guard masks gradients on the device)."""
    import inspect

    reads: dict[int, list[str]] = {}
    done: list[int] = []
    package = str(Path(checkpoint.__file__).parent)
    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **k):
            caller = inspect.currentframe().f_back
            if done and caller.f_code.co_filename.startswith(package):
                reads.setdefault(len(done) + 1, []).append(f"{_name} {caller.f_code.co_filename}:{caller.f_lineno}")
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    train(compose(TINY + ["trainer.log_every=6", "trainer.checkpoint_every=12"]), tmp_path,
          callbacks=(lambda step, logs: done.append(step),))
    assert done == list(range(1, 13))
    assert set(reads) <= {6, 12, 13}, {k: v for k, v in reads.items() if k not in (6, 12, 13)}  # 13: final eval


def test_transient_non_finite_gradients_are_skipped_and_counted(tmp_path, monkeypatch):
    _poison_generator(monkeypatch, {3, 4, 8}, "grad")
    out = train(compose(TINY + ["trainer.max_bad_steps=2", "trainer.log_every=1", "trainer.grad_clip=0"]), tmp_path)
    assert [s["bad_steps"] for s in _stats(tmp_path)] == [0, 0, 0, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    gen = out["networks"].roles["generator"].module
    assert all(torch.isfinite(p).all() for p in gen.parameters())


def _flag_worker(rank, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        out = [not bool(any_rank(torch.tensor(False))),
               not bool(any_rank(torch.tensor(rank == 1))),  # NaN on rank 1 only
               not bool(any_rank(torch.tensor(rank == 0)))]
        Path(results, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_the_skip_decision_is_the_same_on_every_rank(tmp_path):
    """Two gloo processes: a non-finite update on one rank is skipped on both."""
    torch.multiprocessing.spawn(_flag_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [True, False, False]
    assert bool(any_rank(torch.tensor(True))) is True  # one process: its own flag


# --- soak tool ------------------------------------------------------------------------------------------------

def test_soak_tool_writes_its_report(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("soak", Path(__file__).parents[1] / "tools" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    s = soak.main(["steps=40", "checkpoint_every=10", f"out={tmp_path}", f"root={tmp_path / 'run'}",
                   "teacher.net_steps=20", "eval.num_samples=256"])
    md = (tmp_path / "soak.md").read_text()
    assert "`OMP_NUM_THREADS=1 python tools/soak.py steps=40" in md and (tmp_path / "soak.png").stat().st_size > 1000
    assert s["disk_max"] <= s["disk_bound"] and s["save_pct"] > 0 and s["resume_ms"] > 0
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run")] == ["step_00000040", "step_00000050"]
