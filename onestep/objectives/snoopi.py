"""SNOOPI's Proper Guidance - SwiftBrush (PG-SB; Nguyen et al. 2024, "SNOOPI: Supercharged One-step Diffusion
Distillation with Proper Guidance", Sec. 4.1), an option of the score objectives (vsd, sid, dmd, dmd2).

A fixed CFG scale in the real score makes VSD unstable across backbones; PG-SB draws the scale at random for every
training sample instead, w ~ U[w_min, w_max], which widens the teacher's output distribution the generator is matched
to (the paper's random-scale classifier-free guidance). The real score of sample i is the guided teacher at its own
w_i:  D_real,i = D(x_t, t, null) + w_i (D(x_t, t, c) - D(x_t, t, null))  (Guided with a (B,) scale). A critic that is
guided "with the teacher's scale" (VSD's fake_guidance=None, SwiftBrush's guided LoRA teacher) takes the same w_i:
SNOOPI varies the scale of both teachers together. ``objective.guidance_range=[w_min, w_max]`` turns it on; unset,
the teacher keeps teacher.guidance. Scales follow this project's convention: 1 = the conditional model.

``sample_guidance`` is also the w draw of guidance distillation (guidance_distill.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from onestep.denoisers.base import Denoiser, guided
from onestep.errors import ConfigError


def sample_guidance(n: int, lo: float, hi: float, like: torch.Tensor) -> torch.Tensor:
    """n guidance scales w ~ U[lo, hi] (fp32, on like's device), from torch's global RNG (the trainer's per-step seed;
    a leading dimension of n rows, so data-parallel ranks take their rows of the global draw)."""
    u = torch.rand(n, dtype=torch.float32)
    return (lo + (hi - lo) * u).to(like.device)


def check_guidance_range(value, key: str = "objective.guidance_range", *, lowest: float = 0.0) -> None:
    if value is None:
        return
    if len(value) != 2 or not lowest <= value[0] <= value[1]:
        raise ConfigError(f"{key}={list(value)} must be [w_min, w_max] with {lowest} <= w_min <= w_max (guidance "
                          "scales, 1 = the conditional model); pass e.g. "
                          f"{key}=[1.5,4.5]")


@dataclass
class RandomGuidanceConfig:
    #: PG-SB: [w_min, w_max], the real score's CFG scale drawn per sample from U[w_min, w_max] (SNOOPI Sec. 4.1);
    #: None = the fixed teacher.guidance
    guidance_range: Optional[list[float]] = None


class RandomGuidance:
    """The per-sample real score of PG-SB (or the trainer's fixed-scale teacher when guidance_range is unset)."""

    def __init__(self, cfg):
        check_guidance_range(cfg.guidance_range)
        self.range = None if cfg.guidance_range is None else (float(cfg.guidance_range[0]),
                                                              float(cfg.guidance_range[1]))

    @property
    def active(self) -> bool:
        return self.range is not None

    def draw(self, teacher: Denoiser, x: torch.Tensor) -> tuple[Denoiser, torch.Tensor | None]:
        """(the real score for this batch, the scales w (B,) or None): each row guided at its own w_i ~ U[range]."""
        if self.range is None:
            return teacher, None
        w = sample_guidance(x.shape[0], *self.range, like=x)
        return guided(teacher.unguided(), w), w

    @staticmethod
    def logs(w: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {} if w is None else {"pgsb_w": w.mean()}
