"""sCM: continuous-time consistency models in TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models"). ``scd`` distills a teacher (sCD), ``sct`` trains from data (sCT).

TrigFlow (Sec. 2): x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I); consistency function
    f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t)                           eq. (1)
with v_theta = sigma_d F_theta the model's velocity. Teacher and student are seen through the exact
training-free TrigFlow conversion (denoisers/trigflow.py), whatever their own schedule, so
f_theta = student.x0 and the boundary f(x, 0) = x holds by construction.

One step (Algorithm 1; per sample, D = data dimension):
    tau ~ N(P_mean, P_std^2),  t = arctan(e^tau / sigma_d)                                         Sec. 4.3 / App. G
    dx_t/dt = v_teacher(x_t, t)  (sCD, teacher CFG = teacher.guidance)   or  cos(t) z - sin(t) x0  (sCT)
    (v-, cs dv-/dt) = JVP of v_theta- along (cs dx_t/dt, cs),  cs = cos(t) sin(t)      stop-grad, float32
    g = -cos^2(t) (v- - dx_t/dt) - r (sin(t) cos(t) x_t + cs dv-/dt),   r = min(1, step / warmup)  eq. (8), tangent warm-up
    g <- g / (||g|| + c)                                                           tangent normalization, Sec. 4.2
    L = e^{w_phi(t)} / D ||F_theta - F_theta- - g||^2 - w_phi(t)                    adaptive weighting, eq. (9)
g is cos(t) times the total derivative df-/dt along the probability-flow ODE (cos(t) df/dt = g at r = 1), so
the gradient of L at theta = theta- is the continuous-time CM gradient E[w(t) grad f_theta^T df-/dt] (eq. 6).

Variants (named options; defaults = Algorithm 1 above):
    tangent_warmup=rcm   rCM's warm-up (NVlabs/rcm rcm/models/t2v_model_distill_rcm.py:548-552):
                         g = -cos(t) sqrt(1 - r^2 sin^2(t)) (v- - dx_t/dt) - (r sin(t) cos(t) x_t + cs dv-/dt),
                         the JVP term not scaled by r; equal to eq. (8) at r = 1
    tangent_norm=rms     g / (||g|| / sqrt(D) + c): FastGen's g_norm_spatial_invariance (NVlabs/FastGen
                         fastgen/methods/consistency_model/sCM.py:272-275, on by default in configs/methods/config_scm.py:57)
    prior_weighting      the error times 1 / (sigma_d tan t) = alpha/sigma (prior_sigma=trigflow): SANA-Sprint (NVlabs/Sana
                         train_scripts/train_scm_ladd.py, weight = 1 / (tan(t) sigma_data)); or times 1 / sigma_t of the
                         network's own schedule at the same SNR (prior_sigma=native): FastGen sCM.py:198, :278. The two
                         agree on EDM (alpha = 1); on a VP teacher FastGen's is larger by 1 / alpha_t = sqrt(1 + sigma_d^2 tan^2 t)
    divide_by_dim        the per-sample mean square divided by D once more: FastGen sCM.py:279-285 (divide_x_0_spatial_dim)

GAN block (adversarial.py's GANConfig): ``objective.discriminator=teacher`` + ``gan_weight`` adds LADD's generator
loss on the 1-step student's samples, with the head on frozen teacher features trained by the critic update on real
vs generated latents: SANA-Sprint's sCD + LADD hybrid (Chen et al. 2025, Sec. 3.3; experiment=sana_sprint).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onestep.denoisers.attention import jvp_attention
from onestep.denoisers.base import Denoiser
from onestep.denoisers.nets import FourierTime
from onestep.denoisers.trigflow import as_trigflow, velocity
from onestep.errors import ConfigError
from onestep.objectives.adversarial import GANConfig, GANTerm
from onestep.objectives.base import Batch, Nets, Objective, ObjectiveConfig, register_objective
from onestep.schedules import bcast


@dataclass
class SCMConfig(ObjectiveConfig, GANConfig):
    name: str = "scd"
    #: TrigFlow data standard deviation sigma_d
    sigma_data: float = 0.5
    #: proposal of tau = log(sigma_d tan t) ~ N(P_mean, P_std^2) (App. G: -1.0 / 1.4 for CIFAR-10)
    p_mean: float = -1.0
    p_std: float = 1.4
    #: tangent normalization constant c (Sec. 4.2); 0 = off
    tangent_norm_c: float = 0.1
    #: tangent warm-up: r rises linearly from 0 to 1 over this many steps (0 = off)
    warmup_steps: int = 1000
    #: how r enters the tangent: scm (Algorithm 1: r scales x_t and JVP terms) | rcm (rCM's official code: the
    #: difference term scaled by cos t sqrt(1 - r^2 sin^2 t), the JVP term not by r; NVlabs/rcm
    #: rcm/models/t2v_model_distill_rcm.py:548-552)
    tangent_warmup: str = "scm"
    #: tangent normalization g / (norm + c): l2 (Algorithm 1, ||g||) | rms (||g|| / sqrt(D): FastGen's default
    #: g_norm_spatial_invariance, NVlabs/FastGen fastgen/methods/consistency_model/sCM.py:272-275)
    tangent_norm: str = "l2"
    #: weight the error by 1 / (sigma_d tan t) (FastGen sCM.py:278 prior_weighting_enabled, default on; SANA-Sprint's
    #: train_scripts/train_scm_ladd.py weight = 1 / sigma)
    prior_weighting: bool = False
    #: the prior weight's sigma: trigflow (1 / (sigma_d tan t), SANA-Sprint) | native (1 / sigma_t of the network's own
    #: schedule at the same SNR: FastGen, NVlabs/FastGen fastgen/methods/consistency_model/sCM.py:198, :278)
    prior_sigma: str = "trigflow"
    #: divide the per-sample mean square error by D once more (FastGen sCM.py:279-285 divide_x_0_spatial_dim, default on)
    divide_by_dim: bool = False
    #: adaptive weighting with a learned log-variance head w_phi(t) (eq. 9); off = plain mean
    adaptive_weighting: bool = True
    #: the head's time embedding: Fourier features of t with frequencies ~ N(0, scale^2) (Sec. 4.1 warns that
    #: a large Fourier scale makes d/dt of the embedding, and so the tangent, explode)
    logvar_time_scale: float = 1.0
    logvar_hidden: int = 64


class LogVarHead(nn.Module):
    """w_phi(t): Fourier(t) -> Linear -> SiLU -> Linear -> scalar; starts at 0 (unit weight)."""

    def __init__(self, hidden: int = 64, time_dim: int = 32, scale: float = 1.0):
        super().__init__()
        self.time = FourierTime(time_dim, scale=scale, seed=1)
        self.net = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(self.time(t.float())).squeeze(1)


def trig_times(n: int, sigma_data: float, p_mean: float, p_std: float, t_min: float, t_max: float,
               like: torch.Tensor) -> torch.Tensor:
    """t = arctan(e^tau / sigma_d), tau ~ N(P_mean, P_std^2), clamped into [t_min, t_max]."""
    tau = p_mean + p_std * torch.randn(n, dtype=torch.float64)
    t = torch.arctan(torch.exp(tau) / sigma_data).clamp(t_min, t_max)
    return t.to(device=like.device, dtype=like.dtype)


def prior_sigma(schedule, t: torch.Tensor, sigma_data: float, form: str = "trigflow") -> torch.Tensor:
    """The sigma the prior weighting divides by at TrigFlow time t: sigma_d tan t (trigflow: sigma / alpha at t's SNR), or
    (native) sigma_t of ``schedule`` (the network's own) at the same SNR, as FastGen's 1 / sigma_t (sCM.py:198, :278,
    where tan t_hat = sigma_t / (alpha_t sigma_d), :203)."""
    sig = sigma_data * torch.tan(t)
    if form == "trigflow":
        return sig
    return schedule.sigma(schedule.t_of_logsnr(-2 * torch.log(sig))).to(t)


PRIOR_SIGMAS = ("trigflow", "native")
WARMUPS = ("scm", "rcm")
TANGENT_NORMS = ("l2", "rms")


def scm_tangent(student: Denoiser, x_t: torch.Tensor, t: torch.Tensor, dxdt: torch.Tensor, cond=None, *,
                warmup: float = 1.0, norm_c: float = 0.1, warmup_form: str = "scm",
                norm: str = "l2") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(v-, g): the stop-grad student velocity and the (normalized) sCM tangent of eq. (8), with the warm-up form and
    the norm of the module docstring's variants.

    ``student`` is TrigFlow-scheduled. The JVP runs in float32 (or wider) with autocast off, and with SDPA held
    to its MATH backend unless the model's attention is routed through onestep.kernels (generator.attention).
    """
    wdtype = torch.promote_types(x_t.dtype, torch.float32)
    x, tt, dx = x_t.detach().to(wdtype), t.detach().to(wdtype), dxdt.detach().to(wdtype)
    cos, sin = torch.cos(tt), torch.sin(tt)
    cs = cos * sin
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False), jvp_attention():
        v, cs_dvdt = torch.func.jvp(lambda a, b: velocity(student, a, b, cond), (x, tt), (bcast(cs, x) * dx, cs))
    v = v.to(wdtype)
    if warmup_form == "rcm":
        diff = cos * torch.sqrt(1 - warmup**2 * sin * sin)
        g = -bcast(diff, x) * (v - dx) - (warmup * bcast(cs, x) * x + cs_dvdt.to(wdtype))
    else:
        g = -bcast(cos * cos, x) * (v - dx) - warmup * (bcast(cs, x) * x + cs_dvdt.to(wdtype))
    g_norm = g.flatten(1).norm(dim=1)
    if norm == "rms":
        g_norm = g_norm / g[0].numel() ** 0.5
    if norm_c > 0:
        g = g / bcast(g_norm + norm_c, g)
    return v, g, {"tangent_norm": g_norm.mean()}


class SCM(Objective):
    """Shared sCD / sCT loss; subclasses say where dx_t/dt comes from."""

    networks = ("generator",)
    jvp_networks = ("generator",)  # scm_tangent's torch.func.jvp through the student

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if cfg.sigma_data <= 0 or cfg.p_std <= 0:
            raise ConfigError(f"objective.sigma_data={cfg.sigma_data} and objective.p_std={cfg.p_std} must be > 0")
        if cfg.tangent_norm_c < 0 or cfg.warmup_steps < 0:
            raise ConfigError(f"objective.tangent_norm_c={cfg.tangent_norm_c} and objective.warmup_steps="
                              f"{cfg.warmup_steps} must be >= 0")
        if cfg.tangent_warmup not in WARMUPS or cfg.tangent_norm not in TANGENT_NORMS:
            raise ConfigError(f"objective.tangent_warmup='{cfg.tangent_warmup}' / tangent_norm='{cfg.tangent_norm}': "
                              f"choose tangent_warmup from {WARMUPS} and tangent_norm from {TANGENT_NORMS}")
        if cfg.prior_sigma not in PRIOR_SIGMAS:
            raise ConfigError(f"objective.prior_sigma='{cfg.prior_sigma}' is unknown; choose one of {PRIOR_SIGMAS}")
        self.gan = GANTerm(cfg, has_critic=False)

    def build_modules(self, setup):
        modules = self.gan.build(setup)
        if self.cfg.adaptive_weighting:
            modules["logvar"] = (LogVarHead(self.cfg.logvar_hidden, scale=self.cfg.logvar_time_scale), "generator")
        return modules

    def dxdt(self, teacher: Denoiser, x0, z, x_t, t, cond) -> torch.Tensor:
        raise NotImplementedError(f"objective {self.name} must define dxdt (where dx_t/dt comes from)")

    def training_points(self, batch: Batch, teacher: Denoiser, sched) -> tuple:
        """(x0, z, x_t, t): the points the loss is taken at. sCM: a data sample noised to t ~ the proposal (Sec. 4.3)."""
        if batch.real is None:
            raise ConfigError(f"objective '{self.name}' needs data samples (x0) but the data source gives none; "
                              "use data with real samples (data=gmm)")
        c, x0 = self.cfg, batch.real
        t = trig_times(x0.shape[0], c.sigma_data, c.p_mean, c.p_std, sched.t_min, sched.t_max, like=x0)
        z = c.sigma_data * torch.randn_like(x0)
        return x0, z, bcast(torch.cos(t), x0) * x0 + bcast(torch.sin(t), x0) * z, t

    def scm_loss(self, nets: Nets, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        c = self.cfg
        student = as_trigflow(nets.generator, c.sigma_data)
        teacher = as_trigflow(nets.teacher, c.sigma_data)
        cond = batch.cond
        x0, z, x_t, t = self.training_points(batch, teacher, student.schedule)
        with torch.no_grad():
            dxdt = self.dxdt(teacher, x0, z, x_t, t, cond)
        r = min(1.0, step / c.warmup_steps) if c.warmup_steps else 1.0
        v_minus, g, logs = scm_tangent(student, x_t, t, dxdt, cond, warmup=r, norm_c=c.tangent_norm_c,
                                       warmup_form=c.tangent_warmup, norm=c.tangent_norm)
        v = velocity(student, x_t, t, cond)
        wdtype = v_minus.dtype
        # F_theta - F_theta- with F = v / sigma_d (eq. 1)
        err = ((v.to(wdtype) - v_minus) / c.sigma_data - g).flatten(1).pow(2).mean(1)
        if c.prior_weighting:
            err = err / prior_sigma(nets.generator.schedule, t.to(wdtype), c.sigma_data, c.prior_sigma)
        if c.divide_by_dim:
            err = err / x_t[0].numel()
        if c.adaptive_weighting:
            w = nets.modules["logvar"](t)
            loss = (torch.exp(w) * err - w).mean()  # eq. (9)
            logs["logvar"] = w.mean().detach()
        else:
            loss = err.mean()
        return {"loss": loss, "scm": err.mean().detach(), **logs}

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        out = self.scm_loss(nets, batch, step)
        if self.cfg.gan_weight > 0:
            gan, logs = self.gan.generator_loss(nets, self.generate(nets, batch), batch.cond)
            out.update(logs, loss=out["loss"] + gan)
        return out

    def critic_loss(self, nets: Nets, batch: Batch, step: int):
        """The LADD head's update (objective.discriminator=teacher): L_D on real vs detached 1-step samples."""
        with torch.no_grad():
            fake = self.generate(nets, batch)
        loss, logs = self.gan.discriminator_loss(nets, fake, batch)
        return {"loss": loss, **logs}


@dataclass
class SCDConfig(SCMConfig):
    name: str = "scd"


@register_objective
class SCD(SCM):
    """sCD: dx_t/dt is the (guided) teacher's TrigFlow velocity at x_t."""

    name = "scd"
    Config = SCDConfig

    def dxdt(self, teacher, x0, z, x_t, t, cond):
        return velocity(teacher, x_t, t, cond)


@dataclass
class SCTConfig(SCMConfig):
    name: str = "sct"


@register_objective
class SCT(SCM):
    """sCT: dx_t/dt = cos(t) z - sin(t) x0, the conditional velocity of the data pair (no teacher)."""

    name = "sct"
    Config = SCTConfig

    def dxdt(self, teacher, x0, z, x_t, t, cond):
        return bcast(torch.cos(t), x0) * z - bcast(torch.sin(t), x0) * x0

