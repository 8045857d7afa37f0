"""Sharded checkpoints (trainer.checkpoint_format=dcp, torch.distributed.checkpoint): a run resumed 2 -> 4 -> 1 -> 2
processes equals 12 steps of one process; a crash in the middle of a dcp save
leaves the previous checkpoint the newest readable one; keep_checkpoints prunes dcp folders; `onestep sample` and
`onestep export` of a dcp run equal those of the same run saved as safetensors; a bad format is a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, compose
from test_distributed import COMMON, _stats, launch
from test_teachers import _onestep
from onestep import checkpoint, fsdp
from onestep.errors import ConfigError
from onestep.train.trainer import train

DCP = ["trainer.checkpoint_format=dcp"]
#: one multi-process launch at a time (test_distributed.py says why)
distributed = pytest.mark.xdist_group("distributed")


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every role of the run's newest checkpoint, whole, whichever format wrote it."""
    last = checkpoint.list_checkpoints(run)[-1]
    return {role: checkpoint.role_weights(last, role) for role in checkpoint.roles(last)}


def _assert_same(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys() and a
    for net in a:
        assert a[net].keys() == b[net].keys(), net
        for k in a[net]:
            torch.testing.assert_close(b[net][k], a[net][k], msg=f"{net}.{k}", **tol)


def test_a_bad_checkpoint_format_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^trainer.checkpoint_format='zip' is unknown; choose one of") as e:
        train(compose(TINY + ["trainer.checkpoint_format=zip"]), tmp_path / "run")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="pass trainer.checkpoint_format=safetensors"):
        train(compose(TINY + DCP + ["generator.lora.rank=4"]), tmp_path / "lora")


def test_dcp_resume_prune_and_crash_mid_save(tmp_path, monkeypatch):
    """One process, checkpoint_format=dcp: folders carry the marker and shards, keep_checkpoints=2 leaves two;
    a save that dies after the shards (before state.pt and the rename) leaves step 8 the newest readable
    checkpoint; the rerun resumes from it and ends with the weights of a run saved as safetensors throughout.
    Neither dcp run ever gathers a state (fsdp.gather raises; the safetensors format calls it at every save)."""
    straight, run = tmp_path / "straight", tmp_path / "dcp"
    train(compose(TINY), straight)

    def no_gather(state):
        raise AssertionError("a dcp save gathered a state")

    monkeypatch.setattr(fsdp, "gather", no_gather)

    real = checkpoint.torch.save

    def dying_at_12(obj, f, *a, **k):
        if ".tmp-step_00000012" in str(f):
            raise KeyboardInterrupt  # the process dies between the shards and state.pt
        return real(obj, f, *a, **k)

    with monkeypatch.context() as dying:
        dying.setattr(checkpoint.torch, "save", dying_at_12)
        with pytest.raises(KeyboardInterrupt):
            train(compose(TINY + DCP), run)
    found = checkpoint.list_checkpoints(run)
    assert [p.name for p in found] == ["step_00000004", "step_00000008"]  # (keep_checkpoints=2 dropped none yet)
    assert (run / "checkpoints" / ".tmp-step_00000012" / ".metadata").is_file()  # the shards were written
    assert all(checkpoint.is_dcp(p) and checkpoint.looks_readable(p) for p in found)
    assert not list(found[-1].glob("*.safetensors"))

    train(compose(TINY + DCP), run)  # resumes from step 8
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_00000008", "step_00000012"]
    assert not (run / "checkpoints" / ".tmp-step_00000012").exists()
    _assert_same(_weights(straight), _weights(run), rtol=0, atol=0)
    # another run's objective.* weights (a run folder) read the dcp run's EMA generator too
    ema = checkpoint.read_generator_weights(str(run), "objective.teacher_run")
    _assert_same({"ema": _weights(straight)["generator_ema"]}, {"ema": ema}, rtol=0, atol=0)


