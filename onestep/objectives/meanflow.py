"""MeanFlow: one-step generation by regressing the average velocity (Geng, Deng, Bai, Kolter & He 2025, "Mean Flows
for One-step Generative Modeling", arXiv 2505.13447), in its distillation (CD) and data (CT) variants as NVlabs/FastGen
has them (fastgen/methods/consistency_model/mean_flow.py, ``loss_config.use_cd``).

For the probability-flow ODE dz/dt = v(z, t) the average velocity over [r, t] is
    u(z_t, r, t) = 1 / (t - r) int_r^t v(z_tau, tau) dtau = (z_t - z_r) / (t - r)                          eq. (3)
and differentiating (t - r) u = int_r^t v in t gives the MeanFlow identity
    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v d_z u + d_t u                   eq. (6)-(8)
the total derivative being the JVP of u along the tangent (dz, dr, dt) = (v, 0, 1). The loss (eq. 9-10, Alg. 1)
    L = || u_theta(z_t, r, t) - sg(u_tgt) ||^2,   u_tgt = v - w (t - r) JVP(u_theta; (v, 0, 1))
with v the teacher's velocity at z_t (CD) or the conditional velocity a' x0 + s' eps of the data pair (CT; its
expectation given z_t is the marginal v and u_tgt is linear in v), and w the tangent warm-up ramp 0 -> 1 (FastGen
``tangent_warmup_steps``; 1 = the paper). ``loss=adaptive`` is Sec. 4.3: sg(w) ||Delta||^2 with
w = 1 / (||Delta||^2 + c)^p (p = 1 - gamma; p = 1 the paper's ImageNet setting, c = norm_c), the squared norm summed
over elements as FastGen does under a norm (``norm_method=poly_p``); ``l2`` is the per-element mean square.

(t, r): two logit-normal(P_mean, P_std) draws (Sec. 4.3: lognorm(-0.4, 1.0)) mapped through the schedule, t the
larger; a ``flow_matching_ratio`` share gets r = t (there u = v: plain flow matching; the paper's 75% r = t is
``flow_matching_ratio=0.75``) and a ``consistency_ratio`` share r = 0 (FastGen's consistency bucket: the one-step
map itself). Time is the schedule's own; the paper's frame is rectified flow (``teacher.schedule=rectified_flow``).

Network. The generator stays a plain Denoiser (its x0 at time t); it *is* the r = 0 slice of the flow map,
    u_theta(z, 0, t) = (z - G.x0(z, t)) / t,        one step: x = z - t u_theta(z, 0, t) = G.x0(z, t)  (Alg. 2)
so sampling, evaluation and export run it unchanged. The interval enters through a head trained with it
(``Nets.modules["interval"]``), zero at r = 0 by construction:
    u_theta(z, r, t) = (z - G.x0(z, t)) / t + (r / t) H(G.features(z, t), r / t)
H reads the generator's last hidden layer (its time, class and input embedding), so the generator network needs
``features`` (the project's MLP and diffusers UNets have it). A few-step student samples with renoise on the t-list
(FastGen's default ``student_sample_type="sde"``: r = 0 at every step, then forward-noise to the next time).

The JVP runs in float32 (or wider) with autocast off, SDPA held to its MATH backend unless the generator's attention is
routed through onestep.kernels (``generator.attention=jvp_flash``), as for sCM (scm.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onestep import param
from onestep.core import noised
from onestep.denoisers.attention import jvp_attention
from onestep.denoisers.nets import FourierTime
from onestep.errors import ConfigError
from onestep.objectives.base import Batch, Nets, Objective, ObjectiveConfig, register_objective
from onestep.schedules import bcast

VELOCITIES = ("teacher", "data")
LOSSES = ("l2", "adaptive")
SPLITS = ("per_row", "leading_block")


@dataclass
class MeanFlowConfig(ObjectiveConfig):
    name: str = "meanflow"
    #: v in the identity: teacher (distillation, FastGen use_cd) | data (the conditional velocity: MeanFlow from scratch)
    velocity: str = "teacher"
    #: (t, r) ~ logit-normal(P_mean, P_std) each, t = max, r = min (MeanFlow Sec. 4.3: -0.4, 1.0)
    p_mean: float = -0.4
    p_std: float = 1.0
    #: share of the batch with r = t (flow matching; the paper's best on ImageNet: 0.75, i.e. 25% r != t)
    flow_matching_ratio: float = 0.75
    #: share with r = 0 (FastGen's consistency bucket: the one-step map)
    consistency_ratio: float = 0.0
    #: how the r = t and r = 0 shares are taken: per_row (each row drawn into a bucket) | leading_block (the first
    #: int(B flow_matching_ratio) rows r = t, then int(B consistency_ratio) rows r = 0: the official code's
    #: zero_mask = arange(B) < int(B data_proportion), Gsunshine/meanflow meanflow.py:152-155)
    ratio_split: str = "per_row"
    #: l2 (per-element mean square) | adaptive (Sec. 4.3: sg(1 / (||Delta||^2 + c)^p) ||Delta||^2)
    loss: str = "adaptive"
    norm_p: float = 1.0
    #: c of the adaptive weight: the paper's text gives 1e-3 as an example, the official code uses norm_eps = 0.01
    #: (Gsunshine/meanflow meanflow.py:84, :242; configs/default.py:71)
    norm_c: float = 1e-3
    #: w in u_tgt = v - w (t - r) du/dt rises linearly from 0 to 1 over this many steps (0 = off, the paper)
    warmup_steps: int = 0
    #: the interval head H: hidden width and Fourier embedding of r / t
    head_hidden: int = 128
    head_time_dim: int = 32


class IntervalHead(nn.Module):
    """H(h, q): the r-dependent part of the average velocity from the generator's features h and q = r / t;
    the last layer starts at zero, so u_theta starts as the generator's own r = 0 map for every r."""

    def __init__(self, feature_dim: int, data_shape: tuple[int, ...], hidden: int = 128, time_dim: int = 32):
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.time = FourierTime(time_dim, scale=1.0, seed=2)
        out = 1
        for d in self.data_shape:
            out *= d
        self.net = nn.Sequential(nn.Linear(feature_dim + time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, out))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        e = self.time(q.to(h.dtype))
        return self.net(torch.cat([h.flatten(1), e], 1)).view(-1, *self.data_shape)


