"""Stable Diffusion 1.x / 2.x (``sd15``: one CLIP text encoder) and SDXL (``sdxl``: two, plus size ids): the UNet
adapter of denoisers/sd.py on the folder's discrete VP table; exports through LCMScheduler / DDIMScheduler, with a
single original-layout file, and NASA negative prompts at sampling."""

from __future__ import annotations

from onestep.denoisers.pipeline_folder import Layout
from onestep.denoisers.sd import load_sd
from onestep.teachers import register
from onestep.teachers.base import Parts, SingleFile, TextToImage


class StableDiffusion(TextToImage):
    kinds = ("sd15", "sdxl")
    presets = {"sd15": {"kind": "sd15"}, "sdxl": {"kind": "sdxl"}}
    layouts = {"sd15": Layout(("unet", "vae", "text_encoder", "tokenizer", "scheduler"), ("StableDiffusionPipeline",),
                              "an SD 1.x/2.x"),
               "sdxl": Layout(("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2",
                               "tokenizer_2"), ("StableDiffusionXLPipeline",), "an SDXL")}
    network = "unet"
    export_scheduler = "table"
    single_file = {"sd15": SingleFile(("unet", "vae", "text_encoder"), "cond_stage_model.transformer."),
                   "sdxl": SingleFile(("unet", "vae", "text_encoder", "text_encoder_2"),
                                      "conditioner.embedders.0.transformer.", open_clip=True)}
    nasa = True

    def load(self, cfg, kind, device) -> Parts:
        tc = cfg.teacher
        p = load_sd(tc.path, kind, device=device, resolution=tc.resolution)
        return Parts(denoiser=p.denoiser, codec=p.codec, text=p.text, image_size=p.image_size)

    def pipeline_kwargs(self, kind: str) -> dict:
        # SD 1.x folders name a safety checker; the export carries none (the student's images are the output)
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
            if kind == "sd15" else {}


register(StableDiffusion())
