"""Sana (linear-attention DiT, rectified flow, Gemma text encoder, DC-AE): the adapter of denoisers/sana.py;
exports through FlowMatchEulerDiscreteScheduler, without SanaPipeline's resolution binning."""

from __future__ import annotations

from onestep.denoisers.pipeline_folder import Layout
from onestep.denoisers.sana import load_sana
from onestep.teachers import register
from onestep.teachers.base import Parts, TextToImage


class Sana(TextToImage):
    kinds = ("sana",)
    presets = {"sana": {"kind": "sana"}}
    layouts = {"sana": Layout(("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
                              ("SanaPipeline", "SanaPAGPipeline"), "a Sana")}

    def load(self, cfg, kind, device) -> Parts:
        p = load_sana(cfg.teacher.path, device=device, resolution=cfg.teacher.resolution)
        return Parts(denoiser=p.denoiser, codec=p.codec, text=p.text, image_size=p.image_size)

    def call_extras(self, tc) -> dict:
        return {"use_resolution_binning": False}  # SanaPipeline would otherwise snap the size to its aspect bins


register(Sana())
