"""The Networks seam: LoRA roles on one shared frozen base (bit-identical base, adapter-only optimizers and
checkpoints, one copy in memory, bit-exact resume), full-copy roles, targets, and views' attributes (the layering
rules: tests/test_layers.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, compose, train_straight_and_resumed
from onestep import checkpoint
from onestep.errors import ConfigError
from onestep.train.trainer import train

LORA = TINY + ["generator.lora.rank=4", "critic.lora.rank=4"]


def _storages(params) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in params}


def test_lora_trains_adapters_only_on_one_shared_base(tmp_path):
    out = train(compose(LORA), tmp_path)
    nets = out["networks"]
    base = nets.base.net
    before = {k: v for k, v in load_file(str(tmp_path / "teacher_net.safetensors")).items()}
    # the base (everything but adapters) is bit-identical to the DSM-trained init after training
    checked = 0
    for name, p in base.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(p.detach(), before[name.replace(".base_layer", "")]), f"base weight {name} changed"
            checked += 1
    assert checked == len(before)
    # each optimizer holds exactly its role's adapter parameters
    opt_g, opt_c = out["optimizers"]
    names = {id(p): n for n, p in base.named_parameters()}
    g = [names[id(p)] for group in opt_g.param_groups for p in group["params"]]
    c = [names[id(p)] for group in opt_c.param_groups for p in group["params"]]
    assert g and all(".lora_A.generator." in n or ".lora_B.generator." in n for n in g)
    assert c and all(".lora_A.critic." in n or ".lora_B.critic." in n for n in c)
    # trained adapters require grad, the EMA adapter does not (peft freezes others on each injection)
    assert all(p.requires_grad for r in ("generator", "critic") for p in nets.roles[r].parameters())
    assert not any(p.requires_grad for p in nets.roles["generator_ema"].parameters())
    # one copy of the base: generator, critic, EMA and teacher views all run the same modules
    for role in ("generator", "critic", "generator_ema"):
        assert nets.roles[role].module is base
    every = [p for r in nets.roles.values() for p in r.module.parameters()]
    assert _storages(every) == _storages(base.parameters())
    # adapters moved away from their zero init; the checkpoint holds adapter weights only
    ck = checkpoint.list_checkpoints(tmp_path)[-1]
    gen = load_file(str(ck / "generator.safetensors"))
    assert set(gen) == set(g) and any(v.abs().sum() > 0 for k, v in gen.items() if "lora_B" in k)


def test_views_switch_adapters(tmp_path):
    """With every adapter off the shared base computes the init network exactly; the generator view (trained
    adapter) differs from it, and after its forward pass every adapter is off again."""
    from onestep.denoisers.nets import MLPDenoiser

    out = train(compose(LORA + ["trainer.steps=4"]), tmp_path)
    nets = out["networks"]
    base = nets.base
    init = MLPDenoiser(base.net.schedule, 2, hidden=32, depth=3)
    init.load_state_dict(load_file(str(tmp_path / "teacher_net.safetensors")))
    x, t = torch.randn(16, 2), torch.full((16,), 0.5)
    with base.use(None):
        assert torch.equal(base.net(x, t), init(x, t))
    gen = nets.roles["generator"].view(x, t)
    assert not torch.allclose(gen, init(x, t))
    assert all(m._disable_adapters for m in base.layers)
    assert torch.equal(base.net(x, t), init(x, t))


def test_view_passes_the_networks_data_attributes_through():
    """A View answers with its network's data attributes, whatever shaped the network (here MSD's routed students),
    and refuses its methods and submodules: run through the view they would skip its adapter and dtype."""
    from onestep.denoisers.nets import MLPDenoiser
    from onestep.denoisers.students import MultiStudent
    from onestep.networks import View
    from onestep.schedules import make_schedule

    net = MultiStudent(MLPDenoiser(make_schedule("edm"), 2, hidden=8, depth=1, num_classes=4), 2)
    view = View(net)
    assert view.num_students == 2 and view.feature_dim == net.feature_dim == 8 and view.num_classes == 4
    assert view.assignment is net.assignment  # a buffer of the network
    assert not hasattr(view, "route") and not hasattr(view, "students")
    with pytest.raises(AttributeError, match="no_such_thing"):
        view.no_such_thing


def test_full_copies_are_separate(tmp_path):
    nets = train(compose(TINY + ["trainer.steps=2"]), tmp_path)["networks"]
    g, c = nets.roles["generator"].module, nets.roles["critic"].module
    assert not (_storages(g.parameters()) & _storages(c.parameters()))
    assert nets.base is None


def test_lora_resume_is_bit_exact(tmp_path):
    a, b = (checkpoint.list_checkpoints(d)[-1] for d in train_straight_and_resumed(compose(LORA), tmp_path))
    for f in sorted(a.glob("*.safetensors")):
        wa, wb = load_file(str(f)), load_file(str(b / f.name))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{f.name} differs after resume"


@pytest.mark.parametrize("key", ["generator.lora.rank=0", "critic.lora.rank=-2"])
def test_bad_lora_rank_is_one_line_error(tmp_path, key):
    with pytest.raises(ConfigError, match=r"lora\.rank=.*positive adapter rank"):
        train(compose(TINY + [key]), tmp_path)


def test_frozen_dtype_bf16_teacher_and_fp32_generator(tmp_path):
    out = train(compose(TINY + ["trainer.steps=2", "teacher=gmm_ring_learned", "trainer.frozen_dtype=bf16"]), tmp_path)
    nets = out["networks"]
    assert {p.dtype for p in nets.teacher.net.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in nets.roles["generator"].parameters()} == {torch.float32}
    with pytest.raises(ConfigError, match="frozen_dtype 'fp8'"):
        train(compose(TINY + ["trainer.frozen_dtype=fp8"]), tmp_path / "bad")
