"""The distribution matching gradient shared by DMD, DMD2, VSD, f-distill and rCM's regularizer (and the
normalizer that SiD and SIM reuse).

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
from onestep.core import noised, sample_t

#: floor of the mean |x - mu_real| normalizer (DMD eq. 8) so that a perfect teacher cannot divide by zero
NORMALIZER_FLOOR = 1e-5


def dmd_normalizer(x: torch.Tensor, mu_real: torch.Tensor) -> torch.Tensor:
    """DMD eq. (8)'s per-sample mean |x - mu_real|, floored, shaped (N, 1, ...) to divide (N, ...) tensors."""
    norm = (x.detach().to(mu_real.dtype) - mu_real).abs().flatten(1).mean(1).clamp_min(NORMALIZER_FLOOR)
    return norm.view(-1, *([1] * (x.ndim - 1)))


@torch.no_grad()
def denoised_pair(teacher: Denoiser, critic: Denoiser, x: torch.Tensor, cond=None, *, lo: float = 0.02,
                  hi: float = 0.98, t: torch.Tensor | None = None, eps: torch.Tensor | None = None):
    """Noise generator samples once and denoise with both scores: (t, x_t, mu_real, mu_fake), no grad,
    the predictions in (at least) fp32 so that their small difference survives mixed precision."""
    sched = teacher.schedule
    wdtype = torch.promote_types(x.dtype, torch.float32)
    t = sample_t(sched, x.shape[0], lo, hi, like=x) if t is None else t
    x_t, _ = noised(sched, x.detach(), t, eps)
    return t, x_t, teacher.x0(x_t, t, cond).to(wdtype), critic.x0(x_t, t, cond).to(wdtype)


def surrogate_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 ||x - sg(x - grad)||^2 (mean): its gradient w.r.t. x is grad / x.numel()."""
    wdtype = torch.promote_types(x.dtype, torch.float32)
    return 0.5 * torch.nn.functional.mse_loss(x.to(wdtype), (x - grad).detach().to(wdtype))


def dmd_gradient(teacher: Denoiser, critic: Denoiser, x: torch.Tensor, cond=None, *, lo: float = 0.02,
                 hi: float = 0.98, t: torch.Tensor | None = None,
                 eps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The DMD direction at generator samples x (no grad through the score networks)."""
    _, _, mu_real, mu_fake = denoised_pair(teacher, critic, x, cond, lo=lo, hi=hi, t=t, eps=eps)
    grad = torch.nan_to_num((mu_fake - mu_real) / dmd_normalizer(x, mu_real))
    return grad.to(x.dtype), {"dm_grad_norm": grad.flatten(1).norm(dim=1).mean()}


def dmd_loss(teacher: Denoiser, critic: Denoiser, x: torch.Tensor, cond=None, **kw) -> tuple[torch.Tensor, dict]:
    grad, logs = dmd_gradient(teacher, critic, x, cond, **kw)
    return surrogate_loss(x, grad), logs
