"""Motion Consistency Model (Zhai et al. 2024, "Motion Consistency Model: Accelerating Video Diffusion with
Disentangled Motion-Appearance Distillation", arXiv 2406.06890; official code yhZhai/mcm, cited as file:line).

Motion: video consistency distillation from the teacher (cd.py: CM eq. (7) on a whole video's x0), with the distance
taken between motion representations g of the consistency outputs (the paper's disentangled motion distillation):
    L_MCD = d( g(f_theta(x_{n+1}, t_{n+1})), sg[ g(f_theta-(x^_n, t_n)) ] )
  motion=raw    g = identity: plain video LCM (prepare_cd_target "raw", utils/diffusion_misc.py:302-303)
  motion=diff   g(x) = x_{frame i+1} - x_{frame i} (utils/diffusion_misc.py:306-310)
  motion=learn  g = a residual per-frame head x + conv1x1(SiLU(GN(conv1x1(SiLU(x))))) whose last conv starts at zero
                (models/spatial_head.py; SpatialHead(num_layers=2, kernel_size=1, hidden 64), main.py:599-604), trained
                with the generator: the released recipe's ``--cd_target learn``. The official target side reads an EMA
                copy of the head (decay 0.95, main.py:1761-1768); here it reads the head itself under stop-gradient,
                as the generator's own target does (target_ema=0; the released LoRA recipe's U-Net target too)
  d is LCM's per-element pseudo-Huber with c = 0.001 (distance=huber_mean, main.py:1537-1544).
Appearance: a frame discriminator D on single frames of the student's consistency output f_theta (``disc_frames``
frames per step, the same ones for every video, as utils/misc.py:120-121,156 ``random_sample`` picks them) against
still images: ``stills`` = a folder of captioned images, each encoded by the teacher's codec as a 1-frame video
(onestep.data.stills); unset, D's real frames are frames of the run's own videos (the official ``--disc_gt_data
webvid``, scripts/modelscopet2v_distillation.sh). With f = f_theta's frames and y = real frames:
    hinge  L_D = E relu(1 - D(y)) + E relu(1 + D(f))    L_G = 1 - E D(f)    (main.py:1579-1580, 1674-1680)
    wgan   L_D = E max(-1, -D(y)) + E max(-1, D(f))     L_G = -E D(f)       (main.py:1581-1582, 1681-1687)
  L = L_MCD + gan_weight L_G; the released scripts use wgan with disc_loss_weight 1 (scripts/modelscopet2v_*.sh).
  D is the shared head of adversarial.py (``discriminator=teacher``: frozen teacher features of the noised frame,
  gan_t_*; a trained MLP or conv head). The official D is ADD's projected discriminator on DINOv2 features of decoded
  frames with CLIP text conditioning (models/discriminator_handcraft.py), plus a WGAN-GP penalty (|grad| - 1)^2 of
  weight 1e-5 on interpolates of its DINO features (main.py:1697-1745); onestep has neither network, so neither the
  discriminator nor its penalty is carried.
  D judges latent frames, the official one decoded pixels: a still encoded as a 1-frame video is exactly what a causal
  video VAE makes of a first frame (Wan's latent frame 0), while Wan's later latent frames each hold 4 pixel frames;
  decoding the student's frames instead would add a VAE decode with gradient to every generator step.
Mixed trajectory distillation: with probability ``mixed_portion`` per step (the released 0.5, ``--cd_pred_x0_portion``,
main.py:1340-1343, 1363-1389) the consistency pair is built on the student's own sample from noise (no gradient)
instead of a data video, so the distilled trajectories cover the generated videos' domain as well as the data's.
Data that hold no videos (data=prompts) run at its end point: mixed_portion=1, with ``stills`` as D's real frames.
Guidance: the released recipe draws the teacher's CFG scale per video, w ~ U[5, 15] in LCM's convention
x0 = c + w (c - u) (``--w_min 5 --w_max 15``, main.py:1324-1326, 1484-1487); ``guidance_range=[6, 16]`` is the same
draw in this project's convention (1 = the conditional model; snoopi.RandomGuidance); unset, the teacher keeps
teacher.guidance.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from onestep import conditioning
from onestep.core import Batch, Nets
from onestep.errors import ConfigError
from onestep.objectives.adversarial import GANConfig, GANTerm
from onestep.objectives.base import frozen, register_objective
from onestep.objectives.cd import CDConfig, ConsistencyDistillation
from onestep.objectives.snoopi import RandomGuidance, RandomGuidanceConfig

MOTIONS = ("raw", "diff", "learn")
DISC_LOSSES = ("hinge", "wgan")
#: GroupNorm groups of the learned motion head (SpatialHead's norm_num_groups)
MOTION_HEAD_GROUPS = 32
MOTION_HEAD = "motion_head"  # the learned g's name in Nets.modules and in checkpoints


@dataclass
class MCMConfig(CDConfig, GANConfig, RandomGuidanceConfig):
    name: str = "mcm"
    #: the teacher's ODE step between adjacent levels: euler is LCM's DDIM step on rectified-flow teachers (Wan)
    solver: str = "euler"
    #: levels of the discretization (LCM's 50 DDIM timesteps, ``--num_ddim_timesteps 50``)
    num_scales: int = 50
    distance: str = "huber_mean"
    huber_c: float = 0.001
    discriminator: str = "teacher"
    #: weight of L_G (``--disc_loss_weight 1``)
    gan_weight: float = 1.0
    #: motion representation g: raw | diff | learn (see onestep/objectives/mcm.py)
    motion: str = "learn"
    motion_hidden: int = 64
    #: the frame GAN's losses: hinge | wgan (the released scripts' ``--disc_loss_type wgan``)
    disc_loss: str = "wgan"
    #: frames of each video the discriminator sees per step (``--disc_tsn_num_frames 2``)
    disc_frames: int = 2
    #: probability of a step distilling on the student's own sample (``--cd_pred_x0_portion 0.5``)
    mixed_portion: float = 0.5
    #: folder of still images with same-name .txt captions: the discriminator's real frames; None = frames of the data
    stills: Optional[str] = None


def generator_adv_loss(d_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """MCM's L_G on the discriminator's logits of the student's frames."""
    if kind == "hinge":
        return 1 - d_fake.mean()
    return -d_fake.mean()


