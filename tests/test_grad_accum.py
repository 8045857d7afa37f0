"""Gradient accumulation (trainer.grad_accum=K): K micro-batches of B rows per optimizer update train the run that
one batch of K B rows trains.

How both runs see the same numbers: the trainer reseeds torch's RNG from (seed, step) at every step, and a K = 4 run
draws the data of an update as one batch of 4 B rows from that state, exactly as the 4 B run does; micro-batch k
takes rows [k B, (k+1) B). Inside the losses, every per-row draw (t, the DSM and renoising noise, the critic's t,
labels dropped) is made by micro-batch k at the 4 B size from the state the update's first micro-batch began with,
and micro-batch k keeps its rows (SameDraws at 4 slots, onestep/train/data_parallel.py): so row i of micro-batch k
gets the t and the noise that row k B + i gets in the 4 B run, and after the last micro-batch the RNG stands where the
4 B run's does for the next update. Each micro-batch's loss is a mean over its B rows, scaled by 1 / 4 before its
backward: the summed gradients are those of the 4 B rows' mean. Without this placement (each micro-batch drawing B
rows in turn) the runs would share only their data and diverge from the first update.

Tolerance (fp32 throughout: the GMM runs train fp32 networks, so there is no float64 path): logged means rel 1e-4 (the
DMD surrogate loss is a mean of squared small differences, ~1e-5 relative apart after a step), final weights
atol 1e-5 (weights are O(1); the observed differences are ~1e-7 to 1e-6, float summation order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose, one_line, train_straight_and_resumed
from onestep import checkpoint
from onestep.errors import ConfigError
from onestep.validate import check_config

STEPS = 6
COMMON = ["teacher.net_steps=40", "teacher.net_hidden=32", f"trainer.steps={STEPS}", "trainer.checkpoint_every=3",
          "trainer.log_every=1", "trainer.progress=false", "trainer.log_with=none", "eval.num_samples=64",
          "eval.teacher_steps=[2]", "eval.plot=false"]
#: the equivalence's objectives (tests/test_distributed.py's CASES: DMD2 with a critic and regression pairs, SiD, sCD
#: with its JVP and log-variance head), and DMD2 with its GAN head on the critic's features (real and fake rows)
CASES = {
    "dmd2": ["experiment=gmm_dmd2", "objective.regression_pairs=64", "objective.regression_steps=4"],
    "dmd2_gan": ["experiment=gmm_dmd2", "objective.regression_weight=0", "objective.discriminator=critic",
                 "objective.gan_weight=0.1"],
    "sid": ["experiment=gmm_sid"],
    "scd": ["experiment=gmm_scd"],
}


def _stats(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "stats.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    last = checkpoint.list_checkpoints(run)[-1]
    assert last.name == f"step_{STEPS:08d}"
    # (an FSDP run writes dcp checkpoints: trainer.checkpoint_format=auto)
    return {role: checkpoint.role_weights(last, role) for role in checkpoint.roles(last)}


@pytest.fixture
def grad_norms():
    """The gradient norm of every optimizer step in this process, in order (a global step pre-hook): Adam's update
    hardly sees a constant factor on the gradients, so this is where a micro-batch's missing 1 / K shows."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    norms: list[float] = []

    def hook(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(hook)
    yield norms
    handle.remove()


def _same_run(big: Path, acc: Path) -> None:
    """Every logged mean of ``acc`` equals ``big``'s at every step, and every final weight (tolerances: the module
    docstring); a maximum over the batch and wall times are left out."""
    a, b = _stats(big), _stats(acc)
    keys = [k for k in a[0] if k != "it_per_s" and not k.endswith("_max") and not k.startswith("time/")]
    assert "gen/loss" in keys and len(a) == len(b) == STEPS
    for sa, sb in zip(a, b):
        for k in keys:
            assert sb[k] == pytest.approx(sa[k], rel=1e-4, abs=1e-6), f"step {sa['step']} {k}"
    wa, wb = _weights(big), _weights(acc)
    assert wa.keys() == wb.keys()
    for net in wa:
        for k in wa[net]:
            torch.testing.assert_close(wb[net][k], wa[net][k], rtol=0, atol=1e-5, msg=f"{net}.{k}")


@pytest.mark.parametrize("objective", list(CASES))
def test_four_micro_batches_of_b_train_the_4b_run(tmp_path, objective, grad_norms):
    """Batch 16 with trainer.grad_accum=4 equals batch 64: the gradient norm at every optimizer step (the critic's
    TTUR updates and the generator's alike), every logged loss and term per step, and the final generator, critic,
    EMA and head weights."""
    from onestep.train.trainer import train

    args = COMMON + CASES[objective]
    train(compose(args + ["trainer.batch_size=64"]), tmp_path / "big")
    big = list(grad_norms)
    grad_norms.clear()
    train(compose(args + ["trainer.batch_size=16", "trainer.grad_accum=4"]), tmp_path / "acc")
    assert len(big) == len(grad_norms) >= STEPS and all(n > 0 for n in big)
    assert grad_norms == pytest.approx(big, rel=1e-4)
    _same_run(tmp_path / "big", tmp_path / "acc")


#: every shipped mixture experiment
GMM = sorted(e.stem for e in (Path(__file__).resolve().parents[1] / "configs" / "experiment").glob("gmm_*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", GMM)
def test_every_objective_accumulates_exactly_or_refuses(tmp_path, experiment, grad_norms):
    """3 steps of batch 16 with grad_accum=2 against batch 32, for every objective: the same gradients at every
    optimizer step and the same final weights, or (the objectives tied to their batch) the one-line refusal before
    anything runs. A new objective whose draws the trainer cannot place (a per-row draw whose leading dimension is
    not the batch's) shows here as different gradients."""
    from onestep.train.trainer import train

    args = [f"experiment={experiment}", "teacher.net_steps=20", "teacher.net_hidden=32", "trainer.steps=3",
            "trainer.checkpoint_every=3", "trainer.progress=false", "trainer.log_with=none", "eval.num_samples=32",
            "eval.teacher_steps=[2]", "eval.plot=false"]
    acc = compose(args + ["trainer.batch_size=16", "trainer.grad_accum=2"])
    try:
        check_config(acc)
    except ConfigError as e:
        assert str(e).startswith(f"trainer.grad_accum=2 with objective={acc.objective.name}: "), str(e)
        return
    train(compose(args + ["trainer.batch_size=32"]), tmp_path / "big")
    big = list(grad_norms)
    grad_norms.clear()
    train(acc, tmp_path / "acc")
    assert grad_norms == pytest.approx(big, rel=1e-4)
    last = checkpoint.list_checkpoints(tmp_path / "big")[-1]
    for f in sorted(last.glob("*.safetensors")):
        wa, wb = load_file(str(f)), load_file(str(tmp_path / "acc" / "checkpoints" / last.name / f.name))
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=f"{f.stem}.{k}")


def test_micro_batch_draws_put_together_are_the_big_batch_draws():
    """DataParallel's placement, exactly: 2 ranks x 3 micro-batches of n rows, each micro-batch drawing under
    ``draws(k)`` from the step's seed; put back in place (slot k W + r), the rows equal one process drawing for
    6 n rows at once, the draws that are not per row come out as the one process's, and after the last micro-batch the
    RNG stands where the one process's does."""
    from types import SimpleNamespace

    from onestep.train.data_parallel import DataParallel

    n, world, accum = 3, 2, 3

    def draws(rows: int) -> list[torch.Tensor]:
        x = torch.zeros(rows, 2)
        return [torch.randn(rows, 4), torch.rand(rows, dtype=torch.float64), torch.randint(0, 7, (rows,)),
                torch.randn_like(x), torch.rand(2 * rows, 3), torch.randint(0, 5, ()), torch.rand(5)]

    torch.manual_seed(0)
    whole, after = draws(n * world * accum), torch.rand(4)
    slots = {}
    for rank in range(world):
        dp = DataParallel(SimpleNamespace(num_processes=world, process_index=rank, device=torch.device("cpu")),
                          n * world, accum)
        torch.manual_seed(0)
        for k in range(accum):
            with dp.draws(k):
                slots[k * world + rank] = draws(n)
        assert torch.equal(torch.rand(4), after), rank
    for i, w in enumerate(whole):
        if w.ndim == 0 or w.shape[0] % n:
            assert all(torch.equal(p[i], w) for p in slots.values()), i
            continue
        blocks = w.shape[0] // (n * world * accum)
        glued = torch.stack([slots[s][i].view(blocks, n, *w.shape[1:]) for s in sorted(slots)], 1).reshape(w.shape)
        assert torch.equal(glued, w), i


def test_accumulated_run_resumes_bit_identically(tmp_path):
    """Killed after step 7 (checkpoint at 4) and rerun, a grad_accum=2 run ends bit-identical to one never stopped:
    checkpoints are written between updates, and an update's micro-batches depend only on (seed, step)."""
    args = [a for a in COMMON if not a.startswith(("trainer.steps", "trainer.checkpoint_every"))] + CASES["dmd2"] + \
        ["trainer.steps=10", "trainer.checkpoint_every=4", "trainer.batch_size=16", "trainer.grad_accum=2"]
    a, b = (checkpoint.list_checkpoints(d)[-1] for d in train_straight_and_resumed(compose(args), tmp_path))
    assert a.name == b.name == "step_00000010"
    for f in sorted(a.glob("*.safetensors")):
        wa, wb = load_file(str(f)), load_file(str(b / f.name))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{f.name} differs after resume"


@pytest.mark.parametrize("k", [0, -2])
def test_bad_grad_accum_is_one_line_error(k):
    with pytest.raises(ConfigError) as e:
        check_config(compose(["experiment=gmm_dmd2", f"trainer.grad_accum={k}"]))
    assert one_line(e) == (f"trainer.grad_accum={k} is out of range (micro-batches per optimizer update; 1 = no "
                           "gradient accumulation): pass trainer.grad_accum=<integer >= 1>")


@pytest.mark.parametrize("experiment, key", [("gmm_fdistill", "objective.normalization=h_bins"),
                                             ("gmm_tcm", "objective.boundary_prob=0.25")])
def test_objectives_tied_to_their_batch_refuse_accumulation(experiment, key):
    """f-distill normalizes its weights by batch means, TCM puts a share of each batch's rows on the boundary pair:
    K micro-batches are not one batch of K B rows there, so K > 1 is refused, naming the objective and the key."""
    cfg = compose([f"experiment={experiment}", "trainer.grad_accum=2"])
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    msg = one_line(e)
    assert msg.startswith(f"trainer.grad_accum=2 with objective={cfg.objective.name}: {key} "), msg
    assert msg.endswith("pass trainer.grad_accum=1 (a larger trainer.batch_size)"), msg
    check_config(compose([f"experiment={experiment}"]))  # K = 1 is the plain run
    if experiment == "gmm_tcm":  # no boundary rows: TCM's loss is per row again
        check_config(compose([f"experiment={experiment}", "trainer.grad_accum=2", "objective.boundary_prob=0"]))


def _launch_counted(args: list[str], cwd: Path, counts: Path):
    """torchrun (2 gloo processes) of tests/count_collectives.py: each rank records the gradient collectives it has
    issued at the start of every micro-batch."""
    from test_distributed import _free_port

    counts.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
           str(Path(__file__).with_name("count_collectives.py")), "train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", ONESTEP_TEST_COUNTS=str(counts))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.xdist_group("distributed")  # (one multi-process launch at a time: tests/test_distributed.py)
