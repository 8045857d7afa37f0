"""Small networks the project trains itself.

``MLPDenoiser``: an EDM-preconditioned MLP (Karras et al. 2022, Table 1) for points in R^D:
    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, class)
expressed for an arbitrary schedule through the scale-free variable x/alpha (so sigma_EDM = s/a).
Native prediction: x0. The preconditioning keeps every time well conditioned, which is what lets a
one-step generator initialized from it move quickly.
``add_guidance_input`` gives it the guidance scale w as an input (guidance distillation, objectives/guidance_distill.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from onestep.conditioning import Cond, labels_of
from onestep.denoisers.base import GUIDANCE, Denoiser
from onestep.schedules import Schedule, bcast


class FourierTime(nn.Module):
    def __init__(self, dim: int, scale: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(dim // 2, generator=g) * scale)

    def forward(self, c):
        ang = 2 * math.pi * c[:, None] * self.freqs[None].to(c.dtype)
        return torch.cat([ang.cos(), ang.sin()], 1)


class MLPDenoiser(Denoiser):
    prediction = "x0"

    def __init__(self, schedule: Schedule, dim: int, hidden: int = 256, depth: int = 4, num_classes: int = 0,
                 sigma_data: float = 0.5, time_dim: int = 64, time_scale: float = 1.0):
        super().__init__()
        self.schedule, self.data_shape, self.num_classes = schedule, (dim,), num_classes
        self.sigma_data, self.feature_dim = sigma_data, hidden
        # Fourier frequencies ~ N(0, time_scale^2): sCM (Lu & Song 2024, Sec. 4.1) traces JVP instability to large scales
        self.time = FourierTime(time_dim, scale=time_scale)
        self.label = nn.Embedding(num_classes + 1, time_dim) if num_classes else None
        self.emb = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU())
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.guidance_embed: nn.Module | None = None
        self.guidance: float | None = None

    def add_guidance_input(self, default: float) -> None:
        """Take the guidance scale w as an input (the Cond field ``GUIDANCE``; ``default`` when the conditioning has
        none): Meng et al. 2023 ("On Distillation of Guided Diffusion Models", Sec. 3.1) embed w with Fourier
        features and add it to the time embedding. The last layer starts at zero, so the net starts as it was."""
        dim = self.time.freqs.shape[0] * 2
        self.guidance_embed = nn.Sequential(FourierTime(dim, seed=1), nn.Linear(dim, dim))
        nn.init.zeros_(self.guidance_embed[1].weight)
        nn.init.zeros_(self.guidance_embed[1].bias)
        self.embedded_guidance, self.guidance = True, float(default)

    def forward(self, x_t, t, cond=None):
        x, c_skip, c_out, h = self._trunk(x_t, t, cond)
        return c_skip * x + c_out * self.out(h)

    def features(self, x_t, t, cond=None) -> torch.Tensor:
        """The last hidden layer (batch, hidden): what discriminator heads (DMD2, SiDA, LADD) read."""
        return self._trunk(x_t, t, cond)[3]

    def _trunk(self, x_t, t, cond):
        self.check_input(x_t, "x_t")
        t = self._time(t, x_t)
        a, s = bcast(self.schedule.alpha(t), x_t), bcast(self.schedule.sigma(t), x_t)
        x = x_t / a
        sig = s / a
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sig**2 + sd2)
        c_out = sig * self.sigma_data / torch.sqrt(sig**2 + sd2)
        c_in = 1 / torch.sqrt(sig**2 + sd2)
        c_noise = torch.log(sig.flatten()) / 4
        e = self.time(c_noise)
        if self.label is not None:
            labels = torch.full_like(t, self.num_classes, dtype=torch.long) if cond is None else labels_of(cond).long()
            e = e + self.label(labels)
        if self.guidance_embed is not None:
            given = isinstance(cond, Cond) and GUIDANCE in cond
            w = cond[GUIDANCE].to(t) if given else torch.full_like(t, self.guidance)
            e = e + self.guidance_embed(w)
        e = self.emb(e)
        h = self.inp(c_in * x) + e
        for blk in self.blocks:
            h = h + blk(h + e)
        return x, c_skip, c_out, h
