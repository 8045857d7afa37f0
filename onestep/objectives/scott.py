"""SCott: stochastic consistency distillation (Liu, Xie, Ye, Deng, Chen, Tang, Fu, Lu & Zha 2024, "SCott: Accelerating
Diffusion Models with Stochastic Consistency Distillation", arXiv 2403.01505, AAAI 2025; no official code released).

Consistency distillation (cd.py, CM eq. (7)) whose target point x^_n is produced by the teacher's *SDE* solver instead of
one ODE step. The reverse-time SDE family SCott takes from ER-SDE (Cui et al. 2023, "Elucidating the Solution Space of
Extended Reverse-Time SDE for Diffusion Models"), with noise strength eta,
    dx = [f(t) x - (1 + eta^2) / 2 g(t)^2 grad log p_t(x)] dt + eta g(t) dw                        (SCott Sec. 3)
has the marginals p_t of the probability-flow ODE for every eta >= 0: eta = 0 is the PF-ODE (plain CD), eta = 1 the
reverse-time SDE (the paper's best). Between the pair (t_{n+1} -> t_n) SCott runs h sub-steps of the solver (its
"multi-step SDE sampling", h = 3 in the paper's ablation), on times evenly spaced in t.

One sub-step t -> s, in the scale-free level sig = sigma / alpha and y = x / alpha, with D the teacher's x0: freezing D
over the step, the eta-SDE solves exactly to
    y_s = D + r^(1 + eta^2) (y_t - D) + sig_s sqrt(1 - r^(2 eta^2)) z,   r = sig_s / sig_t,  z ~ N(0, I)
which is ER-SDE-Solver-1 (Cui et al., first order) with the noise-scale function phi(x) = x^(1 + eta^2). It is the
teacher's ODE step from t to the lower level sig' = sig_s r^(eta^2) followed by the forward process from sig' back up to
sig_s (variance sig_s^2 - sig'^2), and that is how it is computed here: the ODE part is cd.py's teacher step
(``solver``: Euler = DDIM = the formula above exactly on EDM; Heun one order higher), the noise part the exact forward
kernel. So eta = 0 and h = 1 is cd's step exactly, and on a Gaussian teacher the sub-step keeps the marginal up to the
ODE part's discretization error only.

Loss: CM's d(f_theta(x_{n+1}, t_{n+1}), f_theta-(x^_n, t_n)) (cd.py: l2 | pseudo_huber, stop-grad or EMA target).
Adversarial term (SCott's LoRA discriminator on the pretrained U-Net, conditioned on t): the shared GAN block
(adversarial.py, ``objective.discriminator=teacher``: a head on frozen teacher features) with its generator loss
gan_weight * L_G at the student's denoised prediction f_theta(x_{n+1}, t_{n+1}) and its L_D (critic update) on
noised real data vs the same predictions, detached. The paper's discriminator reads the prediction at t_{n+1}'s noise;
here the GAN block draws its own noise level (gan_t_lo / gan_t_hi), as for every other objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onestep.errors import ConfigError
from onestep.objectives import consistency as C
from onestep.objectives.adversarial import GANConfig, GANTerm
from onestep.objectives.base import Batch, Nets, register_objective
from onestep.objectives.cd import CDConfig, ConsistencyDistillation
from onestep.schedules import bcast

ODE_SOLVERS = ("euler", "heun")


@dataclass
class SCottConfig(CDConfig, GANConfig):
    name: str = "scott"
    #: eta of the ER-SDE family: 0 = the probability-flow ODE (plain CD), 1 = the reverse-time SDE (SCott's choice)
    eta: float = 1.0
    #: h, the teacher's SDE sub-steps between the pair (SCott's multi-step SDE sampling; h = 3 in the paper)
    substeps: int = 3


def sde_substep(teacher, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, eta: float, solver: str, cond=None,
                z: torch.Tensor | None = None) -> torch.Tensor:
    """One sub-step t -> s (per-sample times, s < t) of the eta-SDE: the teacher's ODE step (``solver``) down to
    sig' = sig_s (sig_s / sig_t)^(eta^2), then the forward process up to sig_s with fresh noise z."""
    sched = teacher.schedule
    if eta == 0:
        return ode_step(teacher, x, t, s, solver, cond)
    sig_t, sig_s = (sched.sigma(u) / sched.alpha(u) for u in (t, s))
    sig_mid = sig_s * (sig_s / sig_t) ** (eta * eta)
    t_mid = C.t_of_sigma(sched, sig_mid.to(torch.float64)).to(t)
    x_mid = ode_step(teacher, x, t, t_mid, solver, cond)
    z = torch.randn_like(x) if z is None else z
    # forward kernel q(x_s | x_mid): x_s = (alpha_s / alpha_mid) x_mid + alpha_s sqrt(sig_s^2 - sig_mid^2) z
    a_s, a_mid = sched.alpha(s), sched.alpha(t_mid)
    # the level reached is sig(t_mid), not sig_mid, where t_of_sigma clamps at t_min
    sig_reached = sched.sigma(t_mid) / a_mid
    std = a_s * torch.sqrt((sig_s**2 - sig_reached**2).clamp_min(0))
    return bcast(a_s / a_mid, x) * x_mid + bcast(std, x) * z


