"""Wan 2.1 / 2.2 text-to-video (WanTransformer3DModel, rectified flow, UMT5, the causal 3-D VAE): the adapter of
denoisers/wan.py; Wan 2.2 A14B's two experts are one denoiser that routes each row by its timestep."""

from __future__ import annotations

from onestep.denoisers.pipeline_folder import Layout
from onestep.denoisers.wan import KIND, NUM_FRAMES, load_wan
from onestep.teachers import register
from onestep.teachers.base import Family, Parts


class Wan(Family):
    kinds = (KIND,)
    presets = {"wan": {"kind": KIND}}
    fields = {"teacher": ("path", "negative_prompt", "resolution", "max_sequence_length", "num_frames", "guidance_2"),
              "generator": ("attention",)}
    layouts = {KIND: Layout(("transformer", "vae", "text_encoder", "tokenizer", "scheduler"), ("WanPipeline",),
                            "a Wan")}
    data_kinds = ("prompts", "video_text", "moving_digits_text")
    data_hint = ("text: use data=prompts (data.path=<prompts.txt>) or data=video_text (data.path=<folder of videos + "
                 ".txt captions>, for objectives that read real data; data=moving_digits_text for the shipped "
                 "moving-digits teacher)")
    evaluation = "text_videos"
    network = "transformer"
    export_scheduler = "flow_steps"
    #: WanPipeline passes no generator to scheduler.step: a renoise student's draws come from torch's global RNG
    reseed_global = True

    def load(self, cfg, kind, device) -> Parts:
        tc = cfg.teacher
        # the low-noise expert's scale reaches Guided(teacher, teacher.guidance) through WanDenoiser.guidance_at
        scales = None if tc.guidance_2 is None else (tc.guidance, tc.guidance_2)
        p = load_wan(tc.path, device=device, resolution=tc.resolution, num_frames=tc.num_frames,
                     max_sequence_length=tc.max_sequence_length, guidance_scales=scales)
        return Parts(denoiser=p.denoiser, codec=p.codec, text=p.text, image_size=p.image_size)

    def pipeline(self, kind: str) -> str:
        return self.layouts[kind].pipelines[0]

    def call_extras(self, tc) -> dict:
        # the video's length, and the prompt tokens the student was trained with (WanPipeline: 81 frames, 512 tokens)
        extras = {"num_frames": int(tc.num_frames or NUM_FRAMES)}
        return {**extras, "max_sequence_length": int(tc.max_sequence_length)} if tc.max_sequence_length else extras

    def student_components(self, net) -> dict:
        if getattr(net, "transformer_2", None) is None:
            return {}
        return {"transformer": net.transformer, "transformer_2": net.transformer_2}


register(Wan())
