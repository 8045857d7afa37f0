"""HPSv2 (Human Preference Score v2, Wu et al. 2023): open_clip's ViT-H-14 fine-tuned on human preference pairs
(HPD v2). The score of an image for a prompt is the cosine of their embeddings, as the official scorer computes it
(tgxs002/HPSv2, hpsv2/img_score.py: the diagonal of ``image_features @ text_features.T`` with open_clip's normalized
features; papers print it as is, ~0.27, or times 100).

Weights: the released ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (a dict whose ``state_dict`` holds
open_clip's ViT-H-14 keys) or a bare open_clip state dict, from a local path (``eval.rewards.hpsv2``).
"""

from __future__ import annotations

import torch

from onestep.errors import ConfigError
from onestep.rewards.clip import ClipCosine, open_clip_model, weights_file

#: the architecture the released HPSv2 / HPSv2.1 checkpoints fine-tune
MODEL = "ViT-H-14"


class HPSv2(ClipCosine):
    """``HPSv2(checkpoint)(images, prompts)`` -> one score per image (differentiable in the images)."""

    def __init__(self, checkpoint, model: str = MODEL, key: str = "eval.rewards.hpsv2"):
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
        self.finish(name)
