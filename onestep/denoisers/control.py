"""A control signal for UNet students: the conditioning field ``CONTROL`` and a ControlNet (Zhang et al. 2023, "Adding
Conditional Control to Text-to-Image Diffusion Models") that turns it into residuals of the UNet's skip connections.

    with_control(cond, c)      cond plus CONTROL = c (N, C, H, W) images of the control (any size: the adapter resizes)
    control_adapter(unet, s)   diffusers' ControlNetModel: built from the UNet (``ControlNetModel.from_unet``: a copy
                               of its encoder, zero-initialised output convolutions, so the controlled UNet starts equal
                               to the UNet) for s = "unet", or loaded from a local ControlNetModel folder s
    control_residuals(...)     the ControlNet's down / mid residuals, as UNet2DConditionModel takes them

Noise Consistency Training (objectives/nct.py) trains such an adapter on a frozen one-step student.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from onestep.conditioning import Cond
from onestep.errors import ConfigError

CONTROL = "control"
#: the control's channels for an adapter built from the UNet: grey maps (a low-resolution map, an edge map)
CONTROL_CHANNELS = 1


def with_control(cond: Cond, control: torch.Tensor) -> Cond:
    """``cond`` plus the field CONTROL (one map per row); the null row's control is zeros (no control)."""
    if not isinstance(cond, Cond):
        raise ConfigError("a control signal rides on the prompts' conditioning, and this batch has none; use a "
                          "text-to-image teacher (teacher=sd15 / sdxl)")
    null_dev = next(iter(cond.null_fields.values())).device
    return cond._like({**cond.fields, CONTROL: control}, cond.texts,
                      {**cond.null_fields, CONTROL: torch.zeros_like(control[:1], device=null_dev)})


def control_adapter(unet, source: str, key: str = "generator.control_adapter"):
    """A ControlNetModel for ``unet``: from the UNet itself (``source="unet"``) or a local folder."""
    from diffusers import ControlNetModel

    if source == "unet":
        return ControlNetModel.from_unet(unet, conditioning_channels=CONTROL_CHANNELS)
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}='{source}' is neither 'unet' nor a ControlNetModel folder (with config.json); pass "
                          f"{key}=unet or the local folder of a diffusers ControlNet")
    net = ControlNetModel.from_pretrained(str(folder))
    if net.config.cross_attention_dim != unet.config.cross_attention_dim:
        raise ConfigError(f"{key}='{source}': the ControlNet's cross_attention_dim {net.config.cross_attention_dim} "
                          f"is not the UNet's {unet.config.cross_attention_dim}; pass a ControlNet of this UNet")
    return net


def control_image(controlnet, control: torch.Tensor, latent_size: int) -> torch.Tensor:
    """The control resized to what the adapter's conditioning embedding reads: the latent size times its stride."""
    stride = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
    size = latent_size * stride
    channels = controlnet.config.conditioning_channels
    c = control if control.shape[1] == channels else control.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    return c if c.shape[-1] == size else F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False)


def control_residuals(controlnet, x_t, timestep, text, extra, control: torch.Tensor, latent_size: int) -> dict:
    """The keyword arguments that add the ControlNet's residuals to a UNet2DConditionModel call."""
    down, mid = controlnet(x_t, timestep, encoder_hidden_states=text, added_cond_kwargs=extra,
                           controlnet_cond=control_image(controlnet, control.to(x_t), latent_size),
                           return_dict=False)
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
