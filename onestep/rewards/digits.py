"""The shipped rewards of the captioned-digits teacher (onestep/assets/digits_t2i), usable on a CPU with no download:
both read decoded images through the shipped digits feature network (``digits_features.py``).

    digits_class      log p(prompted digit | image): the network's log-softmax at the digit the prompt names
    digits_diversity  per sample, the mean cosine distance of its features to those of the other samples of its
                      prompt in the batch (0 for a sample alone with its prompt): a batch's mean is the batch's
                      diversity per prompt (``diversity.py``), and raising it spreads each prompt's samples apart

Images are in [-1, 1], (N, 1 or 3, H, W) at the teacher's resolution; like the digits evaluation, they are
average-pooled to the network's 8x8 input (16x16 -> 8x8) and RGB is averaged to grey.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from onestep.rewards.digits_features import digit_of, load_digits_features
from onestep.rewards.diversity import per_sample

#: the feature network's input size
SIZE = 8


def network_input(images: torch.Tensor) -> torch.Tensor:
    x = images.mean(1, keepdim=True) if images.shape[1] != 1 else images
    factor = x.shape[-1] // SIZE
    return F.avg_pool2d(x, factor) if factor > 1 else x


class DigitsClass(nn.Module):
    """log p(digit_of(prompt) | image) under the shipped classifier, one value per image (differentiable)."""

    def __init__(self, folder=None):
        super().__init__()
        self.net = load_digits_features(folder)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        labels = torch.tensor([digit_of(p) for p in prompts], device=images.device)
        logp = self.net.to(images.device).logits(network_input(images)).log_softmax(-1)
        return logp.gather(1, labels[:, None])[:, 0]


class DigitsDiversity(nn.Module):
    """Each sample's mean cosine distance to the other samples of its prompt (digits features; differentiable)."""

    def __init__(self, folder=None):
        super().__init__()
        self.net = load_digits_features(folder)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return per_sample(self.net.to(images.device).features(network_input(images)), prompts)
