"""Images in [-1, 1] (N, C, H, W) -> a vision model's input, in differentiable tensor operations: anti-aliased bicubic
resize of the short side to the input size, center crop, the model's mean/std (the tensor form of torchvision's
Resize(size, BICUBIC) + CenterCrop(size) + ToTensor + Normalize that ImageReward and open_clip apply to PIL images)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: OpenAI CLIP's normalization, used by ImageReward's BLIP and by open_clip's ViT-H-14 (HPSv2)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_model_input(images: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    x = (images.float().clamp(-1, 1) + 1) / 2
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / sd
