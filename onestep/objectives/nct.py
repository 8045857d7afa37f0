"""Noise Consistency Training (Luo, Xue, Hu & Tang 2025, "Noise Consistency Training: A Native Approach for One-Step
Generator in Learning Additional Controls", arXiv 2506.19741; official code Luo-Yihong/NCT).

A pre-trained one-step generator f_theta(z) gets a new control c through an adapter phi, f_{theta,phi}(z, c), with
neither the original training images nor a new distillation. The control comes from a control model h applied to
the generator's own samples, c = h(f_theta(z)) (onestep/rewards/control.py: a low-resolution or an edge map of the
decoded image), which couples the noise z with c. NCT diffuses the noise, not the data, with a variance-preserving
process that keeps every z_t standard normal (so f can read it) while its dependence on c fades:
    z_t = sqrt(1 - sigma_t^2) z + sigma_t eps,   sigma_0 = 0 (z_0 = z, fully coupled), sigma_1 = 1 (z_1 = eps, free).
Two losses, each a squared L2 distance d on the generator's output (the paper leaves d generic):
    boundary      L_B  = d(f_{theta,phi}(z, c), f_theta(z))                at t = 0 the coupled noise already gives a
                                                                           sample that has control c: keep it
    consistency   L_NC = d(f_{theta,phi}(z_t, c), sg[f_{theta,phi}(z_s, c)])   s = t - 1/N on an N-point grid, one eps
                                                                           for both, the less noisy side as target
and L = L_NC + lambda_B L_B (``boundary_weight``). Consistency propagates the boundary from t = 0 out to t = 1, where
the generator's input is independent of c: f_{theta,phi}(eps, c) then draws samples that follow c, which is how it
is used. Only phi trains: the base (the generator's weights read from ``objective.base``, another run) stays frozen,
and phi is a ControlNet on the student's UNet (generator.control_adapter, denoisers/control.py), zero-initialised so
that f_{theta,phi}(., c) = f_theta at the start.

Logged on log steps only (``Objective.logged``: they cost two more generator passes and decodes): ``control_acc``, the
control accuracy of samples drawn from fresh noise for the batch's controls (rewards/control.py: 1-of-N identification
of each sample's control among the batch's; chance 1 / N), and ``base_control_acc``, the same for the frozen base (no
control): what the adapter adds.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from onestep.core import Batch, Nets
from onestep.denoisers.control import with_control
from onestep.errors import ConfigError
from onestep.objectives.base import Objective, ObjectiveConfig, register_objective
from onestep.rewards.control import CONTROLS, control_accuracy, control_map

#: the parameters of the control adapter (the rest of the generator is the frozen base)
ADAPTER = "controlnet."


@dataclass
class NCTConfig(ObjectiveConfig):
    name: str = "nct"
    #: the pre-trained one-step generator f_theta: a run folder (its newest generator_ema), a checkpoint folder or a
    #: .safetensors file of the same teacher and generator config, e.g. a finished experiment=digits_t2i_dmd2 run
    base: Optional[str] = None
    #: the control h(x) of a decoded sample: lowres (its size x size average) | edges (Sobel magnitude)
    control: str = "lowres"
    #: the grid of the lowres map
    control_size: int = 4
    #: lambda_B of L = L_NC + lambda_B L_B
    boundary_weight: float = 1.0
    #: N: the noise-level grid t = n / N of the consistency pairs (t, t - 1/N), sigma_t = t
    noise_steps: int = 20


@contextmanager
def adapter_only(generator):
    """The base parameters take no gradient for the duration, only the adapter's; AdamW skips parameters without a
    gradient, so the base stays the pre-trained generator."""
    base = [p for n, p in generator.named_parameters() if not n.startswith(ADAPTER) and p.requires_grad]
    for p in base:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in base:
            p.requires_grad_(True)


def vp_noise(z: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(1 - sigma_t^2) z + sigma_t eps, sigma (N,) per row."""
    s = sigma.view(-1, *([1] * (z.ndim - 1))).to(z)
    return torch.sqrt(1 - s**2) * z + s * eps


def nct_losses(f, base_x: torch.Tensor, z: torch.Tensor, eps: torch.Tensor, n: torch.Tensor, steps: int):
    """(L_NC, L_B) for rows with grid indices n in 1..N: f(z) -> sample is f_{theta,phi}(., c) of each row's control,
    base_x = f_theta(z) (no grad)."""
    t, s = n.double() / steps, (n.double() - 1) / steps
    z_t, z_s = vp_noise(z, eps, t), vp_noise(z, eps, s)
    both = f(torch.cat([z_t, z]))  # the consistency side and the boundary side in one pass
    on_t, on_0 = both.chunk(2)
    with torch.no_grad():
        target = f(z_s)
    wdtype = torch.promote_types(on_t.dtype, torch.float32)
    consistency = (on_t.to(wdtype) - target.to(wdtype)).pow(2).flatten(1).mean(1).mean()
    boundary = (on_0.to(wdtype) - base_x.to(wdtype)).pow(2).flatten(1).mean(1).mean()
    return consistency, boundary


