"""Diversity of a generator per prompt: the mean pairwise distance of k samples of one prompt in a feature space,
averaged over prompts. Distribution-matching students are known to lose diversity against their teacher
("Distilling Diversity and Control in Diffusion Models", Gandikota & Bau 2025); a collapsed prompt scores 0.

    diversity = mean over prompts p of  2 / (k (k - 1)) * sum_{i < j} (1 - cos(f(x_i^p), f(x_j^p)))

The feature space is any image -> vector map: the CLIP image embedding (``ClipImageFeatures``, open_clip weights from
a local path) for real teachers, the digits feature network for the shipped digits teachers.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from onestep.rewards.clip import open_clip_model, weights_file
from onestep.rewards.preprocess import to_model_input


def pairwise_cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos over the k (k - 1) / 2 distinct pairs of ``features`` (k, D), k >= 2 (differentiable)."""
    f = F.normalize(features.double(), dim=-1)
    k = f.shape[0]
    i, j = torch.triu_indices(k, k, offset=1)
    return (1 - (f[i] * f[j]).sum(-1)).mean()


def per_prompt(features: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """The diversity of each prompt that has at least two samples among ``prompts`` (one per row of features)."""
    rows = defaultdict(list)
    for i, p in enumerate(prompts):
        rows[p].append(i)
    return {p: float(pairwise_cosine_distance(features[idx])) for p, idx in rows.items() if len(idx) >= 2}


def per_sample(features: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Each row's mean 1 - cos to the other rows of its prompt (0 for a row alone with its prompt), differentiable: a
    per-sample diversity reward, whose mean over a prompt's rows is that prompt's ``pairwise_cosine_distance``."""
    f = F.normalize(features, dim=-1)
    out = torch.zeros(len(prompts), device=features.device, dtype=f.dtype)
    rows = defaultdict(list)
    for i, p in enumerate(prompts):
        rows[p].append(i)
    for idx in rows.values():
        if len(idx) < 2:
            continue
        g = f[idx]
        dist = 1 - g @ g.T  # the diagonal is 0
        out[idx] = dist.sum(1) / (len(idx) - 1)
    return out


def diversity(features: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """``diversity``: the mean over prompts with >= 2 samples; ``diversity_prompts``: how many there were (0: no
    prompt repeats, and no diversity can be measured)."""
    each = per_prompt(features, prompts)
    out = {"diversity_prompts": len(each)}
    if each:
        out["diversity"] = sum(each.values()) / len(each)
    return out


class ClipImageFeatures(nn.Module):
    """open_clip's image embedding (from local weights) as the feature space of ``diversity``."""

    def __init__(self, model: str, checkpoint, key: str = "eval.clip.checkpoint"):
        import open_clip

        super().__init__()
        path = weights_file(checkpoint, key, f"the CLIP image embedding ({model})")
        self.model, _ = open_clip_model(model, "eval.clip.model")
        open_clip.load_checkpoint(self.model, str(path))
        self.model.eval().requires_grad_(False)
        pp = open_clip.get_model_preprocess_cfg(self.model)
        self.size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
        self.mean, self.std = tuple(pp["mean"]), tuple(pp["std"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model.encode_image(to_model_input(images.to(device), self.size, self.mean, self.std)).float()


class ClipDiversity(nn.Module):
    """``reward=clip_diversity``: each sample's mean cosine distance to the other samples of its prompt in the CLIP
    image embedding (``per_sample``; differentiable), the diversity reward of real text-to-image teachers."""

    def __init__(self, model: str, checkpoint, key: str = "reward.weights"):
        super().__init__()
        self.features = ClipImageFeatures(model, checkpoint, key)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return per_sample(self.features(images), prompts)
