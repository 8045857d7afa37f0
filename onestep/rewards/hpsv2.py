"""HPSv2 (Human Preference Score v2, Wu et al. 2023): open_clip's ViT-H-14 fine-tuned on human preference pairs
(HPD v2). The score of an image for a prompt is the cosine of their embeddings, as the official scorer computes it
(tgxs002/HPSv2, hpsv2/img_score.py: the diagonal of ``image_features @ text_features.T`` with open_clip's normalized
features; papers print it as is, ~0.27, or times 100).

Weights: the released ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (a dict whose ``state_dict`` holds
open_clip's ViT-H-14 keys) or a bare open_clip state dict, from a local path (``eval.rewards.hpsv2``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from onestep.errors import ConfigError
from onestep.rewards.preprocess import to_model_input

#: the architecture the released HPSv2 / HPSv2.1 checkpoints fine-tune
MODEL = "ViT-H-14"


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


class HPSv2(nn.Module):
    """``HPSv2(checkpoint)(images, prompts)`` -> one score per image (differentiable in the images)."""

    def __init__(self, checkpoint, model: str = MODEL, key: str = "eval.rewards.hpsv2"):
        import open_clip

        super().__init__()
        path = weights_file(checkpoint, key, f"HPSv2 ({model})")
        self.model, name = open_clip_model(model, f"{key}_model")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DistributedDataParallel
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"{key} '{path}' does not fit the open_clip architecture {model} "
                              f"({str(e).strip().splitlines()[0]})") from None
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        pp = open_clip.get_model_preprocess_cfg(self.model)
        self.size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
        self.mean, self.std = tuple(pp["mean"]), tuple(pp["std"])

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        img = F.normalize(self.model.encode_image(to_model_input(images.to(device), self.size, self.mean, self.std)).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(device)).float(), dim=-1)
        return (img * txt).sum(-1)
