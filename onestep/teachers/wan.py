"""Wan 2.1 / 2.2 text-to-video (WanTransformer3DModel, rectified flow, UMT5, the causal 3-D VAE): the adapter of
denoisers/wan.py; Wan 2.2 A14B's two experts are one denoiser that routes each row by its timestep."""

from __future__ import annotations

from onestep.denoisers.pipeline_folder import Layout
from onestep.denoisers.wan import KIND, load_wan
from onestep.errors import ConfigError
from onestep.teachers import register
from onestep.teachers.base import Family, Parts


class Wan(Family):
    kinds = (KIND,)
    presets = {"wan": {"kind": KIND}}
    fields = {"teacher": ("path", "negative_prompt", "resolution", "max_sequence_length", "num_frames", "guidance_2"),
              "generator": ("attention",)}
    layouts = {KIND: Layout(("transformer", "vae", "text_encoder", "tokenizer", "scheduler"), ("WanPipeline",),
                            "a Wan")}
    data_kinds = ("prompts",)
    data_hint = "text prompts: use data=prompts (data.path=<prompts.txt>)"
    evaluation = "text_videos"
    network = "transformer"

    def load(self, cfg, kind, device) -> Parts:
        tc = cfg.teacher
        if tc.guidance_2 is not None and tc.guidance_2 != tc.guidance:
            # Guided applies one scale at every t; a second scale for the low-noise expert would need a t-dependent
            # scale there, which no objective's guided teacher carries
            raise ConfigError(f"teacher.guidance_2={tc.guidance_2} (WanPipeline's guidance_scale_2) differs from "
                              f"teacher.guidance={tc.guidance}; onestep guides both Wan 2.2 experts with "
                              "teacher.guidance: set teacher.guidance_2=null")
        p = load_wan(tc.path, device=device, resolution=tc.resolution, num_frames=tc.num_frames,
                     max_sequence_length=tc.max_sequence_length)
        return Parts(denoiser=p.denoiser, codec=p.codec, text=p.text, image_size=p.image_size)

    def pipeline(self, kind: str) -> str:
        return self.layouts[kind].pipelines[0]

    def call_extras(self, tc) -> dict:
        return {}


register(Wan())
