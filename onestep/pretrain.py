"""Fit a denoiser by denoising score matching on a sampler of clean data (the project's own teachers)."""

from __future__ import annotations

from typing import Callable

import torch
from onestep.progress import bar as progress_bar

from onestep.denoisers.base import Denoiser
from onestep.core import dsm_loss


def fit_dsm(net: Denoiser, data: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]], *, steps: int,
            lr: float, batch: int, seed: int = 0, label_dropout: float = 0.1, desc: str = "teacher DSM",
            progress: bool = True) -> Denoiser:
    """Adam with cosine decay; labels are dropped with prob. ``label_dropout`` so CFG works on the result."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    bar = progress_bar(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        x0, cond = data(batch)
        if cond is not None and net.num_classes:
            drop = torch.rand(cond.shape[0]) < label_dropout
            cond = torch.where(drop, torch.full_like(cond, net.num_classes), cond)
        loss = dsm_loss(net, x0, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return net.eval().requires_grad_(False)
