"""iCT: consistency *training* from data with the improved techniques of Song & Dhariwal 2023.

The CD loss of cd.py with the adjacent point taken from data instead of a teacher ODE step,
x^_n = alpha_n x0 + sigma_n eps with the same eps (CM's consistency training, Alg. 3), and iCT's choices:
stop-gradient target (Sec. 3.2, no EMA), pseudo-Huber distance with c = 0.00054 sqrt(d) (Sec. 3.3, eq. 8),
the 1 / (sig_{n+1} - sig_n) weighting (Sec. 3.4), lognormal pair sampling P_mean = -1.1, P_std = 2 (eq. 7) and
the doubling discretization curriculum from 10 to 1280 levels (eq. 5-6) over ``curriculum_steps``.
Each piece is also a CD option (objective=cd objective.distance=pseudo_huber ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from onestep.objectives.base import register_objective
from onestep.objectives.cd import CDConfig, ConsistencyDistillation


@dataclass
class ICTConfig(CDConfig):
    name: str = "ict"
    solver: str = "data"
    curriculum_steps: int = 1000
    time_sampling: str = "lognormal"
    weighting: str = "inv_dsigma"
    distance: str = "pseudo_huber"
    target_ema: float = 0.0


@register_objective
class ImprovedConsistencyTraining(ConsistencyDistillation):
    name = "ict"
    Config = ICTConfig
