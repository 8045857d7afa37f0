"""Flux (guidance-distilled MMDiT, rectified flow, CLIP + T5): the flow-transformer adapter of denoisers/flow.py;
the guidance scale is an input of the network (3.5 is FluxPipeline's default)."""

from __future__ import annotations

from onestep.denoisers.pipeline_folder import Layout
from onestep.teachers import register
from onestep.teachers.sd3 import FlowTransformer


class Flux(FlowTransformer):
    kinds = ("flux",)
    presets = {"flux": {"kind": "flux", "guidance": 3.5}}
    layouts = {"flux": Layout(("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                               "scheduler"), ("FluxPipeline",), "a Flux")}


register(Flux())
