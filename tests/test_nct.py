"""Noise Consistency Training (onestep/objectives/nct.py), its control maps and accuracy (onestep/rewards/control.py)
and the ControlNet path of UNet students (onestep/denoisers/control.py).

The losses against a float64 transcription of L_NC and L_B on tiny tensors; the control maps and the accuracy
against hand computations; the ControlNet built from a tiny SD1.5 UNet (tests/sd_fixtures.py) leaves the student
unchanged at start, trains alone under the loss and loads from a folder; a few CLI-config steps on the shipped
digits teacher with finite losses and the base left as it was.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import compose, logged_train
from onestep.config import asset
from onestep.denoisers.control import CONTROL, with_control
from onestep.errors import ConfigError
from onestep.objectives.nct import NCT, NCTConfig, adapter_only, nct_losses, vp_noise
from onestep.rewards.control import control_accuracy, control_map
from sd_fixtures import make_tiny_sd15


def test_noise_process_keeps_the_noise_standard_normal():
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 200000, generator=g, dtype=torch.float64), torch.randn(2, 200000, generator=g,
                                                                                   dtype=torch.float64)
    sig = torch.tensor([0.3, 0.8], dtype=torch.float64)
    z_t = vp_noise(z, eps, sig)
    torch.testing.assert_close(z_t, torch.sqrt(1 - sig[:, None] ** 2) * z + sig[:, None] * eps)
    assert z_t.var(1).sub(1).abs().max() < 0.01
    assert torch.equal(vp_noise(z, eps, torch.zeros(2, dtype=torch.float64)), z)
    assert torch.equal(vp_noise(z, eps, torch.ones(2, dtype=torch.float64)), eps)


def test_losses_are_the_transcribed_equations():
    """L_NC = mean_i mean_elem (f(z_t) - sg f(z_s))^2 at t = n/N, s = (n-1)/N, one eps; L_B = mean (f(z) - f_theta(z))^2,
    and the gradient flows through f(z_t) and f(z) only."""
    g = torch.Generator().manual_seed(3)
    n_rows, d, steps = 5, 3, 10
    w = torch.nn.Parameter(torch.randn(d, d, generator=g, dtype=torch.float64))

    def f(z):
        return torch.tanh(z @ w)

    z, eps = torch.randn(n_rows, d, generator=g, dtype=torch.float64), torch.randn(n_rows, d, generator=g,
                                                                                   dtype=torch.float64)
    base_x = torch.randn(n_rows, d, generator=g, dtype=torch.float64)
    n = torch.tensor([1, 4, 10, 7, 2])
    consistency, boundary = nct_losses(f, base_x, z, eps, n, steps)

    t, s = n.double() / steps, (n.double() - 1) / steps
    z_t = torch.sqrt(1 - t[:, None] ** 2) * z + t[:, None] * eps
    z_s = torch.sqrt(1 - s[:, None] ** 2) * z + s[:, None] * eps
    want_c = ((torch.tanh(z_t @ w) - torch.tanh(z_s @ w).detach()) ** 2).mean()
    want_b = ((torch.tanh(z @ w) - base_x) ** 2).mean()
    assert float(consistency.detach()) == pytest.approx(float(want_c), rel=1e-12)
    assert float(boundary.detach()) == pytest.approx(float(want_b), rel=1e-12)
    (g_got,) = torch.autograd.grad(consistency + 0.5 * boundary, w)
    (g_want,) = torch.autograd.grad(want_c + 0.5 * want_b, w)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-14)


def test_control_maps_and_accuracy():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    low = control_map(x, "lowres", 2)
    assert low.shape == (3, 1, 8, 8)
    assert float(low[1, 0, 0, 0]) == pytest.approx(float(x[1, 0, :4, :4].mean()), rel=1e-12)
    assert float(low[2, 0, 7, 7]) == pytest.approx(float(x[2, 0, 4:, 4:].mean()), rel=1e-12)
    rgb = control_map(x.repeat(1, 3, 1, 1), "lowres", 2)  # RGB is averaged to grey
    torch.testing.assert_close(rgb, low)
    step = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    step[..., 3:] = 1.0
    edges = control_map(step, "edges")
    # Sobel x of a unit step: 4 on the two columns beside it, 0 elsewhere; /4 -> 1
    assert edges[0, 0, 2, 2:4].sub(1).abs().max() < 1e-5 and edges[0, 0, :, 0].abs().max() < 1e-5
    with pytest.raises(ValueError, match="unknown"):
        control_map(x, "depth")
    c = control_map(x, "lowres", 2)
    assert control_accuracy(x, c, "lowres", 2) == 1.0
    assert control_accuracy(x, c[[1, 2, 0]], "lowres", 2) == 0.0


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from onestep.denoisers.sd import TextEncoder, load_sd

    folder = make_tiny_sd15(tmp_path_factory.mktemp("sd15"))
    parts = load_sd(folder, "sd15")
    cond = TextEncoder(folder, "sd15").cond(["a red cube", "a blue ball"])
    return folder, parts, cond


def test_controlnet_from_the_unet_starts_as_the_student_and_trains_alone(tiny_sd, tmp_path):
    _, parts, cond = tiny_sd
    student = parts.denoiser
    gc = compose(["experiment=digits_t2i_nct"]).generator
    net = NCT.shape_generator(gc, student).requires_grad_(True)  # trainable, as the trainer's generator copy is
    assert net is not student and student.controlnet is None and net.controlnet is not None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *student.data_shape, generator=g)
    t = torch.full((2,), 0.9)
    control = torch.rand(2, 1, 16, 16, generator=g)
    controlled = with_control(cond, control)
    assert CONTROL in controlled and controlled.null(1)[CONTROL].abs().max() == 0
    with torch.no_grad():
        plain, ctrl = student(x, t, cond), net(x, t, controlled)
    torch.testing.assert_close(ctrl, plain, rtol=0, atol=1e-6)  # zero-initialised output convolutions

    # three steps of the adapter's optimiser (the zero convolutions, then the control embedding's zero output conv,
    # then everything moves): the output now depends on the control, the base did not move
    params = [p for n, p in net.named_parameters() if n.startswith("controlnet.")]
    base = {n: p.detach().clone() for n, p in net.named_parameters() if not n.startswith("controlnet.")}
    opt = torch.optim.SGD(params, lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        with adapter_only(net):
            loss = (net(x, t, controlled) - 1).pow(2).mean()
        assert torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is None for n, p in net.named_parameters() if not n.startswith("controlnet."))
        opt.step()
    with torch.no_grad():
        moved = net(x, t, controlled)
        other = net(x, t, with_control(cond, control.flip(0)))
    assert (moved - plain).abs().max() > 1e-6 and (moved - other).abs().max() > 1e-7
    assert all(torch.equal(p, base[n]) for n, p in net.named_parameters() if not n.startswith("controlnet."))

    # the same adapter from a local ControlNetModel folder
    net.controlnet.save_pretrained(str(tmp_path / "cn"))
    gc.control_adapter = str(tmp_path / "cn")
    loaded = NCT.shape_generator(gc, student)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, controlled), moved, rtol=0, atol=1e-6)
    gc.control_adapter = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="ControlNetModel folder"):
        NCT.shape_generator(gc, student)


def test_bad_input_is_one_line():
    from onestep.denoisers.nets import MLPDenoiser  # noqa: F401  (a student without a UNet)

    with pytest.raises(ConfigError, match="objective.base"):
        NCT(NCTConfig(), None)
    with pytest.raises(ConfigError, match="objective.control='depth'"):
        NCT(NCTConfig(base="x", control="depth"), None)
    with pytest.raises(ConfigError, match="noise_steps"):
        NCT(NCTConfig(base="x", noise_steps=0), None)
    gc = compose(["experiment=gmm_dmd2", "generator.control_adapter=unet"]).generator
    with pytest.raises(ConfigError, match="no UNet"):
        NCT.shape_generator(gc, torch.nn.Linear(1, 1))


def test_a_few_steps_on_the_digits_teacher_train_the_adapter_only(tmp_path):
    """3 steps of the experiment's config from a base file (here the teacher's own UNet as a 1-step generator), logging
    every 2 steps: every logged value finite, the control accuracies computed on the log steps (2 and the last) and
    not on step 1 (they cost two generator passes), the checkpoint's base weights exactly the base file's."""
    from onestep import checkpoint
    from onestep.denoisers.sd import load_sd

    base = {k: v.contiguous() for k, v in load_sd(asset("digits_t2i"), "sd15").denoiser.state_dict().items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    _, seen = logged_train(["experiment=digits_t2i_nct", f"objective.base={tmp_path / 'base.safetensors'}",
                            "trainer.steps=3", "trainer.batch_size=8", "trainer.checkpoint_every=3",
                            "eval.num_samples=16"], tmp_path, log_every=2)
    assert len(seen) == 3
    assert "gen/control_acc" not in seen[0] and "gen/base_control_acc" not in seen[0]
    assert all(0 <= float(logs["gen/control_acc"]) <= 1 and 0 <= float(logs["gen/base_control_acc"]) <= 1
               for logs in seen[1:])
    trained = checkpoint.role_weights(checkpoint.list_checkpoints(tmp_path / "run")[-1], "generator")
    assert any(k.startswith("controlnet.") for k in trained)
    assert all(torch.equal(trained[k], v) for k, v in base.items())
