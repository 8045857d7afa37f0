"""DMD (Yin et al. 2024a, "One-step Diffusion with Distribution Matching Distillation").

Generator: the distribution matching gradient, eq. (7)-(8) (distribution_matching.py), plus the
regression loss on fixed noise -> teacher-ODE-sample pairs, eq. (9) with weight lambda_reg (Sec. 3.3;
the paper's 0.25), which keeps modes that the KL gradient alone can drop. Critic: DSM on generator samples,
one update per generator update (DMD has no TTUR). Pairs: ``tools/make_dmd_pairs.py`` or built at first use.
"""

from __future__ import annotations

from dataclasses import dataclass

from onestep.objectives.base import register_objective
from onestep.objectives.dmd2 import DistributionMatching, DMD2Config


@dataclass
class DMDConfig(DMD2Config):
    name: str = "dmd"
    ttur: int = 1
    regression_weight: float = 0.25


@register_objective
class DMD(DistributionMatching):
    name = "dmd"
    Config = DMDConfig
