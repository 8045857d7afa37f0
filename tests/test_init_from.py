"""trainer.init_from: a run starts from another run's weights (a two-stage schedule such as DMD2's GAN stage resumed
from its no-GAN run): every role both runs have is loaded before step 0, a role only this run has starts fresh, and
this run's own checkpoint wins once it exists."""

from __future__ import annotations

import pytest
import torch

from conftest import compose, one_line
from onestep import checkpoint
from onestep.errors import ConfigError
from onestep.train.trainer import setup, train

TINY = ["experiment=gmm_dmd2", "teacher.net_steps=20", "teacher.net_hidden=32", "trainer.batch_size=32",
        "trainer.checkpoint_every=3", "trainer.progress=false", "trainer.log_with=none", "eval.num_samples=32",
        "eval.teacher_steps=[2]", "eval.plot=false"]
GAN = ["objective.regression_weight=0", "objective.discriminator=critic", "objective.gan_weight=0.01"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    run = tmp_path_factory.mktemp("stage1")
    train(compose(TINY + ["trainer.steps=3", "objective.regression_weight=0"]), run)
    return run


def _state(obj) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in obj.state_dict().items()}


def test_stage_two_starts_from_stage_one_and_adds_a_fresh_head(stage1, tmp_path):
    last = checkpoint.list_checkpoints(stage1)[-1]
    assert "disc" not in checkpoint.roles(last)
    t = setup(compose(TINY + GAN + ["trainer.steps=3", f"trainer.init_from={stage1}"]), tmp_path / "stage2")
    mods = t.networks.checkpointed()
    for role in ("generator", "generator_ema", "critic"):
        want = checkpoint.role_weights(last, role)
        got = _state(mods[role])
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=f"{role}.{k}")
    assert t.start == 0 and "disc" in mods
    # the same run without init_from starts from the teacher: the generator differs from stage 1's
    fresh = setup(compose(TINY + GAN + ["trainer.steps=3"]), tmp_path / "fresh").networks.checkpointed()
    assert any(not torch.equal(v, checkpoint.role_weights(last, "generator")[k])
               for k, v in _state(fresh["generator"]).items())


def test_the_runs_own_checkpoint_wins_over_init_from(stage1, tmp_path):
    args = TINY + GAN + [f"trainer.init_from={stage1}"]
    run = tmp_path / "stage2"
    train(compose(args + ["trainer.steps=3"]), run)
    own = checkpoint.role_weights(checkpoint.list_checkpoints(run)[-1], "generator")
    t = setup(compose(args + ["trainer.steps=6"]), run)
    assert t.start == 3
    got = _state(t.networks.checkpointed()["generator"])
    for k in own:
        torch.testing.assert_close(got[k], own[k], rtol=0, atol=0)


def test_bad_init_from_is_one_line_error(stage1, tmp_path):
    with pytest.raises(ConfigError) as e:
        setup(compose(TINY + ["trainer.steps=3", f"trainer.init_from={tmp_path / 'nowhere'}"]), tmp_path / "a")
    assert one_line(e).startswith(f"trainer.init_from='{tmp_path / 'nowhere'}' is not a run folder"), one_line(e)
    with pytest.raises(ConfigError) as e:  # another generator width: the generator does not fit
        setup(compose(TINY + ["teacher.net_hidden=48", "trainer.steps=3", f"trainer.init_from={stage1}"]),
              tmp_path / "b")
    assert "its generator does not fit this run's" in one_line(e), one_line(e)