def discriminator_adv_loss(d_real: torch.Tensor, d_fake: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MCM's L_D as its (real, fake) parts."""
    if kind == "hinge":
        return F.relu(1 - d_real).mean(), F.relu(1 + d_fake).mean()
    return torch.clamp(-d_real, min=-1).mean(), torch.clamp(d_fake, min=-1).mean()


class MotionHead(nn.Module):
    """The learned g: per frame (B F, C, h, w), x + conv_out(SiLU(GN(conv_in(SiLU(x))))), conv_out zero at init."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, hidden, 1),
                                 nn.GroupNorm(math.gcd(MOTION_HEAD_GROUPS, hidden), hidden), nn.SiLU(),
                                 nn.Conv2d(hidden, channels, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return frames + self.net(frames.to(self.net[1].weight.dtype)).to(frames.dtype)


class Frames:
    """A batch's frames, in the teacher's layout: a video's frame axis is its ``frame_axis``; an image or a point is
    a single frame itself."""

    def __init__(self, teacher):
        net = teacher.unguided()
        self.video = len(net.data_shape) == 4
        if self.video and net.frame_axis is None:
            raise ConfigError(f"objective=mcm needs the frame axis of the video teacher's latents; "
                              f"{type(net).__name__} declares no frame_axis (its family must set it)")
        self.axis = net.frame_axis + 1 if self.video else None  # in a batch tensor
        self.count = net.data_shape[net.frame_axis] if self.video else 1

    def stack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F, *frame) with the frame axis moved next to the batch axis."""
        return x.movedim(self.axis, 1) if self.video else x[:, None]

    def pick(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Frames ``idx`` of every sample as 1-frame samples (B len(idx), ...), sample-major."""
        if not self.video:
            return x
        f = self.stack(x)[:, idx.to(x.device)]
        return f.reshape(-1, *f.shape[2:]).unsqueeze(self.axis)

    def draw(self, k: int) -> torch.Tensor:
        """k distinct frame indices, the same for the whole batch (one draw per step)."""
        if not self.video:
            return torch.zeros(1, dtype=torch.long)
        if k > self.count:
            raise ConfigError(f"objective.disc_frames={k} exceeds the teacher's {self.count} latent frames; "
                              f"pass objective.disc_frames<={self.count}")
        return torch.randperm(self.count)[:k]


@register_objective
class MCM(ConsistencyDistillation):
    name = "mcm"
    Config = MCMConfig
    networks = ("generator",)

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if cfg.motion not in MOTIONS:
            raise ConfigError(f"objective.motion='{cfg.motion}' is unknown; choose one of {MOTIONS}")
        if cfg.disc_loss not in DISC_LOSSES:
            raise ConfigError(f"objective.disc_loss='{cfg.disc_loss}' is unknown; choose one of {DISC_LOSSES}")
        if cfg.disc_frames < 1:
            raise ConfigError(f"objective.disc_frames={cfg.disc_frames} must be >= 1 (frames per video D sees)")
        if not 0 <= cfg.mixed_portion <= 1:
            raise ConfigError(f"objective.mixed_portion={cfg.mixed_portion} must be in [0, 1] (a probability)")
        self.gan = GANTerm(cfg, has_critic=False)
        self.guidance = RandomGuidance(cfg)
        if cfg.stills and not self.gan.active:
            raise ConfigError(f"objective.stills='{cfg.stills}' feeds the frame discriminator, which is off: pass "
                              "objective.discriminator=teacher or leave objective.stills unset")
        self.frames: Frames | None = None
        self.stills = None

    def data_streams(self):
        return {"stills": self.cfg.stills} if self.cfg.stills else {}

    def set_data(self, sources):
        self.stills = sources["stills"]

    def build_modules(self, setup):
        self.frames = Frames(setup.teacher)
        modules = self.gan.build(setup)
        if self.cfg.motion == "diff" and self.frames.count < 2:
            raise ConfigError("objective.motion=diff compares consecutive frames and needs video data; use "
                              "objective.motion=raw or learn")
        if self.cfg.motion == "learn":
            frame = self.frames.stack(torch.zeros(1, *setup.teacher.data_shape)).shape[2:]
            if len(frame) != 3:
                raise ConfigError(f"objective.motion=learn needs frames of (channels, h, w), the teacher's are "
                                  f"{tuple(frame)}; use objective.motion=raw")
            modules[MOTION_HEAD] = (MotionHead(frame[0], self.cfg.motion_hidden), "generator")
        return modules

    def represent(self, nets: Nets, x0):
        if self.cfg.motion == "raw":
            return x0
        f = self.frames.stack(x0)
        if self.cfg.motion == "diff":
            return f[:, 1:] - f[:, :-1]
        b, n = f.shape[:2]
        return nets.modules[MOTION_HEAD](f.reshape(b * n, *f.shape[2:])).reshape(f.shape)

    def _trajectory(self, nets: Nets, batch: Batch) -> Batch:
        """Mixed trajectory distillation: the batch, or (with probability mixed_portion, one coin per step) the batch
        with the student's own sample from its noise as x0."""
        if batch.real is None and (self.cfg.mixed_portion < 1 or self.gan.active and self.stills is None):
            raise ConfigError("objective=mcm needs data videos (x0) for its consistency trajectories and its "
                              "discriminator's real frames, and this data gives none: use data with videos, or pass "
                              "objective.mixed_portion=1 (the student's own trajectories) and objective.stills=<folder>")
        if self.cfg.mixed_portion > 0 and float(torch.rand(())) < self.cfg.mixed_portion:
            with torch.no_grad():
                return dataclasses.replace(batch, real=self.generate(nets, batch).detach())
        return batch

    def _real_frames(self, batch: Batch, idx: torch.Tensor, n: int, device):
        """D's real frames and their conditions: n stills, or frames ``idx`` of the data videos."""
        if self.stills is not None:
            s = self.stills.batch(n, device)
            return s.real, s.cond
        return self.frames.pick(batch.real, idx), _repeat(batch.cond, len(idx))

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        batch = self._trajectory(nets, batch)
        teacher, w = self.guidance.draw(nets.teacher, batch.noise)  # the teacher's ODE step at a per-video scale
        out, f = self.consistency_loss(dataclasses.replace(nets, teacher=teacher), batch, step)
        out.update(self.guidance.logs(w))
        if not self.gan.active:
            return out
        idx = self.frames.draw(self.cfg.disc_frames)
        fake, cond = self.frames.pick(f, idx), _repeat(batch.cond, len(idx))
        with frozen(self.gan.head_module(nets)):
            x_t, t = self.gan._noised(nets, fake)
            adv = generator_adv_loss(self.gan.logits(nets, x_t, t, cond), self.cfg.disc_loss)
        return {**out, "loss": out["loss"] + self.cfg.gan_weight * adv, "consistency_loss": out["loss"].detach(),
                "adv_g": adv.detach()}

    def critic_loss(self, nets: Nets, batch: Batch, step: int):
        """L_D on the student's consistency outputs (detached) against real frames."""
        b = self._trajectory(nets, batch)
        with torch.no_grad():
            _, _, _, t_hi, x_hi, _, _ = self.pair(nets.generator.schedule, b.real, step)
            f = nets.generator.x0(x_hi, t_hi, b.cond)
        idx = self.frames.draw(self.cfg.disc_frames)
        fake, fake_cond = self.frames.pick(f, idx), _repeat(b.cond, len(idx))
        real, real_cond = self._real_frames(batch, idx, fake.shape[0], fake.device)
        if tuple(real.shape[1:]) != tuple(fake.shape[1:]):
            raise ConfigError(f"objective.stills encode to {tuple(real.shape[1:])} but the teacher's frames are "
                              f"{tuple(fake.shape[1:])}; give stills of the teacher's resolution (teacher.resolution)")
        x_t, t = self.gan._noised(nets, torch.cat([real.to(fake), fake]))
        d_real, d_fake = self.gan.logits(nets, x_t, t, conditioning.cat([real_cond, fake_cond])).chunk(2)
        l_real, l_fake = discriminator_adv_loss(d_real, d_fake, self.cfg.disc_loss)
        loss = l_real + l_fake
        return {"loss": self.cfg.disc_weight * loss, "adv_d": loss.detach(), "d_real": d_real.mean().detach(),
                "d_fake": d_fake.mean().detach()}


def _repeat(cond, k: int):
    """Each row's condition k times in a row (the sample-major order of Frames.pick)."""
    if cond is None or k == 1:
        return cond
    return conditioning.select(cond, torch.arange(len(cond)).repeat_interleave(k))
