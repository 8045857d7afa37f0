"""Control maps of images and whether a generated image follows its control: the control signal and the metric of
Noise Consistency Training's experiments (objectives/nct.py). Images are in [-1, 1], (N, C, H, W); maps are grey,
(N, 1, H, W) at the image's size, so that any image-space control adapter reads them.

    lowres  the image averaged to ``size`` x ``size`` and held constant over each cell (nearest upsampling): the
            coarse layout of the target, e.g. a digit's 4x4 silhouette
    edges   the Sobel gradient magnitude of the grey image (a soft edge map, as Canny maps control ControlNets)

control_accuracy: for N generated images and the N controls they were given, the fraction whose own map is nearer (L2)
to its control than to any other control of the set: 1-of-N identification, chance 1 / N; 1 = each sample follows
its control more closely than any other sample's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONTROLS = ("lowres", "edges")


def grey(images: torch.Tensor) -> torch.Tensor:
    return images.mean(1, keepdim=True) if images.shape[1] != 1 else images


def control_map(images: torch.Tensor, kind: str, size: int = 4) -> torch.Tensor:
    """The control ``kind`` of each image (differentiable)."""
    x = grey(images)
    h, w = x.shape[-2:]
    if kind == "lowres":
        return F.interpolate(F.adaptive_avg_pool2d(x, size), size=(h, w), mode="nearest")
    if kind == "edges":
        kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
        gx = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kx.view(1, 1, 3, 3))
        gy = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kx.T.reshape(1, 1, 3, 3))
        return torch.sqrt(gx**2 + gy**2 + 1e-12) / 4
    raise ValueError(f"control '{kind}' is unknown; choose one of {CONTROLS}")


def control_accuracy(images: torch.Tensor, controls: torch.Tensor, kind: str, size: int = 4) -> float:
    """The fraction of images whose own control map is nearest to the control they were generated for."""
    got = control_map(images, kind, size).flatten(1).double()
    want = controls.flatten(1).double()
    nearest = torch.cdist(got, want).argmin(1)
    return float((nearest == torch.arange(len(got), device=nearest.device)).double().mean())
