"""``data=gmm``: samples of the teacher's Gaussian mixture (the exact distribution the family knows)."""

from __future__ import annotations

import torch

from onestep.conditioning import Labels
from onestep.core import Batch


class GMMData:
    def __init__(self, mixture):
        self.mixture, self.data_shape = mixture, (mixture.dim,)

    def batch(self, n: int, device) -> Batch:
        labels = self.mixture.sample_labels(n)
        real = self.mixture.sample(n, labels).float()
        noise = torch.randn(n, self.mixture.dim)
        cond = None if labels is None else Labels(labels, self.mixture.num_classes).to(device)
        return Batch(noise=noise.to(device), cond=cond, real=real.to(device))