@pytest.mark.slow
@distributed
def test_dcp_resumes_on_other_process_counts(tmp_path, capsys):
    """f-distill (generator and critic FSDP2-sharded, a GAN head, both AdamW states) with dcp checkpoints, trained
    0 -> 3 over 2 processes (trainer.fsdp=true: auto writes dcp), 3 -> 6 over 4, 6 -> 9 in one process without a
    process group, 9 -> 12 over 2 again: equals 12 steps of one process."""
    args = [a for a in COMMON if not a.startswith("trainer.steps")] + ["experiment=gmm_fdistill"]
    run, one = tmp_path / "chain", tmp_path / "one"
    fsdp = ["trainer.fsdp=true", f"run_dir={run}"]
    r = launch("torchrun", args + fsdp + ["trainer.steps=3"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "critic: full copy FSDP2-sharded over 2 processes" in r.stdout, r.stdout[-3000:]
    first = checkpoint.list_checkpoints(run)[-1]
    assert checkpoint.is_dcp(first) and len(list(first.glob("*.distcp"))) == 2
    r = launch("torchrun", args + fsdp + ["trainer.steps=6"], tmp_path, nproc=4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from step 3" in r.stdout and "FSDP2-sharded over 4 processes" in r.stdout, r.stdout[-3000:]
    train(compose(args + DCP + ["trainer.steps=9"]), run)
    assert "resuming from step 6" in capsys.readouterr().out
    r = launch("torchrun", args + fsdp + ["trainer.steps=12"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from step 9" in r.stdout, r.stdout[-3000:]
    train(compose(args + ["trainer.steps=12"]), one)

    a, b = _stats(one), _stats(run)
    assert [s["step"] for s in b] == list(range(1, 13))
    for sa, sb in zip(a, b):
        for k in ("critic/loss", "gen/loss", "gen/h_mean"):
            assert sb[k] == pytest.approx(sa[k], rel=1e-4, abs=1e-6), f"step {sa['step']} {k}"
    assert checkpoint.list_checkpoints(run)[-1].name == "step_00000012"
    _assert_same(_weights(one), _weights(run), rtol=1e-4, atol=1e-5)


def test_a_dcp_folder_with_a_missing_shard_does_not_look_readable(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    live = checkpoint.Live({"g": net}, {"opt_g": (net, opt)})
    ckpt = checkpoint.save_dcp(tmp_path, 1, live, {"step": 1}, keep=2, main=True, barrier=lambda: None)
    assert checkpoint.looks_readable(ckpt) and checkpoint.roles(ckpt) == ["g"]
    assert torch.equal(checkpoint.role_weights(ckpt, "g")["weight"], net.weight)
    next(ckpt.glob("*.distcp")).unlink()
    assert not checkpoint.looks_readable(ckpt)


@pytest.mark.slow
def test_sample_and_export_read_a_dcp_run(tmp_path):
    """The test-only toy_digits family trained twice, saved as dcp and as safetensors: `onestep sample` gives the
    same images and `onestep export` the same weights (the dcp checkpoint consolidated on the CPU)."""
    for fmt in ("dcp", "safetensors"):
        _onestep(["train", "plugins=[toy_family]", "experiment=toy_dmd2", f"run_dir={tmp_path / fmt}",
                  f"trainer.checkpoint_format={fmt}"], tmp_path)
        _onestep(["sample", f"run_dir={tmp_path / fmt}", "num=4", "seed=3", f"out={tmp_path / fmt}.safetensors"],
                 tmp_path)
        _onestep(["export", f"run_dir={tmp_path / fmt}", f"out={tmp_path / fmt}-export"], tmp_path)
    assert checkpoint.is_dcp(checkpoint.list_checkpoints(tmp_path / "dcp")[-1])
    a, b = (load_file(str(tmp_path / f"{fmt}.safetensors"))["images"] for fmt in ("dcp", "safetensors"))
    assert torch.equal(a, b)
    exported = {fmt: {f.relative_to(tmp_path / f"{fmt}-export"): load_file(str(f))
                      for f in (tmp_path / f"{fmt}-export").rglob("*.safetensors")} for fmt in ("dcp", "safetensors")}
    _assert_same(exported["safetensors"], exported["dcp"], rtol=0, atol=0)
