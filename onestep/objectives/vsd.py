"""VSD / SwiftBrush: variational score distillation (Wang et al. 2023, ProlificDreamer; Nguyen & Tran 2024,
SwiftBrush) with a critic trained on generator samples.

ProlificDreamer eq. (9): grad_theta = E_{t, eps} [ w(t) (eps_real(x_t, t) - eps_fake(x_t, t)) dx/dtheta ],
x_t = alpha_t x + sigma_t eps. In x0 form eps_real - eps_fake = (alpha_t / sigma_t) (mu_fake - mu_real), so
  weighting "x0":  w(t) = sigma_t / alpha_t  ->  grad = mu_fake - mu_real (no per-sample normalizer: that is DMD)
  weighting "eps": w(t) = 1                 ->  grad = (alpha_t / sigma_t) (mu_fake - mu_real)
applied through the surrogate 0.5 ||x - sg(x - grad)||^2. Critic (SwiftBrush's LoRA teacher copy; here a
full copy): DSM on detached generator samples, ``ttur`` updates per generator step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onestep.denoisers.base import Denoiser
from onestep.errors import ConfigError
from onestep.objectives.adversarial import GANConfig
from onestep.objectives.base import Batch, Nets, ObjectiveConfig, check_t_range, register_objective
from onestep.objectives.critic import CriticObjective
from onestep.objectives.distribution_matching import denoised_pair, surrogate_loss
from onestep.schedules import bcast

VSD_WEIGHTINGS = ("x0", "eps")


def vsd_gradient(teacher: Denoiser, critic: Denoiser, x, cond=None, *, weighting: str = "x0", lo: float = 0.02,
                 hi: float = 0.98, t=None, eps=None) -> torch.Tensor:
    t, _, mu_real, mu_fake = denoised_pair(teacher, critic, x, cond, lo=lo, hi=hi, t=t, eps=eps)
    grad = mu_fake - mu_real
    if weighting == "eps":
        s = teacher.schedule
        grad = bcast(s.alpha(t) / s.sigma(t), grad).to(grad) * grad
    return torch.nan_to_num(grad).to(x.dtype)


@dataclass
class VSDConfig(ObjectiveConfig, GANConfig):
    name: str = "vsd"
    ttur: int = 1
    t_lo: float = 0.02
    t_hi: float = 0.98
    #: w(t) of ProlificDreamer eq. (9): x0 (w = sigma/alpha) | eps (w = 1)
    weighting: str = "x0"
    critic_weighting: str = "edm"


@register_objective
class VSD(CriticObjective):
    name = "vsd"
    Config = VSDConfig

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if cfg.weighting not in VSD_WEIGHTINGS:
            raise ConfigError(f"objective.weighting='{cfg.weighting}' is unknown; choose one of {VSD_WEIGHTINGS}")
        check_t_range(cfg)

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        x = self.generate(nets, batch)
        grad = vsd_gradient(nets.teacher, nets.critic, x, batch.cond, weighting=self.cfg.weighting,
                            lo=self.cfg.t_lo, hi=self.cfg.t_hi)
        loss = surrogate_loss(x, grad)
        out = {"vsd": loss, "vsd_grad_norm": grad.flatten(1).norm(dim=1).mean()}
        return self.with_gan(loss, out, nets, x, batch.cond)
