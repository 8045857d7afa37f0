"""CogVideoX text-to-video (CogVideoXTransformer3DModel, v-prediction on a shifted zero-terminal-SNR DDIM table, T5,
the causal 3-D VAE): the adapter of denoisers/cogvideox.py."""

from __future__ import annotations

from omegaconf import OmegaConf

from onestep.denoisers.cogvideox import KIND, load_cogvideox
from onestep.denoisers.pipeline_folder import Layout
from onestep.errors import ConfigError
from onestep.teachers import register
from onestep.teachers.base import Family, Parts


class CogVideoX(Family):
    kinds = (KIND,)
    presets = {"cogvideox": {"kind": KIND}}
    fields = {"teacher": ("path", "negative_prompt", "resolution", "max_sequence_length", "num_frames")}
    layouts = {KIND: Layout(("transformer", "vae", "text_encoder", "tokenizer", "scheduler"), ("CogVideoXPipeline",),
                            "a CogVideoX")}
    data_kinds = ("prompts", "video_text")
    data_hint = ("text: use data=prompts (data.path=<prompts.txt>) or data=video_text (data.path=<folder of videos + "
                 ".txt captions>, for objectives that read real data)")
    evaluation = "text_videos"
    network = "transformer"
    export_scheduler = "table"
    ddim_scheduler = "CogVideoXDDIMScheduler"

    def load(self, cfg, kind, device) -> Parts:
        tc = cfg.teacher
        p = load_cogvideox(tc.path, device=device, num_frames=tc.num_frames, resolution=tc.resolution,
                           max_sequence_length=tc.max_sequence_length)
        height, width = p.denoiser.data_shape[2:]
        if OmegaConf.select(cfg, "data.kind") == "video_text" and height != width:
            # data=video_text crops clips to square frames of side image_size
            raise ConfigError(f"data=video_text makes square frames, but teacher.path '{tc.path}' generates "
                              f"{height * p.codec.downsample}x{width * p.codec.downsample} videos (its pipeline's "
                              "default size); set teacher.resolution=<square side in pixels>")
        return Parts(denoiser=p.denoiser, codec=p.codec, text=p.text, image_size=p.image_size)

    def pipeline(self, kind: str) -> str:
        return self.layouts[kind].pipelines[0]

    def call_extras(self, tc) -> dict:
        # None is the pipeline's own default, which is what the teacher was loaded with (denoisers/cogvideox.py)
        extras = {"num_frames": tc.num_frames, "height": tc.resolution, "width": tc.resolution}
        if tc.max_sequence_length:
            extras["max_sequence_length"] = int(tc.max_sequence_length)
        return extras


register(CogVideoX())