@register_objective
class NCT(Objective):
    name = "nct"
    Config = NCTConfig
    networks = ("generator",)
    generator_keys = ("control_adapter",)

    @classmethod
    def shape_generator(cls, gc, net):
        if gc.control_adapter is None:
            return net  # (the loss names the key to set)
        if not hasattr(net, "add_control") or gc.lora.rank is not None:
            raise ConfigError(f"generator.control_adapter={gc.control_adapter} puts a ControlNet on a UNet student; "
                              f"{type(net).__name__}{' with generator.lora' if gc.lora.rank is not None else ''} has "
                              "no UNet to put it on (use teacher=sd15 / sdxl without LoRA)")
        net = copy.deepcopy(net)  # (the init is shared: the teacher itself for image teachers)
        net.add_control(gc.control_adapter)
        return net

    @classmethod
    def export_refusal(cls, gc):
        if gc.control_adapter is not None:
            return (f"generator.control_adapter={gc.control_adapter}: the student reads a control map through a "
                    "ControlNet, which the text-to-image pipeline has no input for")
        return None

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if not cfg.base:
            raise ConfigError("objective=nct adds a control to a pre-trained one-step generator; pass objective.base="
                              "<run folder of a one-step student of this teacher> (e.g. a finished "
                              "experiment=digits_t2i_dmd2 run)")
        if cfg.control not in CONTROLS:
            raise ConfigError(f"objective.control='{cfg.control}' is unknown; choose one of {CONTROLS}")
        if cfg.noise_steps < 1 or cfg.control_size < 1 or cfg.boundary_weight < 0:
            raise ConfigError(f"objective.noise_steps={cfg.noise_steps}, objective.control_size={cfg.control_size} "
                              f"must be >= 1 and objective.boundary_weight={cfg.boundary_weight} >= 0")
        self.codec = None

    def run_weights(self):
        return {"base": self.cfg.base}

    def build_modules(self, setup):
        self.codec = setup.codec  # controls are maps of decoded images
        return {}

    def prepare(self, nets: Nets, weights=None) -> None:
        if not weights or "base" not in weights:
            raise ConfigError(f"objective.base='{self.cfg.base}' was not read: the caller of prepare passes the "
                              "weights run_weights() names (onestep.checkpoint.read_run_weights)")
        load_base(nets.generator, weights["base"], self.cfg.base)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        if self.codec is None:
            return x
        return self.codec.decode(x.to(self.codec.device, self.codec.dtype)).to(x.dtype)

    def controls(self, x: torch.Tensor) -> torch.Tensor:
        return control_map(self.images(x), self.cfg.control, self.cfg.control_size)

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        if not any(n.startswith(ADAPTER) for n, _ in nets.generator.named_parameters()):
            raise ConfigError("objective=nct trains a control adapter on the student; pass "
                              "generator.control_adapter=unet (or a local ControlNetModel folder)")
        z, cond = batch.noise, batch.cond
        with torch.no_grad():
            base_x = self.generate(nets, batch)  # f_theta(z): the conditioning has no control, the adapter is off
            c = self.controls(base_x)
        controlled = with_control(cond, c)

        def f(noise):
            k = noise.shape[0] // z.shape[0]
            rows = controlled if k == 1 else type(controlled).cat([controlled] * k)
            return self.generate(nets, Batch(noise=noise, cond=rows))

        n = torch.randint(1, self.cfg.noise_steps + 1, (z.shape[0],), device=z.device)
        eps = torch.randn_like(z)
        with adapter_only(nets.generator):
            consistency, boundary = nct_losses(f, base_x, z, eps, n, self.cfg.noise_steps)
        out = {"loss": consistency + self.cfg.boundary_weight * boundary, "consistency": consistency.detach(),
               "boundary": boundary.detach()}
        if self.logged(step):  # two more generator passes and decodes: on the steps whose logs are read only
            with torch.no_grad():  # samples from fresh noise, the way the adapted generator is used
                fresh = torch.randn_like(z)
                acc = control_accuracy(self.images(f(fresh)), c, self.cfg.control, self.cfg.control_size)
                base_acc = control_accuracy(self.images(self.generate(nets, Batch(noise=fresh, cond=cond))), c,
                                            self.cfg.control, self.cfg.control_size)
            out |= {"control_acc": z.new_tensor(acc), "base_control_acc": z.new_tensor(base_acc)}
        return out


def load_base(generator, weights: dict[str, torch.Tensor], path: str) -> None:
    """Copies the base generator's weights into every parameter of ``generator`` but the adapter's."""
    own = {n: p for n, p in generator.named_parameters() if not n.startswith(ADAPTER)}
    bad = sorted(n for n, p in own.items() if n not in weights or weights[n].shape != p.shape)
    if bad:
        raise ConfigError(f"objective.base: '{path}' does not fit this run's generator ({len(bad)} of {len(own)} "
                          f"parameters missing or of another shape, e.g. {bad[0]}); pass a one-step student run of the "
                          "same teacher and generator config")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(weights[n].to(p))
