"""HiPA (onestep/objectives/hipa.py): the Fourier high-pass against an explicit float64 DFT, the loss and its
gradient against a transcription (teacher many-step DDIM output from the same noise, spatial + high-frequency terms),
bad input, and a short LoRA run on the shipped text-to-image digits teacher."""

from __future__ import annotations

import math

import pytest
import torch

from onestep.core import Batch, Nets
from onestep.denoisers.base import Denoiser
from onestep.denoisers.nets import MLPDenoiser
from onestep.errors import ConfigError
from onestep.generator import Student
from onestep.objectives.hipa import HiPA, HiPAConfig, high_frequency, high_pass_mask
from onestep.sampling import sample
from onestep.schedules import make_schedule


def dft(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * k[:, None] * k[None, :] / n)


def explicit_high_pass(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Re W_h^-1 (M . (W_h x W_w^T)) W_w^-T with explicit DFT matrices; M from the frequencies k / n folded to
    [-1/2, 1/2) and measured in units of the Nyquist frequency 1/2."""
    h, w = x.shape[-2:]
    fy = torch.tensor([(k if k < h - h // 2 else k - h) / h for k in range(h)], dtype=torch.float64) * 2
    fx = torch.tensor([(k if k < w - w // 2 else k - w) / w for k in range(w)], dtype=torch.float64) * 2
    mask = ((fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() >= cutoff).to(torch.complex128)
    wh, ww = dft(h), dft(w)
    spec = wh @ x.to(torch.complex128) @ ww.T
    return (torch.linalg.inv(wh) @ (mask * spec) @ torch.linalg.inv(ww.T)).real


@pytest.mark.parametrize("shape", [(8, 8), (6, 5)])
def test_high_pass_is_the_explicit_dft_filter(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, *shape, generator=gen, dtype=torch.float64)
    for cutoff in (0.1, 0.5, 0.9):
        assert torch.allclose(high_frequency(x, cutoff), explicit_high_pass(x, cutoff), atol=1e-12)
    const = torch.full((1, 1, *shape), 3.0, dtype=torch.float64)
    assert high_frequency(const, 0.1).abs().max() < 1e-12  # the mean is low frequency
    checker = (-1.0) ** (torch.arange(8)[:, None] + torch.arange(8)[None, :]).to(torch.float64)
    assert torch.allclose(high_frequency(checker[None, None], 0.9), checker)  # Nyquist in both axes: radius sqrt(2)
    m = high_pass_mask(8, 8, 0.5)
    assert m[0, 0] == 0 and m[4, 4] == 1 and 0 < float(m.mean()) < 1


class TinyImageNet(Denoiser):
    """A 1x6x6 image denoiser whose x0 is a per-pixel affine map of x_t with a t-dependent gain."""

    prediction = "x0"

    def __init__(self, schedule, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.schedule, self.data_shape = schedule, (1, 6, 6)
        self.a = torch.nn.Parameter(torch.randn(1, 6, 6, generator=g, dtype=torch.float64) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(1, 6, 6, generator=g, dtype=torch.float64) * 0.3)

    def forward(self, x_t, t, cond=None):
        s = self.schedule.sigma(t)[:, None, None, None]
        return (x_t * self.a + self.b) / (1 + s)


def test_loss_and_gradient_are_the_transcription():
    """L = mean||x_hat - x_T||^2 + hf_weight mean||H(x_hat) - H(x_T)||^2, x_T the teacher's teacher_steps-step DDIM
    sample from the batch's noise and x_hat the one-step student's, fp64."""
    sched = make_schedule("vp_linear")
    teacher, student_net = TinyImageNet(sched, 0), TinyImageNet(sched, 1)
    student = Student(sched, steps=1)
    obj = HiPA(HiPAConfig(hf_weight=2.5, cutoff=0.6, teacher_steps=5), student.train_sample)
    noise = torch.randn(4, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    nets = Nets(teacher=teacher, generator=student_net)
    out = obj.generator_loss(nets, Batch(noise=noise), 0)
    params = list(student_net.parameters())
    ours = torch.autograd.grad(out["loss"], params)
    with torch.no_grad():
        x_t = sample(teacher, noise, sched.default_ts(5), method="ddim")
    x_hat = student_net.x0(noise * sched.prior_std(student.ts[0]), student.ts.expand(4))
    want = ((x_hat - x_t) ** 2).mean() + 2.5 * ((explicit_high_pass(x_hat, 0.6) - explicit_high_pass(x_t, 0.6)) ** 2).mean()
    assert torch.allclose(out["loss"], want, rtol=1e-10)
    for a, b in zip(ours, torch.autograd.grad(want, params)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-14)
    assert out["high_freq"] > 0 and out["spatial"] > 0


def test_bad_input_fails_in_one_line():
    from conftest import compose, one_line

    for bad, key in ((dict(cutoff=0.0), "objective.cutoff"), (dict(cutoff=1.5), "objective.cutoff"),
                     (dict(hf_weight=-1.0), "objective.hf_weight"), (dict(teacher_steps=0), "objective.teacher_steps")):
        with pytest.raises(ConfigError) as e:
            HiPA(HiPAConfig(**bad), None)
        assert key in one_line(e)
    with pytest.raises(ConfigError) as e:
        HiPA.shaped(compose(["experiment=digits_t2i_hipa"]).generator, MLPDenoiser(make_schedule("edm"), 2, hidden=8, depth=1))
    assert "image teacher" in one_line(e)


def test_digits_t2i_hipa_trains_only_the_adapter(tmp_path):
    """experiment=digits_t2i_hipa for 4 steps (tiny batch, 4 teacher steps; ~13 s): every logged loss is finite, the LoRA
    adapter moved and nothing else is trained."""
    from conftest import logged_train

    out, seen = logged_train(["experiment=digits_t2i_hipa", "trainer.steps=4", "trainer.batch_size=4",
                              "objective.teacher_steps=4", "trainer.checkpoint_every=4", "eval.num_samples=8",
                              "eval.student_steps=[1]", "eval.teacher_steps=[2]"], tmp_path)
    assert len(seen) == 4 and all(s["gen/high_freq"] > 0 for s in seen)
    gen = out["networks"].unwrapped("generator")
    trained = dict(gen.named_parameters())
    assert trained and all("lora_" in k for k in trained)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
