"""scikit-learn's digits (1,797 8x8 grey images, 16 grey levels + 1, 10 classes), shipped with scikit-learn.

Pixels v in {0..16} map to x = v / 8 - 1 in [-1, 1]; images are (N, 1, 8, 8), or bilinearly upsampled to
(N, 1, 16, 16) with ``size=16``. The train / held-out split is fixed (stratified, seed ``SPLIT_SEED``) so the
teacher, the feature network and the evaluation all agree on it.
"""

from __future__ import annotations

import torch

from onestep.conditioning import Labels
from onestep.errors import ConfigError
from onestep.core import Batch

NUM_CLASSES = 10
#: the held-out fraction and the seed of the stratified split
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0
SPLITS = ("train", "heldout", "all")


def load_digits_tensors(split: str = "all", size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1] of shape (N, 1, size, size), labels (N,) int64) of one split."""
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ConfigError(f"digits split '{split}' is unknown; use one of {SPLITS}")
    if size not in (8, 16):
        raise ConfigError(f"digits size {size} is not supported; use 8 (native) or 16 (bilinear upsampling)")
    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 8 - 1
    y = torch.from_numpy(d.target).long()
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if split == "all":
        return x, y
    held = _heldout_mask(y)
    keep = held if split == "heldout" else ~held
    return x[keep], y[keep]


def _heldout_mask(y: torch.Tensor) -> torch.Tensor:
    """Stratified: the same fraction of each class is held out."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    mask = torch.zeros_like(y, dtype=torch.bool)
    for c in range(NUM_CLASSES):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        mask[idx[:round(HELDOUT_FRACTION * idx.numel())]] = True
    return mask


class DigitsData:
    """DataSource: real images (with their labels as ``cond``) drawn from a split, and fresh generator noise."""

    num_classes = NUM_CLASSES

    def __init__(self, split: str = "train", size: int = 8):
        self.images, self.labels = load_digits_tensors(split, size)
        self.data_shape = tuple(self.images.shape[1:])

    def batch(self, n: int, device) -> Batch:
        idx = torch.randint(0, self.images.shape[0], (n,))
        noise = torch.randn(n, *self.data_shape)
        cond = Labels(self.labels[idx], NUM_CLASSES).to(device)
        return Batch(noise=noise.to(device), cond=cond, real=self.images[idx].to(device))

    def clean(self, n: int):
        idx = torch.randint(0, self.images.shape[0], (n,))
        return self.images[idx], self.labels[idx]
