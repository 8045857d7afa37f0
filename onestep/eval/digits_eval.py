"""Evaluator for digits experiments: FD / KID / precision / recall in the digits feature space against the real
digits, plus class coverage and label accuracy from the same network's classifier; a PNG grid of samples."""

from __future__ import annotations

from pathlib import Path

import torch

from onestep.conditioning import Labels, labels_of
from onestep.rewards.digits_features import class_metrics, load_digits_features
from onestep.eval.fid import feature_metrics, stats_of

#: samples per panel row in the grid: GRID_PER_CLASS of each class, in class order
GRID_PER_CLASS = 2
FEATURE_BATCH = 1000


class DigitsEvaluator:
    headline = "fd"

    def __init__(self, reference: torch.Tensor, num_classes: int = 10, pr_k: int = 3, kid_subsets: int = 50):
        """``reference``: real images (N, 1, H, W) in [-1, 1] (the evaluation's target distribution)."""
        self.net, self.num_classes = load_digits_features(), num_classes
        self.metric_args = {"pr_k": pr_k, "kid_subsets": kid_subsets, "kid_subset_size": 1000}
        self.ref = stats_of(self._features(reference)[0])

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, logits = [], []
        for i in range(0, x.shape[0], FEATURE_BATCH):
            f = self.net.features(x[i:i + FEATURE_BATCH].float().cpu())
            feats.append(f)
            logits.append(self.net.head(f))
        return torch.cat(feats), torch.cat(logits)

    def metrics(self, x, cond):
        feats, logits = self._features(x)
        return {**feature_metrics(feats, self.ref, **self.metric_args),
                **class_metrics(logits, labels_of(cond), self.num_classes)}

    def plot(self, path: Path, panels):
        """One row per panel; every row shows the same sample indices (same noise, same label)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        first = next(iter(panels.values()))
        idx = _grid_indices(labels_of(first[1]), first[0].shape[0], self.num_classes)
        fig, axes = plt.subplots(len(panels), 1, figsize=(0.55 * len(idx) + 1.6, 0.75 * len(panels) + 0.3),
                                 squeeze=False)
        for ax, (title, (x, _)) in zip(axes[:, 0], panels.items()):
            row = torch.cat(list(x[idx, 0].float().cpu().clamp(-1, 1)), dim=1)  # (H, n W)
            ax.imshow(row.numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _grid_indices(cond: torch.Tensor | None, n: int, num_classes: int) -> torch.Tensor:
    """GRID_PER_CLASS sample indices per class in class order (the first ones), or the first few if unlabelled."""
    if cond is None:
        return torch.arange(min(n, GRID_PER_CLASS * num_classes))
    picks = [(cond == c).nonzero().flatten()[:GRID_PER_CLASS] for c in range(num_classes)]
    return torch.cat(picks)


class DigitsTextEvaluator:
    """The digits metrics for the shipped text-to-image digits teacher (``eval.features=digits`` with a
    text-to-image teacher): latents are decoded by the pipeline's VAE, 16x16 images average-pooled to the
    feature net's 8x8, and ``label_acc`` is the *prompt accuracy*: the classifier's digit vs the digit the
    sample's prompt names (onestep.data.digits_text.digit_of). With ``diversity``, also the diversity per prompt
    (onestep/rewards/diversity.py) in the same feature space, over the samples that share a prompt."""

    headline = "fd"
    what = ("FD / KID / precision / recall in the shipped digits feature space (decoded latents, pooled to 8x8) "
            "against all 1,797 digits (upsampled and pooled the same way); label acc = prompt accuracy (classifier "
            "digit vs the prompt's digit)")
    DECODE_BATCH = 256

    def __init__(self, codec, diversity: bool = False):
        from onestep.data.digits import load_digits_tensors

        self.codec, self.diversity = codec, diversity
        # the reference goes through the same 16x16 -> 8x8 pooling as the samples (tools/train_digits_t2i.py
        # trains on the upsampled digits), so that a perfect round trip scores FD ~0
        ref = torch.nn.functional.avg_pool2d(load_digits_tensors("all", 16)[0], 2)
        self.inner = DigitsEvaluator(ref)

    @torch.no_grad()
    def images(self, latents: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, latents.shape[0], self.DECODE_BATCH):
            z = latents[i:i + self.DECODE_BATCH].to(self.codec.device, self.codec.dtype)
            out.append(self.codec.decode(z).float().cpu())
        x = torch.cat(out)
        factor = x.shape[-1] // 8
        return torch.nn.functional.avg_pool2d(x, factor) if factor > 1 else x

    def _labels(self, cond) -> Labels:
        from onestep.data.digits_text import digit_of

        return Labels(torch.tensor([digit_of(t) for t in cond.texts]), self.inner.num_classes)

    def metrics(self, x, cond):
        images = self.images(x)
        out = self.inner.metrics(images, self._labels(cond))
        if self.diversity:
            from onestep.rewards.diversity import diversity

            out.update(diversity(self.inner._features(images)[0], list(cond.texts)))
        return out

    def plot(self, path: Path, panels):
        self.inner.plot(path, {k: (self.images(x), self._labels(c)) for k, (x, c) in panels.items()})
