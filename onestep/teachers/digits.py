"""The shipped class-conditional digits UNet (onestep/assets/digits_teacher, or teacher.path): trained on the
digits train split, evaluated by FD in the shipped digits feature space, exported through the class-conditional
pipeline (export/class_pipeline.py)."""

from __future__ import annotations

from pathlib import Path

from onestep.denoisers.diffusers import load_unet_denoiser
from onestep.teachers import register
from onestep.teachers.base import Family, Parts

#: the eval.* fields of image experiments (feature space, reference, statistics cache)
IMAGE_EVAL = ("features", "inception_path", "reference", "stats_cache")
ASSETS = Path(__file__).resolve().parent.parent / "assets"


class ClassUNet(Family):
    """A diffusers UNet2DModel folder written by denoisers.diffusers.save_unet_denoiser, class labels as
    conditioning. ``folder`` is the shipped teacher; ``data_kinds`` what it was trained on."""

    kinds = ("digits",)
    presets = {"digits": {"kind": "digits"}}
    fields = {"teacher": ("path",), "eval": IMAGE_EVAL, "generator": ("attention",)}
    data_kinds = ("digits",)
    data_hint = "the digits train split: use data=digits"
    evaluation = "digit_images"
    export_scheduler = "class"
    folder = ASSETS / "digits_teacher"
    what = "digits teacher"
    fix = "reinstall onestep, rebuild it with tools/train_digits_teacher.py, or pass teacher.path=<folder>"

    def load(self, cfg, kind, device) -> Parts:
        teacher = load_unet_denoiser(cfg.teacher.path or self.folder, self.what, self.fix)
        return Parts(denoiser=teacher, num_classes=teacher.num_classes)


register(ClassUNet())