def ode_step(teacher, x, t, s, solver: str, cond=None) -> torch.Tensor:
    """cd.py's teacher step t -> s: Euler or Heun on the probability-flow ODE dx/dt = u(x, t)."""
    dt = bcast(s - t, x)
    u = teacher.flow(x, t, cond)
    x_next = x + dt * u
    if solver == "heun":
        x_next = x + dt * 0.5 * (u + teacher.flow(x_next, s, cond))
    return x_next


@register_objective
class SCott(ConsistencyDistillation):
    name = "scott"
    Config = SCottConfig

    def __init__(self, cfg, generate):
        if cfg.solver not in ODE_SOLVERS:
            raise ConfigError(f"objective.solver='{cfg.solver}': SCott's sub-steps run the teacher's ODE part with one "
                              f"of {ODE_SOLVERS}")
        if cfg.eta < 0 or cfg.substeps < 1:
            raise ConfigError(f"objective.eta={cfg.eta} must be >= 0 (0 = plain CD) and objective.substeps="
                              f"{cfg.substeps} >= 1")
        super().__init__(cfg, generate)
        self.gan = GANTerm(cfg, has_critic=False)

    def build_modules(self, setup):
        return self.gan.build(setup)

    def _step(self, nets, x0, eps, x, t, s, cond):
        """x^_n: h sub-steps of the teacher's eta-SDE from t_{n+1} = t down to t_n = s, evenly spaced in t."""
        h = self.cfg.substeps
        for i in range(h):
            a = t + (s - t) * (i / h)
            b = s if i == h - 1 else t + (s - t) * ((i + 1) / h)
            x = sde_substep(nets.teacher, x, a, b, self.cfg.eta, self.cfg.solver, cond)
        return x

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        out, f = self.consistency_loss(nets, batch, step)
        if self.cfg.gan_weight > 0:
            gan, logs = self.gan.generator_loss(nets, f, batch.cond)
            out.update(logs, loss=out["loss"] + gan)
        return out

    def critic_loss(self, nets: Nets, batch: Batch, step: int):
        """The discriminator head's update: L_D on noised real data vs the student's detached denoised predictions."""
        if batch.real is None:
            raise ConfigError("objective=scott needs data samples (x0); use data with real samples (data=gmm)")
        with torch.no_grad():
            _, _, _, t_hi, x_hi, _, _ = self.pair(nets.generator.schedule, batch.real, step)
            fake = nets.generator.x0(x_hi, t_hi, batch.cond)
        loss, logs = self.gan.discriminator_loss(nets, fake, batch)
        return {"loss": loss, **logs}
