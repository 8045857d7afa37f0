"""generator.arch (a generator smaller than its teacher, denoisers/slim.py) and objective=slimflow: tensors copied from
the teacher where name and shape match (exactly), block dropping on the MLP and the digits UNet, one-line errors for
bad specs, the SlimFlow losses against a float64 transcription of the official code (yuanzhi-zhu/SlimFlow
reflow/reflow.py), and a short smaller-student run that resumes bit-identically across the stage switch. FSDP:
tests/test_distributed.py; export of a smaller SD UNet: tests/test_export.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose, one_line, train_straight_and_resumed
from onestep.checkpoint import list_checkpoints
from onestep.denoisers.diffusers import load_unet_denoiser
from onestep.denoisers.nets import MLPDenoiser
from onestep.denoisers.slim import copy_matching, rebuilt_diffusers, student_of
from onestep.errors import ConfigError
from onestep.objectives.slimflow import RECTIFIED, anneal_beta, annealed_noise, flow_guided_loss
from onestep.schedules import make_schedule
from onestep.teachers.digits import ClassUNet

SLIM = ["experiment=gmm_slimflow", "teacher.net_steps=40", "teacher.net_hidden=32", "trainer.steps=12",
        "trainer.batch_size=64", "trainer.checkpoint_every=4", "trainer.log_every=1", "trainer.progress=false",
        "objective.num_pairs=256", "objective.pair_steps=4", "objective.reflow_steps=6", "objective.anneal_steps=4",
        "eval.num_samples=256", "eval.teacher_steps=[2]", "eval.plot=false", "generator.arch='hidden=16,depth=1'"]


def _copied_exactly(teacher, student) -> tuple[int, int]:
    """(copied, fresh) seen from the weights: every student tensor whose name and shape the teacher has equals it."""
    have, copied, fresh = teacher.state_dict(), 0, 0
    for name, tensor in student.state_dict().items():
        if name in have and have[name].shape == tensor.shape:
            assert torch.equal(tensor, have[name]), name
            copied += 1
        else:
            fresh += 1
    return copied, fresh


def _params(net) -> int:
    return sum(p.numel() for p in net.parameters())


def test_mlp_spec_drops_blocks_and_copies_what_fits():
    torch.manual_seed(0)
    teacher = MLPDenoiser(make_schedule("rectified_flow"), 2, hidden=32, depth=3, num_classes=3)
    shallow, copied, fresh = student_of(teacher, "depth=1")
    assert len(shallow.blocks) == 1 and _params(shallow) < _params(teacher)
    assert (copied, fresh) == _copied_exactly(teacher, shallow) and fresh == 0  # a subset of the teacher's blocks
    narrow, copied, fresh = student_of(teacher, "hidden=8,depth=2")
    assert narrow.feature_dim == 8 and _params(narrow) < _params(shallow)
    assert (copied, fresh) == _copied_exactly(teacher, narrow) and copied == 3 and fresh > 0  # freqs, labels, out bias
    x, t = torch.randn(5, 2), torch.full((5,), 0.5)
    assert narrow(x, t).shape == (5, 2)


def test_unet_block_dropping_and_json_config(tmp_path):
    """BK-SDM-style: the digits UNet without its mid-block keeps every other tensor of the teacher; a narrower UNet
    from a config .json copies the tensors whose shapes survive."""
    teacher = load_unet_denoiser(ClassUNet.folder)
    no_mid, copied, fresh = student_of(teacher, "mid_block_type=null")
    assert no_mid.unet.mid_block is None and _params(no_mid) < _params(teacher)
    assert (copied, fresh) == _copied_exactly(teacher.unet, no_mid.unet) and fresh == 0
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 0.5)
    assert no_mid(x, t).shape == (3, 1, 8, 8)
    config = {**dict(teacher.unet.config), "block_out_channels": [32, 32]}
    path = tmp_path / "student.json"
    path.write_text(json.dumps(config))
    narrow, copied, fresh = student_of(teacher, str(path))
    assert tuple(narrow.unet.config.block_out_channels) == (32, 32) and _params(narrow) < _params(teacher)
    assert (copied, fresh) == _copied_exactly(teacher.unet, narrow.unet) and copied > 0 and fresh > 0
    assert narrow.schedule is teacher.schedule and narrow.prediction == teacher.prediction


def test_sd_unet_spec_removes_the_mid_block():
    """A spec on an SD UNet built in memory, whose config lists mid_block_type among the keys left at their defaults:
    null still removes the mid-block (from_config would rebuild the default one) and the rest is copied."""
    from sd_fixtures import unet

    teacher = unet()
    student = rebuilt_diffusers(teacher, {"mid_block_type": None}, replace=False)
    assert teacher.mid_block is not None and student.mid_block is None
    copied, fresh = copy_matching(teacher, student)
    assert (copied, fresh) == _copied_exactly(teacher, student) and fresh == 0


def test_flow_transformer_spec_keeps_a_subset_of_its_blocks():
    """SD3's transformer with one of its two joint blocks: the adapter (kind, schedule, latent size) is the teacher's
    and every tensor of the kept block is the teacher's."""
    from flow_fixtures import sd3_transformer
    from onestep.denoisers.flow import FlowTransformerDenoiser

    teacher = FlowTransformerDenoiser(sd3_transformer(), make_schedule("rectified_flow"), "sd3", latent_size=8)
    student, copied, fresh = student_of(teacher, "num_layers=1")
    assert len(student.transformer.transformer_blocks) == 1 and _params(student) < _params(teacher)
    assert (copied, fresh) == _copied_exactly(teacher.transformer, student.transformer)
    assert copied > 0 and (student.kind, student.data_shape) == (teacher.kind, teacher.data_shape)


