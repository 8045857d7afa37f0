"""The distribution matching gradient shared by DMD, DMD2 and rCM's regularizer.

DMD (Yin et al. 2024a) eq. (7): grad_theta KL ~= E_{t,x} [ -(s_real(x_t, t) - s_fake(x_t, t)) dG/dtheta ],
with s = score. In x0 form s_real - s_fake = alpha_t (mu_real - mu_fake) / sigma_t^2, and the weighting of
eq. (8), w_t = sigma_t^2 / alpha_t * CS / ||mu_real(x_t, t) - x||_1, turns the gradient into
    grad = (mu_fake - mu_real) / mean|x - mu_real|.
It is applied through the surrogate 0.5 * ||x - sg(x - grad)||^2 (mean), whose gradient w.r.t. x is grad
divided by the element count.
"""

from __future__ import annotations

import torch

from onestep.denoisers.base import Denoiser
from onestep.objectives.score_matching import noised, sample_t

#: floor of the mean |x - mu_real| normalizer (DMD eq. 8) so that a perfect teacher cannot divide by zero
NORMALIZER_FLOOR = 1e-5


def dmd_gradient(teacher: Denoiser, critic: Denoiser, x: torch.Tensor, cond=None, *, lo: float = 0.02,
                 hi: float = 0.98, t: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The DMD direction at generator samples x (no grad through the score networks)."""
    sched = teacher.schedule
    wdtype = torch.promote_types(x.dtype, torch.float32)  # weights in (at least) fp32 under mixed precision
    with torch.no_grad():
        t = sample_t(sched, x.shape[0], lo, hi, like=x) if t is None else t
        x_t, _ = noised(sched, x.detach(), t)
        mu_real = teacher.x0(x_t, t, cond).to(wdtype)
        mu_fake = critic.x0(x_t, t, cond).to(wdtype)
        norm = (x.detach().to(wdtype) - mu_real).abs().flatten(1).mean(1).clamp_min(NORMALIZER_FLOOR)
        grad = (mu_fake - mu_real) / norm.view(-1, *([1] * (x.ndim - 1)))
        grad = torch.nan_to_num(grad)
    return grad.to(x.dtype), {"dm_grad_norm": grad.flatten(1).norm(dim=1).mean()}


def dmd_loss(teacher: Denoiser, critic: Denoiser, x: torch.Tensor, cond=None, **kw) -> tuple[torch.Tensor, dict]:
    grad, logs = dmd_gradient(teacher, critic, x, cond, **kw)
    wdtype = torch.promote_types(x.dtype, torch.float32)
    loss = 0.5 * torch.nn.functional.mse_loss(x.to(wdtype), (x - grad).detach().to(wdtype))
    return loss, logs
