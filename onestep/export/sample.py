"""`onestep sample`: images (or videos) from a trained student (a run folder) or from an export folder.

Noise is drawn as diffusers' pipelines draw it: one ``torch.Generator("cpu").manual_seed(seed)``, first the
initial latents (n, C, H, W), then one draw per re-noising step; so `onestep sample` on a run and the exported
pipeline called with the same seed give the same images. Class-conditional students get labels ``class_label``
or ``i % num_classes``; text students ``[prompt] * n``. The result is (n, C, H, W) in [0, 1], written as a PNG
grid or as a safetensors file with one tensor ``images``; a video teacher's (4-D latents: onestep.data.video) is
(n, C, F, H, W) in [0, 1], written as an animated GIF or MP4 grid or as a safetensors file with one tensor ``videos``.

``negative_prompt`` (SD1.x/2.x and SDXL UNet students, run or export folders) runs the student with NASA
(onestep.denoisers.nasa: SNOOPI's Negative-Away Steer Attention, Z = Z+ - nasa_scale Z- in every cross-attention
layer), a negative prompt that works in one step; the export folder's pipeline stays plain diffusers, so NASA is an
option of this command (or of ``nasa_attention(pipe.unet, ...)``), not part of the folder.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file

from onestep.conditioning import Labels
from onestep.data.video import VIDEO_SUFFIXES, require_mp4, write_video
from onestep.denoisers.nasa import DEFAULT_SCALE, check_scale, nasa_attention
from onestep.errors import ConfigError
from onestep import teachers
from onestep.export.pipelines import EXPORT_FILE
from onestep.runs import Run

SUFFIXES = (".png", ".safetensors", *VIDEO_SUFFIXES)


def check_request(num: int, out, steps: int | None) -> Path:
    if num < 1:
        raise ConfigError(f"num={num} must be >= 1 (the number of images)")
    if steps is not None and steps < 1:
        raise ConfigError(f"steps={steps} must be >= 1 (or unset for the student's own step count)")
    if not out or Path(out).suffix.lower() not in SUFFIXES:
        raise ConfigError(f"out={out!r} must end in .png (a grid) or .safetensors (tensor 'images', (n, C, H, W) "
                          "in [0, 1]); video students: .gif or .mp4 (an animated grid) or .safetensors (tensor "
                          "'videos', (n, C, F, H, W))")
    if Path(out).suffix.lower() == ".mp4":  # before any model loads
        require_mp4(out)
    return Path(out).expanduser()


def check_nasa_request(negative_prompt: str | None, nasa_scale: float | None) -> float | None:
    """NASA's alpha for this request (None: no negative prompt)."""
    if negative_prompt is None:
        if nasa_scale is not None:
            raise ConfigError(f"nasa_scale={nasa_scale} needs a negative prompt to steer away from; pass "
                              "negative_prompt=\"...\" (NASA, text-to-image UNet students) or drop nasa_scale")
        return None
    return DEFAULT_SCALE if nasa_scale is None else check_scale(nasa_scale)


def run_nasa(run: Run, negative_prompt: str | None, nasa_scale: float | None):
    """The context in which the run's generator steers away from ``negative_prompt`` (a no-op without one)."""
    scale = check_nasa_request(negative_prompt, nasa_scale)
    if scale is None:
        return nullcontext()
    if run.setup.conditioner is None:
        raise ConfigError("negative_prompt is for text-to-image students (NASA steers their cross-attention); this "
                          f"run is {'class-conditional' if run.setup.num_classes else 'unconditional'}")
    kind = run.cfg.teacher.kind
    if not teachers.family(kind).nasa:
        nasa = " or ".join(k for k in teachers.kinds() if teachers.family(k).nasa)
        raise ConfigError(f"negative_prompt (NASA) needs a UNet student with cross-attention (teacher={nasa}); "
                          f"this run's teacher is {kind}")
    negative = run.setup.conditioner.text.encode([negative_prompt])["prompt_embeds"]
    return nasa_attention(run.generator, negative, scale, what=f"the generator of run '{run.path}'")