@pytest.mark.parametrize("arch, match", [
    ("hidden", "'hidden' is not key=value"),
    ("width=3", r"the project's MLP takes hidden=.*\['width'\]"),
    ("depth=0", "positive integers"),
    ("missing.json", "'missing.json' is no file"),
])
def test_bad_mlp_arch_is_one_line(arch, match):
    teacher = MLPDenoiser(make_schedule("rectified_flow"), 2, hidden=8, depth=2)
    with pytest.raises(ConfigError, match=match) as e:
        student_of(teacher, arch)
    assert "generator.arch" in one_line(e)


def test_bad_unet_arch_is_one_line(tmp_path):
    teacher = load_unet_denoiser(ClassUNet.folder)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    listed = tmp_path / "listed.json"
    listed.write_text("[1, 2]")
    for arch, match in [("channels=3", r"\['channels'\] are not UNet2DModel config keys"),
                        (str(other), "a UNet2DConditionModel config, but the teacher's network is a UNet2DModel"),
                        (str(broken), "is not JSON"),
                        (str(listed), "holds a JSON list, not a config object"),
                        ("block_out_channels=[7,64]", "UNet2DModel cannot be built from that config")]:
        with pytest.raises(ConfigError, match=match) as e:
            student_of(teacher, arch)
        assert "generator.arch" in one_line(e)


def test_config_check_refuses_bad_arch_and_arch_with_lora_before_setup(tmp_path):
    from onestep.validate import check_config

    with pytest.raises(ConfigError, match="generator.arch='depth=1' gives the generator a network of its own"):
        check_config(compose(["experiment=gmm_dmd2", "generator.arch='depth=1'", "generator.lora.rank=4"]))
    with pytest.raises(ConfigError, match="'depth' is not key=value"):
        check_config(compose(["experiment=gmm_dmd2", "generator.arch=depth"]))
    with pytest.raises(ConfigError, match="is no file"):
        check_config(compose(["experiment=gmm_dmd2", f"generator.arch={tmp_path}/none.json"]))


