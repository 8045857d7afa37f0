"""Small networks the project trains itself.

``MLPDenoiser``: an EDM-preconditioned MLP (Karras et al. 2022, Table 1) for points in R^D:
    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, class)
expressed for an arbitrary schedule through the scale-free variable x/alpha (so sigma_EDM = s/a).
Native prediction: x0. The preconditioning keeps every time well conditioned, which is what lets a
one-step generator initialized from it move quickly.
``add_guidance_input`` gives it the guidance scale w as an input (guidance distillation, objectives/guidance_distill.py).
``add_shift_input`` gives it a shifted-condition branch (APEX, objectives/apex.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from onestep.conditioning import Cond, labels_of
from onestep.denoisers.base import GUIDANCE, SHIFT, Denoiser
from onestep.errors import ConfigError
from onestep.schedules import Schedule, bcast


class FourierTime(nn.Module):
    def __init__(self, dim: int, scale: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(dim // 2, generator=g) * scale)

    def forward(self, c):
        ang = 2 * math.pi * c[:, None] * self.freqs[None].to(c.dtype)
        return torch.cat([ang.cos(), ang.sin()], 1)


#: parameter-name prefix of the guidance input's modules (the adapter AGD trains with the rest frozen)
GUIDANCE_ADAPTER = "guidance_embed"


class MLPDenoiser(Denoiser):
    prediction = "x0"

    def __init__(self, schedule: Schedule, dim: int, hidden: int = 256, depth: int = 4, num_classes: int = 0,
                 sigma_data: float = 0.5, time_dim: int = 64, time_scale: float = 1.0):
        super().__init__()
        self.schedule, self.data_shape, self.num_classes = schedule, (dim,), num_classes
        self.sigma_data, self.feature_dim = sigma_data, hidden
        #: the construction arguments (besides the schedule): what ``with_arch`` changes
        self.arch = {"dim": dim, "hidden": hidden, "depth": depth, "num_classes": num_classes, "sigma_data": sigma_data,
                     "time_dim": time_dim, "time_scale": time_scale}
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
        self.shift_embed: nn.Parameter | None = None

    def add_shift_input(self) -> None:
        """A shifted-condition branch: rows whose conditioning carries ``SHIFT`` = 1 get a learned vector added to the
        time embedding. APEX (LINs-lab/APEX src/methodes/apex/apex.py:164, :357-359) feeds its flow transformer the
        negated time -t for that branch; here the time enters through the preconditioning (c_noise = log(sigma) / 4
        spans both signs on EDM), so a negated c_noise would be another noise level's embedding and the branch takes
        its own input instead. Zero at the start: the shifted branch starts as the network itself."""
        self.shift_embed = nn.Parameter(torch.zeros(self.time.freqs.shape[0] * 2))

    def with_arch(self, changes: dict, replace: bool = False) -> "MLPDenoiser":
        """A fresh MLP with ``changes`` to its width / depth / time features (generator.arch, denoisers/slim.py); the
        data dimension, classes and preconditioning are the teacher's, which the student has to share."""
        free = ("hidden", "depth", "time_dim", "time_scale")
        bad = sorted(k for k in changes if k not in free)
        if replace or bad:
            raise ConfigError(f"generator.arch: the project's MLP takes {', '.join(f'{k}=' for k in free)} (got "
                              f"{'a diffusers config .json' if replace else bad}); e.g. generator.arch='hidden=64,depth=2'")
        if not all(isinstance(changes.get(k, 1), int) and changes.get(k, 1) >= 1 for k in ("hidden", "depth", "time_dim")):
            raise ConfigError(f"generator.arch: hidden, depth and time_dim must be positive integers (got {changes})")
        return MLPDenoiser(self.schedule, **{**self.arch, **changes})

    def add_guidance_input(self, default: float, bottleneck: int = 16) -> None:
        """Take the guidance scale w as an input (the Cond field ``GUIDANCE``; ``default`` when the conditioning has
        none). Meng et al. 2023 ("On Distillation of Guided Diffusion Models", Sec. 3) embed w with Fourier
        features and add it to the time embedding (``guidance_embed.w``); AGD (Jensen & Sadat 2025) adds small
        adapters to the blocks instead, each a residual bottleneck MLP on the block's input and the w features
        (``guidance_embed.blocks``), and trains only them. Every output layer starts at zero, so the net starts as it
        was; all of it lives under ``GUIDANCE_ADAPTER``."""
        dim, hidden = self.time.freqs.shape[0] * 2, self.inp.out_features

        def zero_last(*layers):
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)
            return nn.Sequential(*layers)

        self.guidance_embed = nn.ModuleDict({
            "fourier": FourierTime(dim, seed=1),
            "w": zero_last(nn.Linear(dim, dim)),
            "blocks": nn.ModuleList(zero_last(nn.Linear(hidden + dim, bottleneck), nn.SiLU(),
                                              nn.Linear(bottleneck, hidden)) for _ in self.blocks)})
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
        if self.shift_embed is not None and isinstance(cond, Cond) and SHIFT in cond:
            shift = cond[SHIFT]
            if shift.shape != t.shape:
                raise ConfigError(f"the shift input has shape {tuple(shift.shape)}, the batch {tuple(t.shape)}: one "
                                  "flag per row (denoisers/base.py with_shift)")
            e = e + shift.to(e)[:, None] * self.shift_embed.to(e)
        adapters, g = [None] * len(self.blocks), None
        if self.guidance_embed is not None:
            given = isinstance(cond, Cond) and GUIDANCE in cond
            g = self.guidance_embed["fourier"](cond[GUIDANCE].to(t) if given else torch.full_like(t, self.guidance))
            e = e + self.guidance_embed["w"](g)
            adapters = self.guidance_embed["blocks"]
        e = self.emb(e)
        h = self.inp(c_in * x) + e
        for blk, adapter in zip(self.blocks, adapters):
            h = h + blk(h + e) + (0 if adapter is None else adapter(torch.cat([h, g.to(h)], 1)))
        return x, c_skip, c_out, h