def conditioning(run: Run, num: int, prompt: str | None, class_label: int | None):
    setup = run.setup
    if setup.conditioner is not None:
        if class_label is not None:
            raise ConfigError("class_label is for class-conditional students; this run is text-to-image: "
                              "pass prompt=\"...\"")
        if not prompt:
            raise ConfigError("this run is text-to-image: pass prompt=\"...\" (e.g. prompt=\"a handwritten seven\")")
        # encoded here, not read from the run's embedding cache: that holds the training prompts only
        c = setup.conditioner
        fields = {k: v.expand(num, *v.shape[1:]) for k, v in c.text.encode([prompt]).items()}
        return c.text.assemble([prompt] * num, fields, c.negative_prompt, c.size, c.size)
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
               steps: int | None = None, negative_prompt: str | None = None,
               nasa_scale: float | None = None) -> torch.Tensor:
    shape = tuple(run.setup.teacher.data_shape)
    if len(shape) not in (3, 4):
        raise ConfigError(f"run '{run.path}' generates {shape}-shaped points, not images; onestep sample makes "
                          "images and videos (evaluate point teachers with onestep bench)")
    cond = conditioning(run, num, prompt, class_label)
    steer = run_nasa(run, negative_prompt, nasa_scale)
    device = next(run.generator.parameters()).device
    rng = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn((num, *shape), generator=rng, dtype=torch.float32).to(device)
    if cond is not None:
        cond = cond.to(device)
    if teachers.family(run.cfg.teacher.kind).reseed_global:  # as its pipeline: re-noising from the reseeded global RNG
        rng = torch.Generator("cpu").manual_seed(int(seed))
    with steer:
        x = run.student().sample(run.generator, noise, cond, steps, rng)
    if run.setup.codec is not None:
        x = run.setup.codec.decode(x)
    return (x.float().cpu() / 2 + 0.5).clamp(0, 1)


def is_export(folder) -> bool:
    return (Path(folder) / EXPORT_FILE).is_file()


@torch.no_grad()
def sample_export(folder, num: int, seed: int, prompt: str | None = None, class_label: int | None = None,
                  steps: int | None = None, device: str = "cpu", negative_prompt: str | None = None,
                  nasa_scale: float | None = None) -> torch.Tensor:
    """The export's own documented call through plain diffusers (what a user of the folder runs); with a
    ``negative_prompt``, NASA installed on the pipeline's UNet around that call."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    info = json.loads((folder / EXPORT_FILE).read_text(encoding="utf-8"))
    scale = check_nasa_request(negative_prompt, nasa_scale)
    if scale is not None and not info.get("prompted"):
        raise ConfigError(f"negative_prompt is for text-to-image students (NASA steers their cross-attention); "
                          f"export '{folder}' is class-conditional")
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
    steer = nullcontext()
    if scale is not None:
        if getattr(pipe, "unet", None) is None:
            raise ConfigError(f"negative_prompt (NASA) needs a UNet student with cross-attention (SD1.x/2.x, SDXL); "
                              f"export '{folder}' holds a {type(pipe).__name__} without a unet")
        negative = pipe.encode_prompt(prompt=negative_prompt, device=pipe.device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)[0]
        steer = nasa_attention(pipe.unet, negative, scale, what=f"the unet of export '{folder}'")
    if info.get("reseed_global"):
        torch.manual_seed(int(seed))
    with steer:
        out = pipe(**call, generator=torch.Generator("cpu").manual_seed(int(seed)), output_type="pt")
    if hasattr(out, "frames"):  # video pipelines: (n, F, C, H, W) -> onestep's (n, C, F, H, W)
        return out.frames.float().cpu().transpose(1, 2)
    return out.images.float().cpu()


def write_images(images: torch.Tensor, out: Path) -> Path:
    """Images (n, C, H, W) or videos (n, C, F, H, W) in [0, 1] as ``out``'s suffix says."""
    video, suffix = images.ndim == 5, out.suffix.lower()
    if suffix != ".safetensors" and video != (suffix in VIDEO_SUFFIXES):
        raise ConfigError(f"out='{out}': these are {'videos' if video else 'images'}; write them as "
                          f"{'.gif, .mp4' if video else '.png'} or .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    if suffix == ".safetensors":
        save_file({"videos" if video else "images": images.contiguous()}, str(tmp))
    elif video:
        write_video(tmp, images * 2 - 1, nrow=max(1, min(len(images), int(len(images) ** 0.5 + 0.999))))
    else:
        from torchvision.utils import save_image

        save_image(images, str(tmp), nrow=max(1, min(len(images), int(len(images) ** 0.5 + 0.999))), padding=1)
    tmp.replace(out)
    return out
