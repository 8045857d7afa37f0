"""Data parallelism on CPU (gloo), launched the two ways README documents (torchrun, accelerate launch): 2
processes with the same global batch give the losses and weights of 1 process after k steps (fp32 tolerance)
for dmd2, sid, fdistill (time-bin statistics all-reduced) and scd; only rank 0 writes the run folder's logs;
files derived once (the GMM teacher net, DMD's regression pairs) are built once. FSDP2 (trainer.fsdp=true, or
accelerate's FSDP config) reproduces 1 process too and resumes to and from it. SameDraws is also checked exactly
in one process: the ranks' draws, put together, are the 1-process draws."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose
from onestep import checkpoint
from onestep.train.data_parallel import SameDraws

STEPS = 6
ACCELERATE_FSDP = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yml"
COMMON = ["teacher.net_steps=40", "teacher.net_hidden=32", f"trainer.steps={STEPS}", "trainer.batch_size=64",
          "trainer.checkpoint_every=3", "trainer.log_every=1", "trainer.progress=false", "eval.num_samples=256",
          "eval.teacher_steps=[2]", "eval.plot=false"]
#: objective -> (launcher, overrides); {tmp} is the test's folder
CASES = {
    "dmd2": ("accelerate", ["experiment=gmm_dmd2", "objective.regression_pairs=64", "objective.regression_steps=4",
                            "objective.pairs_file={tmp}/pairs.safetensors"]),
    "sid": ("torchrun", ["experiment=gmm_sid"]),
    "fdistill": ("accelerate", ["experiment=gmm_fdistill"]),
    "scd": ("torchrun", ["experiment=gmm_scd"]),
}


#: with `pytest -n 2 --dist loadgroup` (README's test command) every test here runs on one xdist worker, one after
#: another: two multi-process launches side by side once aborted a gloo rank ("terminate called without an active
#: exception") on the 2-core CI machine
pytestmark = pytest.mark.xdist_group("distributed")

def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(launcher: str, args: list[str], cwd: Path, nproc: int = 2, config: Path | None = None):
    """`torchrun --nproc_per_node N -m onestep.cli train ...` or `accelerate launch --multi_gpu --num_processes N
    -m onestep.cli train ...` (on a CPU-only machine both start N gloo processes), one thread per process;
    ``config``: `accelerate launch --config_file <config> --num_processes N ...`."""
    port = _free_port()
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]
    elif config is not None:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
               str(nproc), "--main_process_port", port]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--main_process_port", port, "--mixed_precision", "no",
               "--dynamo_backend", "no"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd + ["-m", "onestep.cli", "train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _stats(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "stats.jsonl").read_text().splitlines()]


def _final(run: Path, steps: int = STEPS) -> dict[str, dict[str, torch.Tensor]]:
    last = checkpoint.list_checkpoints(run)[-1]
    assert last.name == f"step_{steps:08d}"
    # (an FSDP run writes dcp checkpoints: trainer.checkpoint_format=auto)
    return {role: checkpoint.role_weights(last, role) for role in checkpoint.roles(last)}


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(CASES))
def test_two_processes_reproduce_one(tmp_path, objective):
    from onestep.train.trainer import train

    launcher, own = CASES[objective]
    args = COMMON + [a.format(tmp=tmp_path) for a in own]
    r = launch(launcher, args + [f"out_root={tmp_path}/two"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (two,) = (tmp_path / "two").glob("*/*")
    one = tmp_path / "one"
    train(compose(args), one)

    # rank 0 alone writes: one stats line per step, one results table; derived files built once
    a, b = _stats(one), _stats(two)
    assert [s["step"] for s in b] == list(range(1, STEPS + 1))
    assert r.stdout.count("run folder:") == 1 and (two / "config.yaml").exists()
    assert r.stdout.count("teacher net:") == 1
    if objective == "dmd2":
        assert r.stdout.count("regression pairs:") == 1
    _same_training(one, two, STEPS)


def _same_training(one: Path, two: Path, steps: int) -> None:
    """Every logged mean (losses, their terms) and every final weight of run ``two`` equal run ``one``'s; a
    maximum over the batch is logged as the ranks' mean of maxima, and wall times differ: both are left out."""
    a, b = _stats(one), _stats(two)
    assert len(a) == len(b) == steps
    for sa, sb in zip(a, b):  # (the keys of each line: a staged objective logs other terms in each stage)
        keys = [k for k in sa if k != "it_per_s" and not k.endswith("_max") and not k.startswith("time/")]
        assert "gen/loss" in keys
        for k in keys:
            assert sb[k] == pytest.approx(sa[k], rel=1e-4, abs=1e-6), f"step {sa['step']} {k}"
    wa, wb = _final(one, steps), _final(two, steps)
    assert wa.keys() == wb.keys()
    for net in wa:
        for k in wa[net]:
            torch.testing.assert_close(wb[net][k], wa[net][k], rtol=1e-4, atol=1e-5, msg=f"{net}.{k}")


