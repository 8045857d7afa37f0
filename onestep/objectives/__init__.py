"""Objectives, one per file. Importing this package registers each objective's config with Hydra."""

from onestep.objectives import dmd2  # noqa: F401  (registers)
from onestep.objectives import adversarial, dmd, fdistill, sid, sida, sim, vsd  # noqa: F401  (registers)
from onestep.objectives import boot, scott  # noqa: F401  (registers; consistency family)
from onestep.objectives import cd, ict, rcm, scm  # noqa: F401  (registers; consistency family)
from onestep.objectives import tcm, tscd  # noqa: F401  (registers; consistency family)
from onestep.objectives import meanflow, reflow, tbcm  # noqa: F401  (registers; trajectory family)
from onestep.objectives import guidance_distill, msd  # noqa: F401  (registers; guidance / multi-student)
from onestep.objectives import disback, phased_dmd  # noqa: F401  (registers; distribution matching)
from onestep.objectives.base import OBJECTIVES, make_objective

__all__ = ["OBJECTIVES", "make_objective"]
