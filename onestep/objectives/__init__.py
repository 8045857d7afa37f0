"""Objectives, one per file. Importing this package imports every module in it, and each registers its objective
(class and Hydra config node) with ``register_objective``: adding an objective is adding its file. An objective
outside onestep registers the same way from its own module, named by ``plugins=[module]`` (onestep/plugins.py)."""

import importlib
import pkgutil

from onestep.objectives.base import OBJECTIVES, make_objective, objective_class

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["OBJECTIVES", "make_objective", "objective_class"]