def test_same_draws_put_together_are_the_one_process_draws():
    """Each rank draws under SameDraws(n, world=2, rank) from the same seed; the ranks' rows, put back in place
    (k blocks of n rows for a k n draw), equal one process drawing for 2 n rows."""
    n, world = 3, 2

    def draws(rows: int) -> list[torch.Tensor]:
        x = torch.zeros(rows, 2)
        return [torch.randn(rows, 4), torch.rand(rows, dtype=torch.float64), torch.randn((rows,)),
                torch.randint(0, 7, (rows,)), torch.randint(7, size=(rows, 2)), torch.randn_like(x),
                torch.empty_like(x).normal_(), torch.multinomial(torch.ones(5), rows, replacement=True),
                torch.rand(2 * rows, 3),  # two batches concatenated (real and fake samples)
                torch.randint(0, 5, ()), torch.rand(5)]  # not per-sample: the same on every rank

    torch.manual_seed(0)
    whole = draws(n * world)
    parts = []
    for rank in range(world):
        torch.manual_seed(0)
        with SameDraws(n, world, rank):
            parts.append(draws(n))
    for i, w in enumerate(whole):
        if w.ndim == 0 or w.shape[0] % n:
            assert all(torch.equal(p[i], w) for p in parts), i
            continue
        k = w.shape[0] // (n * world)
        glued = torch.stack([p[i].view(k, n, *w.shape[1:]) for p in parts], 1).reshape(w.shape)
        assert torch.equal(glued, w), i


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_either_way(tmp_path):
    """Generator and critic sharded with FSDP2 over 2 gloo processes (torchrun + trainer.fsdp=true, then accelerate
    launch with configs/accelerate/fsdp.yml). f-distill (a critic, a GAN head on its features, frozen passes through
    it) trained 0 -> 3 sharded, 3 -> 6 in one process from that checkpoint, 6 -> 9 sharded again from the
    one-process checkpoint equals 9 steps of one process."""
    from onestep.train.trainer import train

    args = [a for a in COMMON if not a.startswith("trainer.steps")] + ["experiment=gmm_fdistill"]
    run, one = tmp_path / "chain", tmp_path / "one"
    r = launch("torchrun", args + ["trainer.steps=3", "trainer.fsdp=true", f"run_dir={run}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "generator: full copy FSDP2-sharded over 2 processes" in r.stdout
    assert "critic: full copy FSDP2-sharded over 2 processes" in r.stdout
    train(compose(args + ["trainer.steps=6"]), run)
    r = launch("accelerate", args + ["trainer.steps=9", f"run_dir={run}"], tmp_path, config=ACCELERATE_FSDP)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "generator: full copy FSDP2-sharded over 2 processes" in r.stdout
    train(compose(args + ["trainer.steps=9"]), one)

    a, b = _stats(one), _stats(run)
    assert [s["step"] for s in b] == list(range(1, 10))
    for sa, sb in zip(a, b):
        for k in ("critic/loss", "gen/loss", "gen/h_mean"):
            assert sb[k] == pytest.approx(sa[k], rel=1e-4, abs=1e-6), f"step {sa['step']} {k}"
    wa, wb = _final(one, 9), _final(run, 9)
    assert wa.keys() == wb.keys() and {"generator", "generator_ema", "critic"} < wa.keys()  # (+ the GAN head)
    for net in wa:
        for k in wa[net]:
            torch.testing.assert_close(wb[net][k], wa[net][k], rtol=1e-4, atol=1e-5, msg=f"{net}.{k}")


@pytest.mark.slow
def test_fsdp_shards_a_smaller_student_and_matches_one_process(tmp_path):
    """generator.arch: a one-block 16-wide student of the 32-wide teacher MLP, trained by SlimFlow (stage switch at
    step 3: the frozen 2-rectified flow is gathered from the sharded generator) with FSDP2 over 2 gloo processes:
    every process builds the same student (its fresh tensors come from the seed), and losses and weights equal one
    process's."""
    from onestep.train.trainer import train

    args = COMMON + ["experiment=gmm_slimflow", "objective.num_pairs=256", "objective.pair_steps=4",
                     "objective.reflow_steps=3", "objective.anneal_steps=2", "generator.arch='hidden=16,depth=1'"]
    r = launch("torchrun", args + ["trainer.fsdp=true", f"run_dir={tmp_path}/two"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "generator: full copy FSDP2-sharded over 2 processes" in r.stdout
    assert "generator.arch 'hidden=16,depth=1': 0.002M params" in r.stdout
    train(compose(args), tmp_path / "one")
    _same_training(tmp_path / "one", tmp_path / "two", STEPS)
    assert _final(tmp_path / "one")["generator"]["blocks.0.1.weight"].shape == (16, 16)


TEACHER_SHARDED = "networks: teacher float32 FSDP2-sharded over 2 processes"


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dmd2", "scd"])
def test_fsdp_shards_the_teacher_and_matches_one_process(tmp_path, objective):
    """A teacher with weights (teacher.kind=gmm_learned) is sharded with the generator and critic: DMD2's
    regression pairs (built by the main process alone in objective.prepare) and the final evaluation gather it on
    every rank; sCD runs torch.func.jvp through it. Losses and weights equal one process's."""
    from onestep.train.trainer import train

    launcher, own = CASES[objective]
    args = COMMON + [a.format(tmp=tmp_path) for a in own] + ["teacher.kind=gmm_learned"]
    r = launch(launcher, args + ["trainer.fsdp=true", f"run_dir={tmp_path}/two"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert TEACHER_SHARDED in r.stdout and "generator: full copy FSDP2-sharded" in r.stdout
    assert "| teacher | ddim | 2 |" in r.stdout  # the main process evaluated the gathered teacher
    train(compose(args), tmp_path / "one")
    _same_training(tmp_path / "one", tmp_path / "two", STEPS)


@pytest.mark.slow
def test_fsdp_mixed_precision_computes_in_bf16_and_keeps_fp32_weights(tmp_path):
    """trainer.mixed_precision=bf16 under FSDP2 trains, its critic loss follows one bf16-autocast process within
    bf16 rounding (1%), and weights, optimizer moments and checkpoints stay fp32 (that the sharded blocks do
    compute in bf16 is checked in test_fsdp_parameter_dtypes)."""
    args = COMMON + ["experiment=gmm_fdistill", "teacher.kind=gmm_learned", "trainer.mixed_precision=bf16"]
    r = launch("torchrun", args + ["trainer.fsdp=true", "trainer.checkpoint_format=safetensors",
                                   f"run_dir={tmp_path}/two"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert TEACHER_SHARDED in r.stdout
    # one process in its own interpreter: accelerate fixes the precision once per process (earlier tests ran fp32)
    r = subprocess.run([sys.executable, "-m", "onestep.cli", "train", *args, f"run_dir={tmp_path}/one"],
                       cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _stats(tmp_path / "one"), _stats(tmp_path / "two")
    for sa, sb in zip(a, b):
        assert sb["critic/loss"] == pytest.approx(sa["critic/loss"], rel=1e-2), f"step {sa['step']}"
    for net, w in _final(tmp_path / "two").items():
        assert all(v.dtype == torch.float32 for v in w.values()), net


DTYPES = """
import sys, torch, torch.distributed as dist
from torch import nn
from onestep import fsdp
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.SiLU()) for _ in range(2)])
    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return h

for frozen in (False, True):
    net, seen = Net().requires_grad_(not frozen), []
    for b in net.blocks:
        b.register_forward_hook(lambda m, i, o: seen.append((str(m[0].weight.dtype), str(o.dtype))))
    fsdp.shard(net, "bf16")
    y = net(torch.randn(3, 4))
    print(("frozen" if frozen else "trained"), seen, str(y.dtype), sorted({str(p.dtype) for p in net.parameters()}))
"""


def test_fsdp_parameter_dtypes():
    """fsdp.shard(net, "bf16") in a 1-process group: a trained network's blocks compute with bf16 weights while
    the stored (sharded) parameters stay fp32; a frozen network (the teacher, already cast to
    trainer.frozen_dtype) is not cast again."""
    r = subprocess.run([sys.executable, "-c", DTYPES, _free_port()], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    bf16, fp32 = "torch.bfloat16", "torch.float32"
    trained, frozen = r.stdout.splitlines()
    assert trained == f"trained {[(bf16, bf16)] * 2} {bf16} {[fp32]}", trained
    assert frozen == f"frozen {[(fp32, fp32)] * 2} {fp32} {[fp32]}", frozen


@pytest.mark.slow
def test_fsdp_shards_an_sd_unet_teacher(tmp_path):
    """A diffusers UNet2DConditionModel teacher (tiny SD1.5 pipeline; nested ModuleLists, gradient checkpointing)
    sharded over 2 processes trains 3 DMD2 steps exactly as one process does. The experiment's ema_decay=0 makes
    the sharded generator the evaluated network: the sample grid at step 2 and the final evaluation gather it. Its
    checkpoint is written as safetensors (dcp is test_dcp.py's): every shard gathered, rank 0 alone keeping and
    writing the whole tensors, equal to the one-process run's."""
    from sd_fixtures import make_tiny_sd15, write_prompts

    pipe = make_tiny_sd15(tmp_path / "sd15")
    prompts = write_prompts(tmp_path / "prompts.txt", ["a red square", "a blue circle", "a green dog", "two cats"])
    args = ["experiment=sd15_dmd2", f"teacher.path={pipe}", f"data.path={prompts}", "trainer.steps=3",
            "trainer.batch_size=2", "trainer.progress=false", "eval.num_samples=4", "eval.teacher_steps=[2]",
            "trainer.checkpoint_every=3", "trainer.log_every=1", "trainer.sample_every=2", "trainer.frozen_dtype=fp32",
            "objective.ttur=1"]
    r = launch("torchrun", args + ["trainer.fsdp=true", "trainer.checkpoint_format=safetensors",
                                   f"run_dir={tmp_path}/two"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert TEACHER_SHARDED in r.stdout and "critic: full copy FSDP2-sharded" in r.stdout
    assert "returned a view tensor" not in r.stderr  # no lone layer became an FSDP unit
    assert (tmp_path / "two" / "samples_00000002.png").exists()
    r = subprocess.run([sys.executable, "-m", "onestep.cli", "train", *args, f"run_dir={tmp_path}/one"],
                       cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_training(tmp_path / "one", tmp_path / "two", 3)


NAN_ARGS = COMMON + CASES["dmd2"][1] + ["trainer.max_bad_steps=1", "trainer.keep_checkpoints=5"]


def _launch_poisoned(args: list[str], cwd: Path, steps: str):
    """torchrun (2 gloo processes) of tests/nan_on_one_rank.py: DMD2's generator loss non-finite (its gradients
    finite) on rank 1 only at ``steps`` (1-based, or ``N-`` for N on)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
           str(Path(__file__).with_name("nan_on_one_rank.py")), "train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", ONESTEP_TEST_NAN_RANK="1", ONESTEP_TEST_NAN_STEPS=steps)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_both(tmp_path, monkeypatch):
    """Training, 2 gloo processes: the generator loss is non-finite on rank 1 only at step 4. Both ranks skip that
    update (the weights equal 1 process skipping step 4; rank 0, whose loss and gradients were finite, would
    otherwise step and its checkpoint differ) and it is counted. Non-finite on rank 1 from step 4 on with
    trainer.max_bad_steps=1: both ranks stop at step 5 with the one-line message, and the newest checkpoint
    (step 3) is intact: bit-identical to step 3 of the first run."""
    from nan_on_one_rank import poison

    from onestep.train.trainer import train

    args = [a.format(tmp=tmp_path) for a in NAN_ARGS]
    once, one = tmp_path / "once", tmp_path / "one"
    r = _launch_poisoned(args + [f"run_dir={once}"], tmp_path, "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [s["bad_steps"] for s in _stats(once)] == [0, 0, 0, 1, 1, 1]
    from onestep.objectives.dmd2 import DMD2

    monkeypatch.setattr(DMD2, "generator_loss", DMD2.generator_loss)  # restored after the test
    monkeypatch.setenv("RANK", "1")  # the single process is "rank 1": the same step is poisoned there
    poison(1, "4")
    monkeypatch.delenv("RANK")
    train(compose(args), one)
    assert [s["bad_steps"] for s in _stats(one)] == [0, 0, 0, 1, 1, 1]
    wa, wb = _final(one), _final(once)
    assert wa.keys() == wb.keys()
    for net in wa:
        for k in wa[net]:
            torch.testing.assert_close(wb[net][k], wa[net][k], rtol=1e-4, atol=1e-5, msg=f"{net}.{k}")

    stopped = tmp_path / "stopped"
    r = _launch_poisoned(args + [f"run_dir={stopped}"], tmp_path, "4-")
    assert r.returncode != 0
    msg = "onestep: error: generator loss or gradients were non-finite in 2 consecutive steps"
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("onestep: error:")]
    assert errors and all(ln.startswith(msg) for ln in errors), r.stderr[-3000:]
    # each rank stops with the one line; torchrun may terminate the slower rank before it prints (the same-step
    # stop is what the stats and checkpoint checks below show)
    assert 1 <= len(errors) <= 2, r.stderr[-3000:]
    assert [p.name for p in checkpoint.list_checkpoints(stopped)] == ["step_00000003"]
    assert [(s["step"], s["bad_steps"]) for s in _stats(stopped)] == [(1, 0), (2, 0), (3, 0), (4, 1)]
    good = stopped / "checkpoints" / "step_00000003"
    for f in sorted(good.glob("*.safetensors")):
        wa, wb = load_file(str(once / "checkpoints" / good.name / f.name)), load_file(str(f))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f.stem
