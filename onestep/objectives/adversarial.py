"""GAN heads shared by every objective, and the adversarial-only objective (LADD style).

Two discriminators, both a small head on a denoiser's features evaluated at *noised* samples
x_t = alpha_t x + sigma_t eps, t drawn by ``gan_t_dist`` in [gan_t_lo, gan_t_hi]:
  critic   DMD2 (Yin et al. 2024b, Sec. 4.3): the head sits on the fake-score critic; the discriminator
           loss also trains the critic's trunk (it is part of the critic update).
  teacher  LADD (Sauer et al. 2024, Sec. 3): the head sits on a *frozen* copy of the teacher network;
           only the head is trained. With the exact GMM teacher, the DSM-trained teacher MLP is that copy.
Heads (``gan_head``):
  mlp_pool      an MLP on ``features(x_t, t, cond)``: the last hidden layer of the 2-D / N-D MLPs, an image UNet's
                bottleneck averaged over space, a transformer's image tokens averaged
  conv          DMD2's official head on the spatial bottleneck (``spatial_features``, (B, C, h, w)): conv 4x4 stride 2
                + GroupNorm(32) + SiLU until 4x4 is left, a conv over the remaining h x w + GroupNorm + SiLU, a 1x1 conv
                to one logit (tianweiy/DMD2 main/edm/edm_guidance.py:48-56 for 8x8, main/sd_guidance.py:107-133 for
                SDXL's 32x32 and SD1.5's 8x8; here generalized to any size); image UNets only. The GroupNorm on the 1x1
                map normalizes each group's channels alone: DMD2's 768 / 1280 channels leave 24 / 40 per group, but
                a small UNet's 32 channels in 32 groups leave one, which it sets to 0 whatever the input (constant
                logits). So that norm takes fewer groups, at least CONV_HEAD_GROUP_CHANNELS channels each (none
                below that many channels): DMD2's head unchanged at its sizes
  channel_mean  SiDA's: no head parameters, the logits are the bottleneck's channel mean (B, h, w) or, on the MLPs,
                the last hidden layer's mean (B,) (mingyuanzhou/SiD branch sida, sida_training/sida_networks.py:151-152
                ``logits = x.mean(dim=1, keepdim=True)`` after the encoder); discriminator=critic only
Losses are the non-saturating GAN (Goodfellow et al. 2014; DMD2 eq. (5)-(6)):
  discriminator  L_D = E softplus(-D(x_t^real)) + E softplus(D(x_t^fake))
  generator      L_G = E softplus(-D(x_t^fake))
With logits D = log(p_t / q_t) at the optimum of L_D, which is what f-distill reads as its density ratio.

Any objective adds the head through the shared config fields of ``GANConfig`` and a ``GANTerm``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onestep import conditioning
from onestep.denoisers.base import Denoiser
from onestep.errors import ConfigError
from onestep.objectives.base import Batch, Nets, Objective, ObjectiveConfig, check_t_range, frozen, register_objective
from onestep.core import T_DISTS, noised, sample_t

DISCRIMINATORS = ("none", "critic", "teacher")
GAN_HEADS = ("mlp_pool", "conv", "channel_mean")
#: DMD2's conv head halves the bottleneck (conv 4x4 stride 2) down to this size, then one conv covers it
CONV_HEAD_FINAL = 4
#: GroupNorm groups of the conv head (DMD2's 32; fewer when the channels are not a multiple of 32)
CONV_HEAD_GROUPS = 32
#: the fewest channels per group of the GroupNorm on the 1x1 map (k channels normalized to mean 0, variance 1 keep
#: k - 2 degrees of freedom: one channel per group is always 0, two are always +-1)
CONV_HEAD_GROUP_CHANNELS = 8
HEAD = "disc"  # the trained head's name in Nets.modules and in checkpoints
HEAD_SEED = 0


@dataclass
class GANConfig:
    """The shared GAN block: objective.discriminator / gan_weight / disc_weight / gan_t_lo / gan_t_hi."""

    #: none | critic (DMD2 / SiDA head on the fake-score critic) | teacher (LADD head on frozen teacher features)
    discriminator: str = "none"
    #: generator weight lambda of L_G (DMD2's gen_cls_loss_weight: 3e-3 ImageNet, 1e-3 SD1.5, 5e-3 SDXL; tianweiy/DMD2
    #: experiments/imagenet/imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_scratch.sh:26)
    gan_weight: float = 0.0
    #: weight of L_D in the critic update (DMD2's guidance_cls_loss_weight / cls_loss_weight: 1e-2 in every released
    #: config, e.g. experiments/sdxl/sdxl_cond999_..._backsim_scratch.sh:36)
    disc_weight: float = 1.0
    #: the discriminator's noise level, drawn by gan_t_dist in [gan_t_lo, gan_t_hi] (fractions of the schedule's range)
    gan_t_lo: float = 0.02
    gan_t_hi: float = 0.98
    #: unit | grid | karras (onestep.core.sample_t); DMD2's is grid with gan_t_lo=0, gan_t_hi=1: an index uniform in
    #: 0..999 of the Karras grid / SD table, drawn for real and fake rows apart (main/edm/edm_guidance.py:174-179,
    #: main/sd_guidance.py:147-151; diffusion_gan_max_timestep 1000)
    gan_t_dist: str = "unit"
    #: mlp_pool (MLP on pooled features) | conv (DMD2's conv + GroupNorm head on an image UNet's spatial bottleneck)
    #: | channel_mean (SiDA's parameter-free logits); see onestep/objectives/adversarial.py
    gan_head: str = "mlp_pool"
    disc_hidden: int = 128


def features(denoiser: nn.Module, x_t, t, cond=None, *, spatial: bool = False) -> torch.Tensor:
    """The denoiser's ``features`` or ``spatial_features`` (the unguided network's: a head reads one branch, not
    the CFG mix)."""
    net = denoiser.unguided()
    entry = "spatial_features" if spatial else "features"
    if not hasattr(net, entry):
        raise ConfigError(f"objective.discriminator needs a network with {entry}(x_t, t, cond); "
                          f"{type(net).__name__} has none (use discriminator=none)")
    return getattr(net, entry)(x_t, t, cond)


def has_spatial_features(net: nn.Module) -> bool:
    return getattr(net, "spatial_feature_shape", None) is not None


class _TeacherFeatures(nn.Module):
    """``net`` (frozen, not a registered submodule, never checkpointed or optimized) supplies the features for the
    LADD head; for the DMD2 head the critic does."""

    spatial = False

    def __init__(self, net: Denoiser | None):
        super().__init__()
        self._frozen = [net] if net is not None else []

    def teacher_features(self, x_t, t, cond):
        net = self._frozen[0]
        if next(net.parameters()).device != x_t.device:
            net.to(x_t.device)
        return features(net, x_t, t, cond, spatial=self.spatial)


class Head(_TeacherFeatures):
    """Logit = MLP(features): ``gan_head=mlp_pool``."""

    def __init__(self, in_dim: int, hidden: int, net: Denoiser | None = None):
        super().__init__(net)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.mlp(feats.to(next(self.mlp.parameters()).dtype)).squeeze(-1)


def point_norm(c: int) -> nn.Module:
    """The conv head's norm on its 1x1 map: GroupNorm with the most groups (<= CONV_HEAD_GROUPS, dividing c) that keep
    CONV_HEAD_GROUP_CHANNELS channels each (DMD2's GroupNorm(32) at 768 / 1280 channels); none below that many
    channels."""
    fits = [g for g in range(1, CONV_HEAD_GROUPS + 1) if c % g == 0 and c // g >= CONV_HEAD_GROUP_CHANNELS]
    return nn.GroupNorm(max(fits), c) if fits else nn.Identity()


class ConvHead(_TeacherFeatures):
    """Logit = DMD2's conv stack on the (B, C, h, w) bottleneck: ``gan_head=conv`` (see the module docstring). On 8x8
    it is DMD2's ImageNet / SD1.5 head layer for layer, on 32x32 its SDXL head; in fp32, as DMD2 runs it."""

    spatial = True

    def __init__(self, shape: tuple[int, int, int], net: Denoiser | None = None):
        super().__init__(net)
        self.shape = tuple(shape)
        c, h, w = shape
        groups = math.gcd(CONV_HEAD_GROUPS, c)
        layers: list[nn.Module] = []
        while max(h, w) > CONV_HEAD_FINAL:
            layers += [nn.Conv2d(c, c, kernel_size=4, stride=2, padding=1), nn.GroupNorm(groups, c), nn.SiLU()]
            h, w = max(h // 2, 1), max(w // 2, 1)
        layers += [nn.Conv2d(c, c, kernel_size=(h, w), stride=(h, w)), point_norm(c), nn.SiLU(),
                   nn.Conv2d(c, 1, kernel_size=1)]
        self.convs = nn.Sequential(*layers)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        out = self.convs(feats.to(next(self.convs.parameters()).dtype))
        if out.shape[1:] != (1, 1, 1):
            raise ConfigError(f"objective.gan_head=conv was built for the bottleneck {self.shape} but got "
                              f"{tuple(feats.shape[1:])}; the network's spatial_feature_shape is wrong")
        return out.flatten()


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
        if cfg.gan_t_dist not in T_DISTS:
            raise ConfigError(f"objective.gan_t_dist='{cfg.gan_t_dist}' is unknown; choose one of {T_DISTS}")
        if cfg.gan_head not in GAN_HEADS:
            raise ConfigError(f"objective.gan_head='{cfg.gan_head}' is unknown; choose one of {GAN_HEADS}")
        if cfg.gan_head == "channel_mean" and cfg.discriminator == "teacher":
            raise ConfigError("objective.gan_head=channel_mean has no parameters, so on the frozen teacher "
                              "(discriminator=teacher) nothing would learn; use discriminator=critic or gan_head=mlp_pool")
        self.cfg = cfg
        self.kind = cfg.discriminator
        self.head = cfg.gan_head

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
        if self.head == "conv" and not has_spatial_features(net):
            raise ConfigError(f"objective.gan_head=conv needs spatial features (an image UNet's bottleneck); "
                              f"{type(net).__name__}'s features are a vector: use objective.gan_head=mlp_pool")
        if self.head == "channel_mean":
            return {}
        frozen_net = copy.deepcopy(net).eval().requires_grad_(False) if self.kind == "teacher" else None
        with torch.random.fork_rng(devices=[]):  # the head's init must not depend on what ran before
            torch.manual_seed(HEAD_SEED)
            if self.head == "conv":
                head = ConvHead(net.spatial_feature_shape, frozen_net)
            else:
                head = Head(dim, self.cfg.disc_hidden, frozen_net)
        return {HEAD: (head, "critic")}

    def head_module(self, nets: Nets) -> nn.Module | None:
        return nets.modules.get(HEAD)

    def logits(self, nets: Nets, x_t, t, cond) -> torch.Tensor:
        """(B,) logits, or (B, h, w) for channel_mean on a spatial bottleneck."""
        if self.head == "channel_mean":
            spatial = has_spatial_features(nets.critic.unguided())
            return features(nets.critic, x_t, t, cond, spatial=spatial).mean(1)
        head = nets.modules[HEAD]
        if self.kind == "teacher":
            return head(head.teacher_features(x_t, t, cond))
        return head(features(nets.critic, x_t, t, cond, spatial=head.spatial))

    def _noised(self, nets: Nets, x):
        sched = nets.teacher.schedule
        t = sample_t(sched, x.shape[0], self.cfg.gan_t_lo, self.cfg.gan_t_hi, like=x, dist=self.cfg.gan_t_dist)
        return noised(sched, x, t)[0], t

    def generator_logits(self, nets: Nets, x_t, t, cond) -> torch.Tensor:
        """D(x_t) for L_G: the gradient reaches x_t through the frozen critic and head."""
        with frozen(nets.critic if self.kind == "critic" else None, self.head_module(nets)):
            return self.logits(nets, x_t, t, cond)

    def generator_loss(self, nets: Nets, x, cond, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """lambda * L_G at generator samples x noised at the GAN's own t, or at ``logits`` already read at another
        loss's x_t (f-distill's, as FastGen shares it)."""
        if logits is None:
            x_t, t = self._noised(nets, x)
            logits = self.generator_logits(nets, x_t, t, cond)
        loss = F.softplus(-logits).mean()
        return self.cfg.gan_weight * loss, {"gan_g": loss.detach()}

    def discriminator_loss(self, nets: Nets, fake, batch: Batch) -> tuple[torch.Tensor, dict]:
        """disc_weight * L_D on noised real data vs noised (detached) generator samples. Every row draws its own t and
        noise, the real rows independently of the fake ones, as DMD2's two compute_cls_logits calls do
        (tianweiy/DMD2 main/edm/edm_guidance.py:202-209)."""
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
