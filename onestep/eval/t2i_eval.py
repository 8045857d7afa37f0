"""Evaluator of text-to-image runs: samples are latents, decoded by the teacher's VAE only here.

Metrics, each only when its inputs are configured (``what`` says which, and the run's results.md repeats it):
    clip_score  CLIP score of the decoded images against their own prompts (eval.clip.checkpoint, open_clip)
    imagereward / hpsv2 / diversity   preference and diversity scores (eval.rewards; onestep/eval/preference.py)
    fd / kid / precision / recall   against ``eval.reference`` (an image folder or .npz) in Inception space
                                    (eval.inception_path, clean-fid)
With neither, a run is judged by its PNG grid and losses; the evaluator says so instead of inventing a number.
A row with metrics also names what made them: sample count, image resolution, CLIP model / checkpoint / prefix,
Inception weights and reference.
"""

from __future__ import annotations

from pathlib import Path

import torch

from onestep.eval.fid import feature_metrics, features_of_images, inception_space, reference_stats, to_uint8
from onestep.eval.preference import PreferenceScores

DECODE_BATCH = 16


@torch.no_grad()
def decoded(codec, latents: torch.Tensor, batch: int = DECODE_BATCH) -> torch.Tensor:
    """Latents -> images (or videos) in [-1, 1] on the CPU, ``batch`` at a time through the codec's device."""
    out = [codec.decode(latents[i:i + batch].to(codec.device, codec.dtype)).float().cpu()
           for i in range(0, latents.shape[0], batch)]
    return torch.cat(out)


def save_panels(fig, panels, n: int, path) -> None:
    """Write a figure of panels (one per row): the first ``n`` prompts under it, to ``path``; closes it."""
    import matplotlib.pyplot as plt

    texts = getattr(next(iter(panels.values()))[1], "texts", None)
    if texts:
        fig.text(0.01, 0.01, " | ".join(f"{i + 1}: {t[:40]}" for i, t in enumerate(texts[:n])), fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


class TextImageEvaluator:
    def __init__(self, codec, eval_cfg, out_root, device="cpu"):
        self.codec = codec
        self.scorer = self.space = self.reference = None
        parts, self.provenance = [], {}
        if eval_cfg.clip.checkpoint:
            from onestep.eval.clip_score import make_scorer

            self.scorer = make_scorer(eval_cfg, device)
            parts.append(f"CLIP score ({eval_cfg.clip.model}, {eval_cfg.clip.checkpoint})")
            self.provenance |= self.scorer.provenance()
        self.preference = PreferenceScores(eval_cfg, device)
        parts += self.preference.parts
        if eval_cfg.reference:
            self.space = inception_space(eval_cfg.inception_path, device)
            cache = eval_cfg.stats_cache or Path(out_root) / "fid_stats"
            self.reference = reference_stats(eval_cfg.reference, self.space, cache, progress=False)
            parts.append(f"FID against {eval_cfg.reference}")
            self.provenance |= {"inception": self.space.name, "reference": str(eval_cfg.reference)}
        self.headline = "clip_score" if self.scorer else ("fd" if self.space else "none")
        self.what = " and ".join(parts) if parts else (
            "no metric: set eval.clip.checkpoint (CLIP score) and/or eval.reference + eval.inception_path (FID); "
            "judge this run by samples.png and stats.jsonl")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decoded(self.codec, latents)

    def metrics(self, x: torch.Tensor, cond) -> dict:
        if self.scorer is None and self.space is None and not self.preference:
            return {}
        images = self.decode(x)
        out = {}
        if self.scorer is not None:
            out["clip_score"] = float(self.scorer.scores(images, list(cond.texts)).mean())
        if self.preference:
            out.update(self.preference.metrics(images, list(cond.texts)))
        if self.space is not None:
            out.update(feature_metrics(features_of_images(images, self.space), self.reference))
        return {**out, "n": images.shape[0], "resolution": f"{images.shape[-2]}x{images.shape[-1]}", **self.provenance}

    def plot(self, path: Path, panels) -> None:
        """One row per panel (same noise and prompts in every row), the prompts under the first row."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from torchvision.utils import make_grid

        n = min(8, next(iter(panels.values()))[0].shape[0])
        fig, axes = plt.subplots(len(panels), 1, figsize=(1.3 * n + 1.5, 1.5 * len(panels) + 0.6), squeeze=False)
        for ax, (title, (x, cond)) in zip(axes[:, 0], panels.items()):
            grid = make_grid(to_uint8(self.decode(x[:n])), nrow=n, padding=2, pad_value=255)
            ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=9)
        save_panels(fig, panels, n, path)
