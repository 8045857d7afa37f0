"""GAN heads shared by every objective, and the adversarial-only objective (LADD style).

Two discriminators, both a small MLP head on a denoiser's last hidden layer (``features(x_t, t, cond)``)
evaluated at *noised* samples x_t = alpha_t x + sigma_t eps, t ~ U[t_lo, t_hi]:
  critic   DMD2 (Yin et al. 2024b, Sec. 4.3): the head sits on the fake-score critic; the discriminator
           loss also trains the critic's trunk (it is part of the critic update).
  teacher  LADD (Sauer et al. 2024, Sec. 3): the head sits on a *frozen* copy of the teacher network;
           only the head is trained. With the exact GMM teacher, the DSM-trained teacher MLP is that copy.
Losses are the non-saturating GAN (Goodfellow et al. 2014; DMD2 eq. (5)-(6)):
  discriminator  L_D = E softplus(-D(x_t^real)) + E softplus(D(x_t^fake))
  generator      L_G = E softplus(-D(x_t^fake))
With logits D = log(p_t / q_t) at the optimum of L_D, which is what f-distill reads as its density ratio.

Any objective adds the head through the shared config fields of ``GANConfig`` and a ``GANTerm``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onestep import conditioning
from onestep.denoisers.base import Denoiser, Guided
from onestep.errors import ConfigError
from onestep.objectives.base import Batch, Nets, Objective, ObjectiveConfig, check_t_range, frozen, register_objective
from onestep.core import noised, sample_t

DISCRIMINATORS = ("none", "critic", "teacher")
HEAD = "disc"  # the trained head's name in Nets.modules and in checkpoints
HEAD_SEED = 0


@dataclass
class GANConfig:
    """The shared GAN block: objective.discriminator / gan_weight / disc_weight / gan_t_lo / gan_t_hi."""

    #: none | critic (DMD2 / SiDA head on the fake-score critic) | teacher (LADD head on frozen teacher features)
    discriminator: str = "none"
    #: generator weight lambda of L_G (DMD2 uses 3e-3 on images)
    gan_weight: float = 0.0
    #: weight of L_D in the critic update
    disc_weight: float = 1.0
    #: t ~ U[gan_t_lo, gan_t_hi] (fractions of the schedule's range) for the discriminator's noised inputs
    gan_t_lo: float = 0.02
    gan_t_hi: float = 0.98
    disc_hidden: int = 128


def features(denoiser: nn.Module, x_t, t, cond=None) -> torch.Tensor:
    """The denoiser's ``features`` (the unguided network's: a head reads one branch, not the CFG mix)."""
    net = denoiser.base if isinstance(denoiser, Guided) else denoiser
    if not hasattr(net, "features"):
        raise ConfigError(f"objective.discriminator needs a network with features(x_t, t, cond); "
                          f"{type(net).__name__} has none (use discriminator=none)")
    return net.features(x_t, t, cond)


class Head(nn.Module):
    """Logit = MLP(features). ``net`` (frozen, not a registered submodule, never checkpointed or optimized)
    supplies the features for the LADD head; for the DMD2 head the critic does."""

    def __init__(self, in_dim: int, hidden: int, net: Denoiser | None = None):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))
        self._frozen = [net] if net is not None else []

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.mlp(feats.to(next(self.mlp.parameters()).dtype)).squeeze(-1)

    def teacher_features(self, x_t, t, cond):
        net = self._frozen[0]
        if next(net.parameters()).device != x_t.device:
            net.to(x_t.device)
        return net.features(x_t, t, cond)


class GANTerm:
    """The GAN head of one objective: builds the head, gives L_G (generator) and L_D (critic update)."""

    def __init__(self, cfg: GANConfig, has_critic: bool):
        if cfg.discriminator not in DISCRIMINATORS:
            raise ConfigError(f"objective.discriminator='{cfg.discriminator}' is unknown; "
                              f"choose one of {DISCRIMINATORS}")
        if cfg.gan_weight < 0 or cfg.disc_weight < 0:
            raise ConfigError(f"objective.gan_weight={cfg.gan_weight} and disc_weight={cfg.disc_weight} must be >= 0")
        if cfg.gan_weight > 0 and cfg.discriminator == "none":
            raise ConfigError(f"objective.gan_weight={cfg.gan_weight} needs a discriminator; set "
                              "objective.discriminator=critic (DMD2) or teacher (LADD), or gan_weight=0")
        if cfg.discriminator == "critic" and not has_critic:
            raise ConfigError(f"objective.discriminator=critic needs an objective with a critic ({cfg.name} has none); "
                              "use objective.discriminator=teacher")
        check_t_range(cfg, "gan_t_lo", "gan_t_hi")
        self.cfg = cfg
        self.kind = cfg.discriminator

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def build(self, setup) -> dict[str, tuple[nn.Module, str]]:
        if not self.active:
            return {}
        net = setup.student_init
        dim = getattr(net, "feature_dim", None)
        if dim is None:
            raise ConfigError(f"objective.discriminator={self.kind} needs a network with features(); "
                              f"{type(net).__name__} has none (use objective.discriminator=none)")
        frozen_net = copy.deepcopy(net).eval().requires_grad_(False) if self.kind == "teacher" else None
        with torch.random.fork_rng(devices=[]):  # the head's init must not depend on what ran before
            torch.manual_seed(HEAD_SEED)
            head = Head(dim, self.cfg.disc_hidden, frozen_net)
        return {HEAD: (head, "critic")}

    def logits(self, nets: Nets, x_t, t, cond) -> torch.Tensor:
        head = nets.modules[HEAD]
        feats = head.teacher_features(x_t, t, cond) if self.kind == "teacher" else features(nets.critic, x_t, t, cond)
        return head(feats)

    def _noised(self, nets: Nets, x):
        sched = nets.teacher.schedule
        t = sample_t(sched, x.shape[0], self.cfg.gan_t_lo, self.cfg.gan_t_hi, like=x)
        return noised(sched, x, t)[0], t

    def generator_loss(self, nets: Nets, x, cond) -> tuple[torch.Tensor, dict]:
        """lambda * L_G at generator samples x (gradient reaches x through the frozen critic and head)."""
        with frozen(nets.critic if self.kind == "critic" else None, nets.modules[HEAD]):
            x_t, t = self._noised(nets, x)
            loss = F.softplus(-self.logits(nets, x_t, t, cond)).mean()
        return self.cfg.gan_weight * loss, {"gan_g": loss.detach()}

    def discriminator_loss(self, nets: Nets, fake, batch: Batch) -> tuple[torch.Tensor, dict]:
        """disc_weight * L_D on noised real data vs noised (detached) generator samples, same t for both."""
        if batch.real is None:
            raise ConfigError("objective.discriminator needs real data samples in the batch (data= with real samples)")
        x_t, t = self._noised(nets, torch.cat([batch.real.to(fake), fake.detach()]))
        cond = conditioning.cat([batch.cond, batch.cond])
        d_real, d_fake = self.logits(nets, x_t, t, cond).chunk(2)
        loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        return self.cfg.disc_weight * loss, {"gan_d": loss.detach(), "d_real": d_real.mean().detach(),
                                             "d_fake": d_fake.mean().detach()}


@dataclass
class AdversarialConfig(ObjectiveConfig, GANConfig):
    name: str = "adversarial"
    ttur: int = 1
    discriminator: str = "teacher"
    gan_weight: float = 1.0


@register_objective
class Adversarial(Objective):
    """LADD-style adversarial distillation alone: L_G for the generator, L_D for a head on frozen teacher
    features (no fake-score critic). Pure GAN training is the least stable objective here; it mostly serves
    as the term other objectives add."""

    name = "adversarial"
    Config = AdversarialConfig
    networks = ("generator",)

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if cfg.gan_weight <= 0:
            raise ConfigError(f"objective.gan_weight={cfg.gan_weight} must be > 0 for objective=adversarial")
        self.gan = GANTerm(cfg, has_critic=False)

    def build_modules(self, setup):
        return self.gan.build(setup)

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        x = self.generate(nets, batch)
        loss, logs = self.gan.generator_loss(nets, x, batch.cond)
        return {"loss": loss, **logs}

    def critic_loss(self, nets: Nets, batch: Batch, step: int):
        with torch.no_grad():
            x = self.generate(nets, batch)
        loss, logs = self.gan.discriminator_loss(nets, x, batch)
        return {"loss": loss, **logs}
