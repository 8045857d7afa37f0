"""open_clip from local weights, and the cosine of its image and text embeddings per image: the CLIP score as a
reward (``ClipScore``; the quantity the published CLIP score reports before any scaling) and the base of HPSv2."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from onestep.errors import ConfigError
from onestep.rewards.preprocess import to_model_input


def open_clip_model(model: str, key: str):
    """(open_clip model, its registered name) for an architecture name or a model-config .json file."""
    import open_clip

    name = model
    if model.endswith(".json"):
        if not Path(model).is_file():
            raise ConfigError(f"{key} '{model}' does not exist; pass an open_clip name or a model-config .json")
        open_clip.add_model_config(model)
        name = Path(model).stem
    elif model not in open_clip.list_models():
        raise ConfigError(f"{key} '{model}' is not an open_clip architecture; pass one of open_clip.list_models() "
                          "or a model-config .json")
    return open_clip.create_model(name, pretrained=None), name


def weights_file(path, key: str, what: str) -> Path:
    if not path:
        raise ConfigError(f"{what} needs its released weights: pass {key}=<local file> (nothing is downloaded)")
    if not Path(path).is_file():
        raise ConfigError(f"{key} '{path}' does not exist; pass the local weights file of {what}")
    return Path(path)


class ClipCosine(nn.Module):
    """cos(image embedding, prompt embedding) per image, differentiable in the images. A subclass loads
    ``self.model`` (an open_clip model) and calls ``finish(name)``."""

    model: nn.Module

    def finish(self, name: str) -> None:
        import open_clip

        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        pp = open_clip.get_model_preprocess_cfg(self.model)
        self.size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
        self.mean, self.std = tuple(pp["mean"]), tuple(pp["std"])

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        x = to_model_input(images.to(device), self.size, self.mean, self.std)
        img = F.normalize(self.model.encode_image(x).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(device)).float(), dim=-1)
        return (img * txt).sum(-1)


class ClipScore(ClipCosine):
    """The CLIP score of an open_clip checkpoint (``open_clip.load_checkpoint``'s formats) as a reward."""

    def __init__(self, model: str, checkpoint, key: str = "reward.weights"):
        import open_clip

        super().__init__()
        path = weights_file(checkpoint, key, f"the CLIP score ({model})")
        self.model, name = open_clip_model(model, "reward.model")
        open_clip.load_checkpoint(self.model, str(path))
        self.finish(name)
