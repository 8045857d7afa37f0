"""A class-conditional few-step generator exported by onestep: a diffusers ``UNet2DModel`` (``class_labels``,
the last class id = "no label") sampled on a continuous-time VP schedule.

This file is copied verbatim into the export folder as ``pipeline.py`` and needs only torch and diffusers:

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    images = pipe(batch_size=16, generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images

diffusers has no class-conditional UNet pipeline, and no stock scheduler holds a continuous cosine / linear VP
schedule exactly, so the schedule is computed here in closed form from the pipeline's config: t-list
t_i = t_max + i (t_min - t_max) / k (i < k), x_{t_0} = sigma(t_0) z; per step the UNet's prediction becomes x0,
then ``renoise`` draws fresh noise (x = alpha_s x0 + sigma_s z, consistency / DMD2 style) or ``ddim`` moves
deterministically. Noise comes from ``generator`` in the order diffusers' pipelines draw it (latents first, then
one draw per re-noising step), with ``randn_tensor`` as they do.
"""

from __future__ import annotations

import math

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class FewStepClassPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet"

    def __init__(self, unet, schedule: str = "vp_cosine", cosine_s: float = 0.008, beta_min: float = 0.1,
                 beta_max: float = 20.0, t_min: float = 0.001, t_max: float = 0.999,
                 prediction_type: str = "v_prediction", timestep_scale: float = 1000.0, sampler: str = "renoise",
                 num_classes: int = 10, num_inference_steps: int = 1):
        super().__init__()
        if schedule not in ("vp_cosine", "vp_linear"):
            raise ValueError(f"schedule '{schedule}' is not one this pipeline computes (vp_cosine, vp_linear)")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type '{prediction_type}' must be epsilon, v_prediction or sample")
        if sampler not in ("renoise", "ddim"):
            raise ValueError(f"sampler '{sampler}' must be renoise or ddim")
        self.register_modules(unet=unet)
        self.register_to_config(schedule=schedule, cosine_s=cosine_s, beta_min=beta_min, beta_max=beta_max,
                                t_min=t_min, t_max=t_max, prediction_type=prediction_type,
                                timestep_scale=timestep_scale, sampler=sampler, num_classes=num_classes,
                                num_inference_steps=num_inference_steps)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if c.schedule == "vp_cosine":
            s = c.cosine_s
            f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
            alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / f0
            return torch.sqrt(alpha_bar), torch.sqrt(1 - alpha_bar)
        log_alpha = -0.25 * t**2 * (c.beta_max - c.beta_min) - 0.5 * t * c.beta_min
        return torch.exp(log_alpha), torch.sqrt(-torch.expm1(2 * log_alpha))

    def x0_eps(self, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor):
        kind = self.config.prediction_type
        if kind == "sample":
            return out, (x - a * out) / s
        if kind == "epsilon":
            return (x - s * out) / a, out
        n = a * a + s * s  # v = a eps - s x0
        return (a * x - s * out) / n, (s * x + a * out) / n

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels=None, num_inference_steps: int | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True):
        """``class_labels``: ints (one per image) or None for labels i % num_classes; ``num_inference_steps``
        defaults to the step count the student was trained for."""
        c, unet = self.config, self.unet
        k = int(num_inference_steps or c.num_inference_steps)
        device, dtype = self._execution_device, unet.dtype
        if class_labels is None:
            labels = torch.arange(batch_size) % c.num_classes
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
            if len(labels) != batch_size or bool(((labels < 0) | (labels > c.num_classes)).any()):
                raise ValueError(f"class_labels must hold {batch_size} ids in 0..{c.num_classes} "
                                 f"({c.num_classes} = no label)")
        labels = labels.to(device)
        ts = [c.t_max + i * (c.t_min - c.t_max) / k for i in range(k)]
        shape = (batch_size, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        for i, t_i in enumerate(self.progress_bar(ts)):
            t = torch.tensor(t_i, dtype=torch.float64).to(torch.float32)
            a, s = self.alpha_sigma(t)
            if i == 0:
                x = x * s
            out = unet(x.to(dtype), (t * c.timestep_scale).expand(batch_size).to(device),
                       class_labels=labels).sample.float()
            x0, eps = self.x0_eps(out, x, a, s)
            if i == k - 1:
                x = x0
                break
            a_next, s_next = self.alpha_sigma(torch.tensor(ts[i + 1], dtype=torch.float64).to(torch.float32))
            if c.sampler == "renoise":
                eps = randn_tensor(x.shape, generator=generator, device=device, dtype=x.dtype)
            x = a_next * x0 + s_next * eps
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pil":
            images = self.numpy_to_pil(images.cpu().permute(0, 2, 3, 1).numpy())
        elif output_type == "np":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
        elif output_type != "pt":
            raise ValueError(f"output_type '{output_type}' must be pil, np or pt")
        return ImagePipelineOutput(images=images) if return_dict else (images,)