def average_velocity(generator, head: nn.Module | None, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                     cond=None) -> torch.Tensor:
    """u_theta(z, r, t) = (z - G.x0(z, t)) / t + (r / t) H(G.features(z, t), r / t) (module docstring); without a
    head only the r = 0 slice exists and r must be 0."""
    u = (z - generator.x0(z, t, cond)) / bcast(t, z)
    if head is None:
        return u
    q = r / t
    return u + bcast(q, z) * head(generator.features(z, t, cond), q)


def meanflow_target(u_fn, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                    warmup: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(u_tgt, du/dt): eq. (10), u_tgt = v - w (t - r) du/dt with du/dt = JVP of u_fn(z, r, t) along (v, 0, 1), no grad."""
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False), jvp_attention():
        _, dudt = torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    return v - warmup * bcast(t - r, v) * dudt, dudt


@register_objective
class MeanFlow(Objective):
    name = "meanflow"
    Config = MeanFlowConfig
    networks = ("generator",)
    jvp_networks = ("generator",)  # meanflow_target's torch.func.jvp through the generator (trainer.compile: eager)

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        if cfg.ratio_split not in SPLITS:
            raise ConfigError(f"objective.ratio_split='{cfg.ratio_split}' is unknown; choose one of {SPLITS}")
        if cfg.velocity not in VELOCITIES or cfg.loss not in LOSSES:
            raise ConfigError(f"objective.velocity='{cfg.velocity}' / objective.loss='{cfg.loss}': choose velocity "
                              f"from {VELOCITIES} and loss from {LOSSES}")
        fm, cm = cfg.flow_matching_ratio, cfg.consistency_ratio
        if not (0 <= fm and 0 <= cm and fm + cm <= 1):
            raise ConfigError(f"objective.flow_matching_ratio={fm}, consistency_ratio={cm} must be >= 0 with sum <= 1")
        if cfg.p_std <= 0 or cfg.norm_c <= 0 or cfg.norm_p < 0 or cfg.warmup_steps < 0:
            raise ConfigError(f"objective.p_std={cfg.p_std} and norm_c={cfg.norm_c} must be > 0, norm_p={cfg.norm_p} "
                              f"and warmup_steps={cfg.warmup_steps} >= 0")

    def accumulation_refusal(self):
        if self.cfg.ratio_split == "leading_block":
            return ("objective.ratio_split=leading_block puts the first rows of each batch on r = t and r = 0 (pass "
                    "ratio_split=per_row to accumulate)")
        return None

    def build_modules(self, setup):
        net = setup.generator_start  # the head reads the generator's features (generator.arch may resize them)
        if not hasattr(net, "features") or not hasattr(net, "feature_dim"):
            raise ConfigError(f"objective=meanflow reads the generator's features(x_t, t, cond) for its interval head; "
                              f"{type(net).__name__} has none")
        c = self.cfg
        return {"interval": (IntervalHead(net.feature_dim, net.data_shape, c.head_hidden, c.head_time_dim), "generator")}

    def sample_tr(self, schedule, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, r), t >= r: logit-normal pair through the schedule, then the r = t and r = 0 buckets."""
        c = self.cfg
        # (2 n) rows viewed as two draws of n: the numbers of randn(2, n), in the two-block layout that data-parallel
        # ranks and accumulated micro-batches slice their rows from (onestep/train/data_parallel.py)
        u = torch.sigmoid(c.p_mean + c.p_std * torch.randn(2 * n, dtype=torch.float64).view(2, n))
        a, b = schedule.t_from_unit(u[0]), schedule.t_from_unit(u[1])
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        if c.ratio_split == "leading_block":  # row positions, as the official code's mask (the rows are i.i.d.)
            i = torch.arange(n)
            fm, cm = int(n * c.flow_matching_ratio), int(n * c.consistency_ratio)
            on_diagonal, at_zero = i < fm, (i >= fm) & (i < fm + cm)
        else:
            bucket = torch.rand(n, dtype=torch.float64)
            on_diagonal = bucket < c.flow_matching_ratio
            at_zero = (bucket >= c.flow_matching_ratio) & (bucket < c.flow_matching_ratio + c.consistency_ratio)
        r = torch.where(on_diagonal, t, r)
        r = torch.where(at_zero, torch.zeros_like(r), r)
        return t.to(like), r.to(like)

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        if batch.real is None:
            raise ConfigError(f"objective '{self.name}' needs data samples (x0) but the data source gives none; "
                              "use data with real samples (data=gmm)")
        c, g = self.cfg, nets.generator
        head = nets.modules.get("interval")
        sched, x0, cond = g.schedule, batch.real, batch.cond
        wdtype = torch.promote_types(x0.dtype, torch.float32)
        t, r = self.sample_tr(sched, x0.shape[0], x0.to(wdtype))
        z, eps = noised(sched, x0.to(wdtype), t)
        with torch.no_grad():
            if c.velocity == "teacher":
                v = nets.teacher.flow(z, t, cond).to(wdtype)
            else:
                v = param.from_x0_eps(x0.to(wdtype), eps, "flow", t, sched)
        w = min(1.0, step / c.warmup_steps) if c.warmup_steps else 1.0
        u_fn = lambda zz, rr, tt: average_velocity(g, head, zz, rr, tt, cond).to(wdtype)  # noqa: E731
        u_tgt, dudt = meanflow_target(u_fn, z, r, t, v, warmup=w)
        u = u_fn(z, r, t)
        delta = (u - u_tgt).flatten(1)
        if c.loss == "adaptive":
            sq = delta.pow(2).sum(1)
            loss = (sq / (sq.detach() + c.norm_c) ** c.norm_p).mean()  # Sec. 4.3: sg(w) ||Delta||^2
        else:
            loss = delta.pow(2).mean(1).mean()
        return {"loss": loss, "meanflow": delta.pow(2).mean(1).mean().detach(),
                "dudt_norm": dudt.flatten(1).norm(dim=1).mean().detach()}
