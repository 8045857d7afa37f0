"""SiDA: adversarial score identity distillation (Zhou et al. 2024c, "Adversarial Score identity Distillation:
Rapidly Surpassing the Teacher in One Step"): SiD's generator loss (sid.py) plus a GAN term whose discriminator
shares the fake-score critic's encoder; its L_D joins the critic update.

Two balances of the GAN term (``gan_balance``):

constant   L_theta = L_SiD + lambda L_G and L_psi = L_DSM + disc_weight L_D, with the shared GAN block of
           adversarial.py (its own t for the GAN, its own head, L_G = E softplus(-D)).
official   the official code's (mingyuanzhou/SiD branch sida: sida_training/sida_loss.py, sida_training_loop.py,
           run_sida.sh), written in this project's units (SiD's mean over elements):
  generator, at SiD's own x_t (the GAN reuses SiD's noise level, t_max 800, and noise; sida_loss.py:25-72):
      L_theta = 0.5 L_SiD + 0.5 lambda mean_i[ BCE(clamp(D(x_t), -10, 10), 1) / w_i ]       after gan_start_images
      L_theta = L_SiD                                                                      before
    BCE is the batch mean (BCEWithLogitsLoss), w_i SiD's per-sample normalizer mean|x_g - f_phi| (:65, :72): the GAN
    weight grows with mean(1/w) as the generator improves. The official loop multiplies the GAN term by D and sums
    both over the batch times loss_scaling_G / B = 100 / B and loss_scaling_G_gan / B = 0.01 / B
    (sida_training_loop.py:401-411, run_sida.sh:42-44), so lambda = 0.01 / 100 = 1e-4 here; 0.5 / 0.5 mixing and the
    200k-image start are its :410-411.
  critic, sigma ~ lognormal(P_mean = -1.2, P_std = 1.2) per row, the same sigma and noise n for the fake and the real
  rows (sida_loss.py:80-96):
      L_psi = L_DSM(x_g + sigma n) + disc_weight mean_i(lambda(sigma_i)) / 2 (BCE(D(x_real + sigma n), 1)
              + BCE(D(x_g + sigma n), 0)) / D,      lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2
    with unclamped logits (:119-123). The official DSM is a sum over the D elements (:119, loop :364-365) where this
    project's is a mean, hence L_D / D here; run_sida.sh's loss_scaling_D / loss_scaling = 1 / 1 is disc_weight = 1.
  Heads: the official discriminator is SiDA's parameter-free channel mean of the encoder output
  (``gan_head=channel_mean``, adversarial.py); the mean of the MLP critic's last hidden layer on the 2-D / N-D nets.
  Not replicated: the official generator also skips its optimizer step for the first 100k images (:425).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from onestep.core import dsm_loss, lognormal_t, sample_t
from onestep.errors import ConfigError
from onestep.objectives.base import Batch, Nets, frozen, register_objective
from onestep.objectives.sid import SiD, SiDConfig, sid_terms
from onestep.schedules import bcast

GAN_BALANCES = ("constant", "official")
#: SiDA clamps the generator's logits (sida_loss.py:72)
LOGIT_CLAMP = 10.0
#: gan_weight when unset, by balance: this project's constant-balance lambda; the official code's 0.01 / 100
GAN_WEIGHTS = {"constant": 0.01, "official": 1e-4}


@dataclass
class SiDAConfig(SiDConfig):
    name: str = "sida"
    discriminator: str = "critic"
    #: lambda of the GAN term; None = its balance's: 0.01 under constant (this project's), 1e-4 under official
    #: (loss_scaling_G_gan / loss_scaling_G = 0.01 / 100, mingyuanzhou/SiD branch sida run_sida.sh:42-44)
    gan_weight: Optional[float] = None
    #: constant (L_SiD + gan_weight L_G, the GAN at its own t) | official (SiDA's: the batch-mean BCE over each sample's
    #: SiD normalizer at SiD's x_t, 0.5 / 0.5 mixing, lognormal-sigma discriminator; mingyuanzhou/SiD branch sida
    #: sida_training/sida_loss.py:25-123, sida_training_loop.py:401-411); official gan_weight = 1e-4 (run_sida.sh:42-44)
    gan_balance: str = "constant"
    #: official balance: the GAN term joins after this many images (SiDA: 200k, sida_training_loop.py:410)
    gan_start_images: int = 0
    #: the critic's sigma ~ lognormal(disc_p_mean, disc_p_std), which the official balance's discriminator shares
    #: (sida_loss.py:18, :80-81); the constant balance reads them under critic_t_dist=lognormal
    disc_p_mean: float = -1.2
    disc_p_std: float = 1.2
    #: sigma_d of the official L_D's weight lambda(sigma) (EDM's, sida_loss.py:18)
    sigma_data: float = 0.5


@register_objective
class SiDA(SiD):
    """SiD + the adversarial term on the critic's features (SiDA); ``gan_weight`` 0 is rejected."""

    name = "sida"
    Config = SiDAConfig

    def __init__(self, cfg, generate):
        if cfg.gan_weight is None:  # a copy: the run's config keeps "unset" (the balance's value)
            cfg = copy.copy(cfg)
            cfg.gan_weight = GAN_WEIGHTS.get(cfg.gan_balance, GAN_WEIGHTS["constant"])
        super().__init__(cfg, generate)
        if cfg.gan_weight <= 0 or cfg.discriminator != "critic":
            raise ConfigError(f"objective=sida needs objective.discriminator=critic and gan_weight > 0 (got "
                              f"{cfg.discriminator}, {cfg.gan_weight}); use objective=sid for plain SiD")
        if cfg.gan_balance not in GAN_BALANCES:
            raise ConfigError(f"objective.gan_balance='{cfg.gan_balance}' is unknown; choose one of {GAN_BALANCES}")
        if cfg.gan_start_images < 0 or cfg.disc_p_std <= 0 or cfg.sigma_data <= 0:
            raise ConfigError(f"objective.gan_start_images={cfg.gan_start_images} must be >= 0, disc_p_std="
                              f"{cfg.disc_p_std} and sigma_data={cfg.sigma_data} > 0")
        if cfg.gan_balance == "official" and cfg.critic_t_dist not in ("unit", "lognormal"):
            raise ConfigError(f"objective.gan_balance=official draws the critic's sigma from lognormal(disc_p_mean, "
                              f"disc_p_std) as SiDA does, not critic_t_dist={cfg.critic_t_dist}; leave critic_t_dist "
                              "unset or use gan_balance=constant")
        if cfg.gan_balance == "official" and (cfg.fake_guidance != 1 or cfg.critic_guidance != 1):
            raise ConfigError("objective.gan_balance=official shares one critic forward between SiD and the GAN as "
                              "SiDA does, which has no guided critic; use fake_guidance=1 and critic_guidance=1 "
                              "or gan_balance=constant")

    def critic_t(self, nets: Nets, x: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.gan_balance == "official" or self.cfg.critic_t_dist == "lognormal":
            return lognormal_t(nets.critic.schedule, x.shape[0], self.cfg.disc_p_mean, self.cfg.disc_p_std, like=x)
        return super().critic_t(nets, x)

    def gan_on(self, step: int, n: int) -> bool:
        """Images seen before this step (step x the global batch) > gan_start_images (SiDA's cur_nimg > 200k)."""
        return step * (self.images_per_step or n) > self.cfg.gan_start_images

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        if self.cfg.gan_balance == "constant":
            return super().generator_loss(nets, batch, step)
        x = self.generate(nets, batch)
        t = sample_t(nets.teacher.schedule, x.shape[0], self.cfg.t_lo, self.cfg.t_hi, like=x, dist=self.cfg.t_dist)
        real, scales = self.pgsb.draw(self.real_model(nets), x)  # PG-SB (snoopi.py) when guidance_range is set
        per, w, x_t, logs = sid_terms(real, nets.critic, x, batch.cond, t, alpha=self.cfg.alpha)
        sid = (per / w).mean()
        out = {"sid": sid.detach(), **logs, **self.pgsb.logs(scales)}
        if not self.gan_on(step, x.shape[0]):
            return {"loss": sid, **out}
        with frozen(nets.critic, self.gan.head_module(nets)):
            logits = self.gan.logits(nets, x_t, t, batch.cond).clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
        bce = F.softplus(-logits).mean()
        gan = (bce / w.to(bce)).mean()  # sida_loss.py:72: the batch BCE over each sample's normalizer
        loss = 0.5 * sid + 0.5 * self.cfg.gan_weight * gan
        return {"loss": loss, **out, "gan_g": bce.detach(), "gan_over_w": gan.detach()}

    def critic_loss(self, nets: Nets, batch: Batch, step: int):
        if self.cfg.gan_balance == "constant":
            return super().critic_loss(nets, batch, step)
        if batch.real is None:
            raise ConfigError("objective=sida needs real data samples in the batch (data= with real samples)")
        with torch.no_grad():
            x = self.generate(nets, batch)
        sched = nets.critic.schedule
        t = self.critic_t(nets, x)
        n = torch.randn_like(x)
        dsm = dsm_loss(nets.critic, x, batch.cond, weighting=self.cfg.critic_weighting, t=t, eps=n)
        a, s = bcast(sched.alpha(t), x), bcast(sched.sigma(t), x)
        real = batch.real.to(x)
        d_fake = self.gan.logits(nets, a * x + s * n, t, batch.cond)
        d_real = self.gan.logits(nets, a * real + s * n, t, batch.cond)
        sig = (sched.sigma(t) / sched.alpha(t)).to(torch.promote_types(x.dtype, torch.float32))
        lam = (sig**2 + self.cfg.sigma_data**2) / (sig * self.cfg.sigma_data) ** 2
        bce = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        d = lam.mean() / 2 * bce / x[0].numel()  # sida_loss.py:123 over the elements its DSM sums (see docstring)
        loss = dsm + self.cfg.disc_weight * d
        return {"loss": loss, "dsm": dsm.detach(), "gan_d": bce.detach(), "d_real": d_real.mean().detach(),
                "d_fake": d_fake.mean().detach()}
