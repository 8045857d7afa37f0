"""CLIP score with open_clip from a local checkpoint (nothing is downloaded).

CLIPScore (Hessel et al. 2021, eq. (1)) with w = 100, as torchmetrics and most text-to-image distillation
papers report it:  CLIP-S(I, c) = 100 * max(cos(E_I, E_c), 0), averaged over samples.

Images arrive in [-1, 1], (N, 3, H, W) and go through CLIP's own preprocessing in tensor form: bicubic
(anti-aliased) resize of the short side to the model's input size, center crop, the model's mean/std.
``eval.clip.model`` is an open_clip architecture name or a model-config ``.json`` (registered with
``open_clip.add_model_config``); ``eval.clip.checkpoint`` the weights file; ``eval.clip.prompts`` a text
file with one prompt per line; ``eval.clip.prefix`` text put before every prompt.

The coco2014 protocols report the published number instead (``ClipScorer.cosines``): the raw cosine, neither
scaled nor clamped, of the caption prefixed with "A photo depicts ", the image going through CLIP's own PIL
preprocessing (GigaGAN's evaluation/evaluation.py compute_clip_score, used by SiD-LSG's evaluate_SiD_t2i_coco256.sh;
DMD2's main/coco_eval/coco_evaluator.py compute_clip_score: 0.32 for DMD2 on SD1.5, 0.304 for SiD-LSG).
GigaGAN splices the prefix's three tokens after the start token and re-terminates at 77 tokens; open_clip's
tokenizer on ``prefix + caption`` gives the same tokens (tests/test_eval_protocols.py checks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from onestep.errors import ConfigError
from onestep.progress import bar as progress_bar
from onestep.rewards.clip import open_clip_model

#: CLIPScore's w (Hessel et al. 2021 use 2.5; torchmetrics and distillation papers report 100 * cos)
SCALE = 100.0


def load_prompts(path: str | Path | None) -> list[str]:
    if not path:
        raise ConfigError("CLIP score needs prompts: pass eval.clip.prompts=<text file, one prompt per line>")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"eval.clip.prompts '{path}' does not exist; pass a text file with one prompt per line")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"eval.clip.prompts '{path}' holds no prompt; write one prompt per line")
    return prompts


class ClipScorer:
    def __init__(self, model: str, checkpoint: str | Path | None, device: str | torch.device = "cpu",
                 prefix: str = ""):
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        if not checkpoint:
            raise ConfigError(f"CLIP score needs local open_clip weights for '{model}': pass "
                              "eval.clip.checkpoint=<.pt/.bin/.safetensors file> (nothing is downloaded)")
        if not Path(checkpoint).is_file():
            raise ConfigError(f"eval.clip.checkpoint '{checkpoint}' does not exist; pass the local weights file of "
                              f"eval.clip.model={model}")
        net, name = open_clip_model(model, "eval.clip.model")
        self.device = torch.device(device)
        try:
            open_clip.load_checkpoint(net, str(checkpoint))
        except (RuntimeError, KeyError) as e:
            raise ConfigError(f"eval.clip.checkpoint '{checkpoint}' does not fit eval.clip.model={model} "
                              f"({str(e).strip().splitlines()[0]})") from None
        self.model = net.to(self.device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        pp = open_clip.get_model_preprocess_cfg(net)
        size = pp["size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(pp["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(pp["std"], device=self.device).view(1, 3, 1, 1)
        #: CLIP's own evaluation transform on PIL images (resize, center crop, mean / std), as the published code uses
        self.pil_preprocess = image_transform_v2(PreprocessCfg(**pp), is_train=False)
        self.model_name, self.checkpoint, self.prefix = model, str(checkpoint), prefix

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().to(self.device).clamp(-1, 1) + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        s = max(self.size[0] / h, self.size[1] / w)  # short side to the input size, then center crop
        nh, nw = max(self.size[0], round(h * s)), max(self.size[1], round(w * s))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (nh - self.size[0]) // 2, (nw - self.size[1]) // 2
        x = x[..., top:top + self.size[0], left:left + self.size[1]]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-sample 100 * max(cos(image, text), 0)."""
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        img = F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)
        return SCALE * (img * self._text(prompts)).sum(-1).clamp_min(0).cpu()

    @torch.no_grad()
    def cosines(self, images: list, prompts: list[str]) -> torch.Tensor:
        """Per-sample raw cos(image, prefix + prompt) of PIL images through CLIP's own PIL preprocessing (the
        published coco2014 number)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        x = torch.stack([self.pil_preprocess(im) for im in images]).to(self.device)
        img = F.normalize(self.model.encode_image(x).float(), dim=-1)
        return (img * self._text(prompts)).sum(-1).cpu()

    def _text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer([self.prefix + p for p in prompts]).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def provenance(self) -> dict[str, str]:
        return {"clip_model": self.model_name, "clip_checkpoint": self.checkpoint, "clip_prefix": self.prefix}


def clip_score(sample_fn: Callable[[int, list[str]], torch.Tensor], prompts: list[str], scorer: ClipScorer,
               batch_size: int = 32, progress: bool = False) -> float:
    """Mean CLIP score of one sample per prompt: ``sample_fn(start, prompts_of_batch)`` -> images in [-1, 1]."""
    total = 0.0
    for i in progress_bar(range(0, len(prompts), batch_size), desc="CLIP score", disable=not progress, leave=False):
        chunk = prompts[i:i + batch_size]
        total += float(scorer.scores(sample_fn(i, chunk), chunk).sum())
    return total / len(prompts)


def make_scorer(eval_cfg, device: str | torch.device = "cpu") -> ClipScorer:
    return ClipScorer(eval_cfg.clip.model, eval_cfg.clip.checkpoint, device, prefix=eval_cfg.clip.prefix)
