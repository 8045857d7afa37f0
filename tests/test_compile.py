"""trainer.compile: the run's networks go through torch.compile in place, and a compiled run computes what the
eager run does (same losses at every step, same weights at the end, up to the float reordering of fused kernels);
the networks an objective differentiates with torch.func.jvp stay eager."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, compose
from onestep import checkpoint
from onestep.train.trainer import train

pytestmark = pytest.mark.slow

SCD = ["experiment=gmm_scd", "teacher.net_steps=40", "teacher.net_hidden=32", "trainer.batch_size=64",
       "trainer.progress=false", "eval.teacher_steps=[2]", "eval.plot=false"]
STEPS = ["trainer.steps=6", "trainer.log_every=1", "trainer.checkpoint_every=6", "eval.num_samples=128"]


def _losses(run) -> list[dict]:
    lines = [json.loads(ln) for ln in (run / "stats.jsonl").read_text().splitlines()]
    return [{k: v for k, v in ln.items() if k.startswith(("critic/", "gen/"))} for ln in lines]


def _weights(run) -> dict:
    return load_file(str(checkpoint.list_checkpoints(run)[-1] / "generator.safetensors"))


def _compiled_vs_eager(tmp_path, overrides):
    out = {}
    for flag in ("false", "true"):
        torch._dynamo.reset()
        res = train(compose(overrides + STEPS + [f"trainer.compile={flag}"]), tmp_path / flag)
        out[flag] = res["networks"]
    eager, compiled = _losses(tmp_path / "false"), _losses(tmp_path / "true")
    assert len(eager) == len(compiled) == 6 and eager[0]
    for a, b in zip(eager, compiled):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
    we, wc = _weights(tmp_path / "false"), _weights(tmp_path / "true")
    assert we.keys() == wc.keys()  # nn.Module.compile in place: the checkpoint's keys do not change
    for k in we:
        torch.testing.assert_close(wc[k], we[k], rtol=1e-4, atol=1e-5)
    return out


def test_compiled_dmd2_run_equals_eager(tmp_path):
    nets = _compiled_vs_eager(tmp_path, TINY)
    assert nets["false"].compiled is None
    assert set(nets["true"].compiled) == {"generator", "critic", "generator_ema", "teacher"} & (
        set(nets["true"].roles) | {"teacher"})
    assert all(getattr(r.module, "_compiled_call_impl", None) is not None for r in nets["true"].roles.values())


def test_jvp_objective_keeps_its_generator_eager(tmp_path):
    nets = _compiled_vs_eager(tmp_path, SCD)
    compiled = nets["true"]
    assert "generator" not in compiled.compiled and "teacher" in compiled.compiled
    assert getattr(compiled.roles["generator"].module, "_compiled_call_impl", None) is None