@pytest.mark.parametrize("shard", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_reduce_gradients_once_per_update(tmp_path, shard):
    """2 gloo processes, global micro-batch 32, grad_accum=2 (DMD2: 5 critic updates + 1 generator update a step):
    no rank issues a gradient collective during the first micro-batch of an update (the all-reduce of the replicated
    gradients, FSDP2's reduce-scatter of the sharded ones), one is issued after the last; and the run equals one
    process with batch 64."""
    from onestep.train.trainer import train

    args = COMMON + CASES["dmd2"] + [f"objective.pairs_file={tmp_path}/pairs.safetensors"]
    run, counts = tmp_path / "two", tmp_path / "counts"
    r = _launch_counted(args + ["trainer.batch_size=32", "trainer.grad_accum=2", f"trainer.fsdp={str(shard).lower()}",
                                f"run_dir={run}"], tmp_path, counts)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("generator: full copy FSDP2-sharded over 2 processes" in r.stdout) == shard
    column = 2 if shard else 1  # reduce_scatter_single under FSDP, else all_reduce
    for rank in (0, 1):
        record = json.loads((counts / f"rank{rank}.json").read_text())
        assert [k for k, *_ in record] == [0, 1] * (STEPS * 6)  # (6 updates a step: ttur=5 critic + 1 generator)
        for first, second in zip(record[::2], record[1::2]):
            assert first[column] == second[column], (rank, first, second)  # none during micro-batch 0
        starts = [e[column] for e in record[::2]]
        assert all(b > a for a, b in zip(starts, starts[1:])), (rank, starts)  # one after each update's last
    train(compose(args + ["trainer.batch_size=64"]), tmp_path / "one")
    _same_run(tmp_path / "one", run)


def test_a_run_made_before_the_key_resumes_at_its_default_only(tmp_path):
    """A run folder whose config.yaml predates trainer.grad_accum resumes with grad_accum=1 (what it trained with);
    another value is a different run and is refused."""
    from omegaconf import OmegaConf

    from onestep.train.run_dir import prepare_run_dir

    cfg = compose(["experiment=gmm_dmd2"])
    old = OmegaConf.to_container(cfg, resolve=True)
    del old["trainer"]["grad_accum"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
    prepare_run_dir(cfg, tmp_path, write=False)
    with pytest.raises(ConfigError, match=r"different config \(trainer.grad_accum: None -> 2\)"):
        prepare_run_dir(compose(["experiment=gmm_dmd2", "trainer.grad_accum=2"]), tmp_path, write=False)
