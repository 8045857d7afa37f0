"""The preference and diversity scores of decoded text-to-image samples that ``eval.rewards`` configures, through the
scorers of onestep/rewards/ (each from its local weights): mean ImageReward, mean HPSv2, and the diversity per prompt
(in the CLIP image embedding of ``eval.clip``) over the samples that share a prompt."""

from __future__ import annotations

import torch

from onestep.errors import ConfigError
from onestep.rewards.diversity import ClipImageFeatures, diversity
from onestep.rewards.hpsv2 import HPSv2
from onestep.rewards.imagereward import ImageReward

#: images per scorer call
BATCH = 16


class PreferenceScores:
    def __init__(self, eval_cfg, device: torch.device | str = "cpu"):
        rc, self.scorers, self.features, self.parts = eval_cfg.rewards, {}, None, []
        if rc.imagereward:
            self.scorers["imagereward"] = ImageReward.load(rc.imagereward, rc.imagereward_tokenizer).to(device)
            self.parts.append(f"ImageReward ({rc.imagereward})")
        if rc.hpsv2:
            self.scorers["hpsv2"] = HPSv2(rc.hpsv2, rc.hpsv2_model).to(device)
            self.parts.append(f"HPSv2 ({rc.hpsv2_model}, {rc.hpsv2})")
        if rc.diversity:
            if not eval_cfg.clip.checkpoint:
                raise ConfigError("eval.rewards.diversity=true measures in the CLIP image embedding: pass "
                                  "eval.clip.checkpoint=<local open_clip weights> (and eval.clip.model)")
            self.features = ClipImageFeatures(eval_cfg.clip.model, eval_cfg.clip.checkpoint).to(device)
            self.parts.append(f"diversity per prompt (CLIP image embedding, {eval_cfg.clip.model})")

    def __bool__(self) -> bool:
        return bool(self.scorers) or self.features is not None

    @torch.no_grad()
    def metrics(self, images: torch.Tensor, prompts: list[str]) -> dict:
        out = {}
        for name, scorer in self.scorers.items():
            scores = [scorer(images[i:i + BATCH], prompts[i:i + BATCH]) for i in range(0, len(prompts), BATCH)]
            out[name] = float(torch.cat(scores).float().mean())
        if self.features is not None:
            feats = torch.cat([self.features(images[i:i + BATCH]).cpu() for i in range(0, len(prompts), BATCH)])
            out.update(diversity(feats, prompts))
        return out
