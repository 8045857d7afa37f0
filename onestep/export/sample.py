"""`onestep sample`: images from a trained student (a run folder) or from an export folder.

Noise is drawn as diffusers' pipelines draw it: one ``torch.Generator("cpu").manual_seed(seed)``, first the
initial latents (n, C, H, W), then one draw per re-noising step; so `onestep sample` on a run and the exported
pipeline called with the same seed give the same images. Class-conditional students get labels ``class_label``
or ``i % num_classes``; text students ``[prompt] * n``. The result is (n, C, H, W) in [0, 1], written as a PNG
grid or as a safetensors file with one tensor ``images``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from onestep.conditioning import Labels
from onestep.errors import ConfigError
from onestep.eval.runs import Run
from onestep.export.pipelines import EXPORT_FILE, GLOBAL_RENOISE

SUFFIXES = (".png", ".safetensors")


def check_request(num: int, out, steps: int | None) -> Path:
    if num < 1:
        raise ConfigError(f"num={num} must be >= 1 (the number of images)")
    if steps is not None and steps < 1:
        raise ConfigError(f"steps={steps} must be >= 1 (or unset for the student's own step count)")
    if not out or Path(out).suffix.lower() not in SUFFIXES:
        raise ConfigError(f"out={out!r} must end in .png (a grid) or .safetensors (tensor 'images', (n, C, H, W) "
                          "in [0, 1])")
    return Path(out).expanduser()


def conditioning(run: Run, num: int, prompt: str | None, class_label: int | None):
    setup = run.setup
    if setup.conditioner is not None:
        if class_label is not None:
            raise ConfigError("class_label is for class-conditional students; this run is text-to-image: "
                              "pass prompt=\"...\"")
        if not prompt:
            raise ConfigError("this run is text-to-image: pass prompt=\"...\" (e.g. prompt=\"a handwritten seven\")")
        return setup.conditioner([prompt] * num)
    if prompt:
        raise ConfigError("prompt is for text-to-image students; this run is class-conditional: pass class_label=<k>"
                          if setup.num_classes else "prompt is for text-to-image students; this run is unconditional")
    if not setup.num_classes:
        if class_label is not None:
            raise ConfigError("class_label is for class-conditional students; this run is unconditional")
        return None
    if class_label is None:
        labels = torch.arange(num) % setup.num_classes
    elif not 0 <= class_label < setup.num_classes:
        raise ConfigError(f"class_label={class_label} is not a class of this run; use 0..{setup.num_classes - 1}")
    else:
        labels = torch.full((num,), int(class_label))
    return Labels(labels, setup.num_classes)


@torch.no_grad()
def sample_run(run: Run, num: int, seed: int, prompt: str | None = None, class_label: int | None = None,
               steps: int | None = None) -> torch.Tensor:
    shape = tuple(run.setup.teacher.data_shape)
    if len(shape) != 3:
        raise ConfigError(f"run '{run.path}' generates {shape}-shaped points, not images; onestep sample makes "
                          "images (evaluate point teachers with onestep bench)")
    cond = conditioning(run, num, prompt, class_label)
    device = next(run.generator.parameters()).device
    rng = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn((num, *shape), generator=rng, dtype=torch.float32).to(device)
    if cond is not None:
        cond = cond.to(device)
    if run.cfg.teacher.kind in GLOBAL_RENOISE:  # as their pipelines: re-noising from the (re)seeded global RNG
        rng = torch.Generator("cpu").manual_seed(int(seed))
    x = run.student().sample(run.generator, noise, cond, steps, rng)
    if run.setup.codec is not None:
        x = run.setup.codec.decode(x)
    return (x.float().cpu() / 2 + 0.5).clamp(0, 1)


def is_export(folder) -> bool:
    return (Path(folder) / EXPORT_FILE).is_file()


@torch.no_grad()
def sample_export(folder, num: int, seed: int, prompt: str | None = None, class_label: int | None = None,
                  steps: int | None = None, device: str = "cpu") -> torch.Tensor:
    """The export's own documented call through plain diffusers (what a user of the folder runs)."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    info = json.loads((folder / EXPORT_FILE).read_text(encoding="utf-8"))
    kwargs = {"custom_pipeline": str(folder), "trust_remote_code": True} if info.get("custom_pipeline") else {}
    pipe = DiffusionPipeline.from_pretrained(str(folder), **kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)
    if info.get("lora"):
        pipe.load_lora_weights(str(folder))
    call = dict(info["call"])
    if steps is not None:
        call.pop("timesteps", None)
        call["num_inference_steps"] = steps
    if info.get("prompted"):
        if class_label is not None or not prompt:
            raise ConfigError(f"export '{folder}' is text-to-image: pass prompt=\"...\" (not class_label)")
        call["prompt"] = [prompt] * num
    else:
        if prompt:
            raise ConfigError(f"export '{folder}' is class-conditional: pass class_label=<k>, not prompt")
        call["batch_size"] = num
        if class_label is not None:
            call["class_labels"] = [int(class_label)] * num
    if info.get("reseed_global"):
        torch.manual_seed(int(seed))
    out = pipe(**call, generator=torch.Generator("cpu").manual_seed(int(seed)), output_type="pt")
    return out.images.float().cpu()


def write_images(images: torch.Tensor, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    if out.suffix.lower() == ".safetensors":
        save_file({"images": images.contiguous()}, str(tmp))
    else:
        from torchvision.utils import save_image

        save_image(images, str(tmp), nrow=max(1, min(len(images), int(len(images) ** 0.5 + 0.999))), padding=1)
    tmp.replace(out)
    return out
