"""Objectives, one per file. Importing this package registers each objective's config with Hydra."""

from onestep.objectives import dmd2  # noqa: F401  (registers)
from onestep.objectives.base import OBJECTIVES, make_objective

__all__ = ["OBJECTIVES", "make_objective"]
