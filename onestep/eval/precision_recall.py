"""Improved precision and recall (Kynkäänniemi et al. 2019, eqs. (1)-(3)).

The manifold of a feature set is the union of balls around each of its points with radius the distance to
its k-th nearest neighbour within the set. precision = fraction of generated points inside the real
manifold (quality); recall = fraction of real points inside the generated manifold (coverage).
"""

from __future__ import annotations

import torch

CHUNK = 1024


def _kth_nn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    out = []
    for i in range(0, x.shape[0], CHUNK):
        d = torch.cdist(x[i:i + CHUNK], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # k+1: the point itself is its own 0-th neighbour
    return torch.cat(out)


def _inside(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """f(q, support) = 1 if ||q - s|| <= r_k(s) for some s (eq. (1))."""
    hit = []
    for i in range(0, query.shape[0], CHUNK):
        d = torch.cdist(query[i:i + CHUNK], support)
        hit.append((d <= radii[None]).any(1))
    return torch.cat(hit)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    real, fake = torch.as_tensor(real).float(), torch.as_tensor(fake).float()  # distances only get thresholded
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    precision = _inside(fake, real, _kth_nn_radii(real, k)).double().mean()  # eq. (2)
    recall = _inside(real, fake, _kth_nn_radii(fake, k)).double().mean()  # eq. (3)
    return {"precision": float(precision), "recall": float(recall)}
