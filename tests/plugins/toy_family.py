"""A teacher family that lives outside onestep (test-only): proof that adding a family is one file + one experiment
yaml. ``toy_digits`` is a class-conditional UNet2DModel teacher read through the digits machinery under its own
kind name (the shipped digits UNet unless teacher.path says otherwise), trained on the digits train split,
evaluated in the digits feature space and exported through the class-conditional pipeline.

    PYTHONPATH=tests/plugins onestep train plugins=[toy_family] experiment=toy_dmd2
"""

from __future__ import annotations

from pathlib import Path

from onestep import plugins, teachers
from onestep.teachers.digits import ClassUNet


class ToyDigits(ClassUNet):
    kinds = ("toy_digits",)
    presets = {"toy_digits": {"kind": "toy_digits"}}
    what = "toy_digits teacher"


teachers.register(ToyDigits())
plugins.add_config_dir(Path(__file__).resolve().parent / "configs")
