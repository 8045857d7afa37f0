"""HiPA: high-frequency-promoting adaptation (Zhang & Hooi 2023, "HiPA: Enabling One-Step Text-to-Image Diffusion
Models via High-Frequency-Promoting Adaptation", arXiv 2311.18158).

The paper's observation: a diffusion model's one-step output lacks the high-frequency content its many-step output
has. HiPA trains one-step low-rank adaptors on the frozen model (``generator.lora``) so that the one-step output
x_hat = G(z) restores it, against the teacher's many-step output x_T from the same noise z (here the teacher's own
DDIM with ``teacher_steps`` steps and the trainer's CFG, computed per batch without gradient):
    L = L_spatial + hf_weight * L_hf,
    L_spatial = mean ||x_hat - x_T||^2,
    L_hf      = mean ||H(x_hat) - H(x_T)||^2,   H(x) = Re F^-1[ M . F[x] ],
with F the 2-D discrete Fourier transform over the last two (spatial) axes and M the high-pass mask that keeps the
frequencies whose radius |(f_y, f_x)| / f_Nyquist is at least ``cutoff`` (so H(x) is x minus its low-pass part).
Source: the paper's text was not readable from this project's sources, only its abstract and summaries ("a spatial
perceptual loss" coupled with "a high-frequency loss derived from Fourier components and edge information"). So the
two terms above are this project's reading of that description, not a transcription of the paper's equations: the
spatial term is the per-pixel squared error (the paper's perceptual network is not reproduced), H is the radial
Fourier high-pass (its edge component is not reproduced), and ``hf_weight`` / ``cutoff`` are this project's values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onestep.errors import ConfigError
from onestep.objectives.base import Batch, Nets, Objective, ObjectiveConfig, register_objective
from onestep.sampling import sample


@dataclass
class HiPAConfig(ObjectiveConfig):
    name: str = "hipa"
    #: weight of the high-frequency term L_hf against the spatial term
    hf_weight: float = 1.0
    #: the high-pass mask's radius, a fraction of the Nyquist frequency in (0, sqrt(2)): frequencies at or above it
    #: form H(x)
    cutoff: float = 0.5
    #: DDIM steps of the teacher's many-step output x_T (with the trainer's CFG)
    teacher_steps: int = 16


def high_pass_mask(height: int, width: int, cutoff: float, device=None) -> torch.Tensor:
    """M (height, width) in torch.fft.fft2's frequency layout: 1 where |(f_y, f_x)| / f_Nyquist >= cutoff, else 0."""
    fy = torch.fft.fftfreq(height, device=device, dtype=torch.float64) * 2  # in units of the Nyquist frequency 1/2
    fx = torch.fft.fftfreq(width, device=device, dtype=torch.float64) * 2
    return ((fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() >= cutoff).to(torch.float64)


def high_frequency(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """H(x) = Re F^-1[M . F[x]] over the last two axes, in fp32 or wider."""
    wdtype = torch.promote_types(x.dtype, torch.float32)
    mask = high_pass_mask(x.shape[-2], x.shape[-1], cutoff, x.device).to(wdtype)
    return torch.fft.ifft2(torch.fft.fft2(x.to(wdtype)) * mask).real


@register_objective
class HiPA(Objective):
    name = "hipa"
    Config = HiPAConfig
    networks = ("generator",)

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if cfg.hf_weight < 0:
            raise ConfigError(f"objective.hf_weight={cfg.hf_weight} must be >= 0 (the high-frequency term's weight)")
        if not 0 < cfg.cutoff < 2**0.5:
            raise ConfigError(f"objective.cutoff={cfg.cutoff} must be in (0, 1.414) (a fraction of the Nyquist "
                              "frequency); pass e.g. objective.cutoff=0.5")
        if cfg.teacher_steps < 1:
            raise ConfigError(f"objective.teacher_steps={cfg.teacher_steps} must be >= 1")

    @classmethod
    def shape_generator(cls, gc, net):
        if len(net.data_shape) < 2:
            raise ConfigError(f"objective=hipa restores the high frequencies of images, and {type(net).__name__} "
                              f"makes samples of shape {tuple(net.data_shape)} (no two spatial axes); use an image "
                              "teacher (teacher=digits, sd15, ...)")
        return net

    def teacher_output(self, nets: Nets, batch: Batch) -> torch.Tensor:
        """x_T: the teacher's ``teacher_steps``-step DDIM sample from the batch's noise, no grad."""
        ts = nets.teacher.schedule.default_ts(self.cfg.teacher_steps)
        with torch.no_grad():
            return sample(nets.teacher, batch.noise, ts, batch.cond, method="ddim")

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        x = self.generate(nets, batch)
        target = self.teacher_output(nets, batch).to(x)
        wdtype = torch.promote_types(x.dtype, torch.float32)
        spatial = (x.to(wdtype) - target.to(wdtype)).pow(2).flatten(1).mean(1).mean()
        hf = (high_frequency(x, self.cfg.cutoff) - high_frequency(target, self.cfg.cutoff)).pow(2).flatten(1).mean(1)
        hf = hf.mean()
        return {"loss": spatial + self.cfg.hf_weight * hf, "spatial": spatial, "high_freq": hf}
