"""The fake-score critic update shared by the score-distillation objectives (DMD, DMD2, VSD, SiD, SIM,
f-distill): denoising score matching on detached generator samples, so the critic tracks the generator's
score (DMD eq. (6) / DMD2 Sec. 4.2), at the noise levels ``critic_t_dist`` draws (onestep.core.dsm_t: DMD2's Karras
grid, SiD's lognormal or the log-uniform default), plus ``disc_weight`` * L_D when the objective has a GAN head
(adversarial.py). Subclasses give the generator loss and may change the critic's model or labels
(SiD-LSG trains a guided critic).
"""

from __future__ import annotations

import torch

from onestep.denoisers.base import Denoiser
from onestep.objectives.adversarial import GANTerm
from onestep.objectives.base import Batch, Nets, Objective, check_critic_t_dist
from onestep.core import dsm_loss, dsm_t


class CriticObjective(Objective):
    networks = ("generator", "critic")

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if hasattr(cfg, "critic_t_dist"):  # (Phased DMD draws its sub-interval t itself)
            check_critic_t_dist(cfg)
        self.gan = GANTerm(cfg, has_critic=True)

    def build_modules(self, setup):
        return self.gan.build(setup)

    def critic_model(self, nets: Nets) -> Denoiser:
        return nets.critic

    def critic_cond(self, nets: Nets, batch: Batch):
        return batch.cond

    def critic_t(self, nets: Nets, x: torch.Tensor) -> torch.Tensor | None:
        """The DSM noise levels drawn by ``critic_t_dist`` in [critic_t_lo, critic_t_hi] (None for unit on the whole
        range: dsm_loss's own draw, u ~ U[0, 1] through the schedule, the same random numbers)."""
        c = self.cfg
        if c.critic_t_dist == "unit" and (c.critic_t_lo, c.critic_t_hi) == (0.0, 1.0):
            return None
        return dsm_t(nets.critic.schedule, x.shape[0], c.critic_t_dist, like=x, lo=c.critic_t_lo, hi=c.critic_t_hi)

    def critic_loss(self, nets: Nets, batch: Batch, step: int):
        with torch.no_grad():
            x = self.generate(nets, batch)
        loss = dsm_loss(self.critic_model(nets), x, self.critic_cond(nets, batch), weighting=self.cfg.critic_weighting,
                        t=self.critic_t(nets, x))
        out = {"dsm": loss}
        if self.gan.active:
            d, logs = self.gan.discriminator_loss(nets, x, batch)
            loss = loss + d
            out.update(logs)
        return {"loss": loss, **out}

    def with_gan(self, loss: torch.Tensor, out: dict, nets: Nets, x: torch.Tensor, cond,
                 logits: torch.Tensor | None = None) -> dict:
        """Adds lambda * L_G (when gan_weight > 0; at ``logits`` when the loss already read D) and returns the
        generator's loss dict."""
        if self.cfg.gan_weight > 0:
            gan, logs = self.gan.generator_loss(nets, x, cond, logits)
            loss = loss + gan
            out.update(logs)
        return {"loss": loss, **out}
