"""Stable Diffusion 3 (MMDiT, rectified flow, CLIP x2 + T5): the flow-transformer adapter of denoisers/flow.py;
exports through FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

from onestep.denoisers.flow import load_flow
from onestep.denoisers.pipeline_folder import Layout
from onestep.teachers import register
from onestep.teachers.base import Parts, TextToImage


class FlowTransformer(TextToImage):
    """Shared by SD3 and Flux: T5 tokens per prompt (teacher.max_sequence_length) reach the export's call, and
    their pipelines draw re-noising from torch's global RNG."""

    fields = {**TextToImage.fields, "teacher": (*TextToImage.fields["teacher"], "max_sequence_length")}
    reseed_global = True

    def load(self, cfg, kind, device) -> Parts:
        tc = cfg.teacher
        # guidance-distilled Flux takes the scale as an input: the bare networks get teacher.guidance too
        p = load_flow(tc.path, kind, device=device, resolution=tc.resolution, guidance=tc.guidance,
                      max_sequence_length=tc.max_sequence_length)
        return Parts(denoiser=p.denoiser, codec=p.codec, text=p.text, image_size=p.image_size)

    def call_extras(self, tc) -> dict:
        return {"max_sequence_length": int(tc.max_sequence_length)} if tc.max_sequence_length else {}


class SD3(FlowTransformer):
    kinds = ("sd3",)
    presets = {"sd3": {"kind": "sd3"}}
    layouts = {"sd3": Layout(("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                              "text_encoder_3", "tokenizer_3", "scheduler"), ("StableDiffusion3Pipeline",), "an SD3")}


register(SD3())