def test_slimflow_losses_match_a_float64_transcription_of_the_official_code():
    """reflow/reflow.py in its own frame (t: 0 noise -> 1 data, v = x1 - x0), float64, against this file's losses in
    the project's frame on the rectified-flow schedule (t_project = 1 - t_official, flow = -v)."""
    torch.manual_seed(0)
    sched = make_schedule("rectified_flow")
    a = torch.randn(3, 3, dtype=torch.float64)

    class Rectified(torch.nn.Module):  # a 2-rectified flow with a known velocity field (project frame: flow)
        schedule, prediction = sched, "flow"

        def x0(self, x_s, s, cond=None):
            return x_s - s[:, None] * self.flow(x_s, s)

        def flow(self, x_s, s, cond=None):
            return torch.tanh(x_s @ a) * (1 + s[:, None])

    rectified, n = Rectified(), 64
    z, sample = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)
    t_official = torch.rand(n, dtype=torch.float64) * 0.6 + 0.2  # reflow/reflow.py:216
    # teacher_loss_new, reflow/reflow.py:205-229 (predicted = v_theta(z, eps): the one-step sample is z + predicted)
    predicted = sample - z
    x_t_psuedo = z + t_official[:, None] * predicted
    v_teacher = -rectified.flow(x_t_psuedo, 1 - t_official)
    x_1 = x_t_psuedo + (1 - t_official)[:, None] * v_teacher
    official = ((predicted - (x_1 - z)) ** 2).mean(1).mean()
    ours = flow_guided_loss(sample.clone().requires_grad_(True), z, 1 - t_official, rectified)
    assert ours.item() == pytest.approx(official.item(), rel=1e-12)
    # the gradient reaches the student's sample only (the target is stop-grad): d/dG mean||G - T||^2 = 2 (G - T) / (n d)
    g = sample.clone().requires_grad_(True)
    flow_guided_loss(g, z, 1 - t_official, rectified).backward()
    target = x_1
    assert torch.allclose(g.grad, 2 * (sample - target) / (n * 3), rtol=1e-10, atol=1e-14)

    # annealing: reflow/reflow.py:79 (exp), :82 (cos), :86 (linear); the perturbed noise, :115
    for k, K in [(0, 10), (3, 10), (10, 10), (25, 10)]:
        assert anneal_beta(k, K, "linear") == pytest.approx(1 - min(1, k / K), abs=0)
        assert anneal_beta(k, K, "cos") == pytest.approx((1 + math.cos(math.pi * min(1, k / K))) / 2, abs=0)
        assert anneal_beta(k, K, "exp") == pytest.approx(math.exp(-k / K), abs=0)
    assert anneal_beta(5, 0, "linear") == 0.0
    eps = torch.randn(n, 3, dtype=torch.float64)
    for beta in (0.0, 0.3, 1.0):
        assert torch.equal(annealed_noise(z, eps, beta), math.sqrt(1 - beta**2) * z + beta * eps)
    assert torch.equal(annealed_noise(z, eps, 1.0), eps)  # beta = 1: random pairing, the pair's noise is gone


def test_smaller_student_trains_checkpoints_and_resumes_bit_identical(tmp_path):
    """12 steps of a 16-wide one-block student of a 32-wide three-block teacher (stage switch at step 6), straight vs
    killed after step 9 and rerun (resumed from step 8: the frozen 2-rectified flow comes from the checkpoint)."""
    straight, resumed = train_straight_and_resumed(compose(SLIM), tmp_path, stop_at=9)
    a, b = list_checkpoints(straight)[-1], list_checkpoints(resumed)[-1]
    for name in ("generator", "generator_ema", RECTIFIED):
        wa, wb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    g, r = load_file(str(a / "generator.safetensors")), load_file(str(a / f"{RECTIFIED}.safetensors"))
    assert g["blocks.0.1.weight"].shape == (16, 16) and "blocks.1.1.weight" not in g  # the student's own shape
    assert any(not torch.equal(g[k], r[k]) for k in g)  # stage 2 moved the student away from the frozen flow
    stats = [json.loads(line) for line in (straight / "stats.jsonl").read_text().splitlines()]
    assert {s["gen/stage"] for s in stats} == {1.0, 2.0}
