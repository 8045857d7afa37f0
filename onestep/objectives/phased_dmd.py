"""Phased DMD (Fan et al. 2025, "Phased DMD: Few-step Distribution Matching Distillation via Score Matching within
Subintervals", arXiv 2510.27684; project page x-niper.github.io/projects/Phased-DMD).

A k-step student whose step i is its own expert (``generator.experts=k``, denoisers/experts.py), trained progressively,
one phase per expert, from low SNR to high (Sec. 3.2, "progressive distribution matching"): in phase i the frozen
experts 0..i-1 take noise to x_{t_i}, expert i maps it to x_s, s = t_{i+1} (the student's sampler step from its x0
prediction; the last expert's output is the clean sample, s = 0), and only that step carries gradient. Phase i lasts
``phase_length`` generator steps; the last phase runs to the end of training.

Generator (phase i): reverse KL between the student's and the teacher's x_s, through their diffusions to t in (s, 1]
(the paper samples t in (t_i, 1) rather than (t_i, t_{i-1})): x_t = alpha_{t|s} x_s + sigma_{t|s} eps,
alpha_{t|s} = alpha_t / alpha_s, sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 (Sec. 3.2, the DMD gradient
w_{t|s} (T(x_t) - F(x_t)) dG/dphi). Here its direction is written in x_s space, E_fake[x_s|x_t] - E_real[x_s|x_t] =
(sigma_{t|s}^2 / alpha_{t|s}) (s_fake - s_real) = (sigma_{t|s}^2 alpha_t / (alpha_{t|s} sigma_t^2)) (mu_fake - mu_real),
and weighted by DMD eq. (8)'s normalizer in the same frame, 1 / mean|x_s - E_real[x_s|x_t]|: at s = 0 both are
DMD's (distribution_matching.py) exactly, and per sample the direction is the paper's up to a positive factor.

Fake score (phase i): "score matching within subintervals" (Sec. 3.3): only x_s is available, not clean samples, and
regressing on x_s as if it were data learns the wrong score. The unbiased target (eq. (13) in flow form,
psi(x_t) ~ ((alpha_s^2 sigma_t + alpha_t sigma_s^2) / (alpha_s^2 sigma_{t|s})) eps - x_s / alpha_s) is, in x0 form,
    x0* = (x_t - (sigma_t^2 / sigma_{t|s}) eps) / alpha_t,     E[x0* | x_t] = E[x0 | x_t]
(the score of x_t given x_s, -eps / sigma_{t|s}, averages to the marginal score). Its noise term grows like
1 / sigma_{t|s} as t -> s; the paper clamps 1 / sigma_{t|s}^2 into [0, 10] in the loss, here the loss weight is EDM's
lambda(t) times sigma_{t|s}^2 / sigma_t^2 (<= 1; 1 at s = 0, so the last phase is plain DSM): a factor fixed per (t, s)
does not move the minimizer, and it keeps the target's variance that of plain DSM.
The fake score is shaped like the generator (one network per sub-interval [t_j, t_{j-1})): the range phase i adds,
[t_{i+1}, t_i), is expert i+1's, untouched before phase i, i.e. still the teacher, as the paper's per-phase
re-initialization from the teacher (except the last phase's range below t_{k-1}, which expert k-1 already fitted on
[t_{k-1}, t_{k-2}) in the phase before).
Not covered: SGTS inside a phase (several steps per expert), LoRA experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onestep.denoisers.experts import PhaseExperts
from onestep.errors import ConfigError
from onestep.generator import Student
from onestep.objectives.adversarial import GANConfig
from onestep.objectives.base import Batch, Nets, ObjectiveConfig, TimeRange, check_t_range, register_objective
from onestep.objectives.critic import CriticObjective
from onestep.objectives.distribution_matching import NORMALIZER_FLOOR, surrogate_loss
from onestep.schedules import bcast

#: floor of sigma_{t|s}^2 (t drawn at s itself: a measure-zero draw that would divide by zero)
SUBINTERVAL_VAR_FLOOR = 1e-12
#: bisection steps of the unit coordinate of s (u in [0, 1], 2^-60: exact in fp64)
UNIT_BISECTIONS = 60


@dataclass
class PhasedDMDConfig(ObjectiveConfig, GANConfig, TimeRange):
    name: str = "phased_dmd"
    #: fake-score updates per generator update (the paper: 5, Sec. 4 "the pseudo-score model is updated 5 times per
    #: generator update")
    ttur: int = 5
    # t_lo / t_hi (TimeRange): the diffusion time t of both losses is u ~ U[max(u_s, t_lo), t_hi] through the
    # schedule, u_s the unit coordinate of the phase's end s (the sub-interval (s, 1])
    #: generator steps of each phase before the next expert trains; the last phase runs to trainer.steps (the paper
    #: trains the high-SNR expert longer, Sec. 4.3)
    phase_length: int = 200


def frame(schedule, s: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_s, sigma_s) broadcast to ``like``; s None = clean data (1, 0)."""
    if s is None:
        return torch.ones_like(like), torch.zeros_like(like)
    return bcast(schedule.alpha(s), like).to(like), bcast(schedule.sigma(s), like).to(like)


def transition(schedule, t: torch.Tensor, s: torch.Tensor | None, like: torch.Tensor):
    """(alpha_t, sigma_t, alpha_{t|s}, sigma_{t|s}) of x_t = alpha_{t|s} x_s + sigma_{t|s} eps, t > s."""
    a_t, s_t = bcast(schedule.alpha(t), like).to(like), bcast(schedule.sigma(t), like).to(like)
    a_s, s_s = frame(schedule, s, like)
    a_ts = a_t / a_s
    s_ts = (s_t**2 - a_ts**2 * s_s**2).clamp_min(SUBINTERVAL_VAR_FLOOR).sqrt()
    return a_t, s_t, a_ts, s_ts


def subinterval_x0_target(schedule, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                          s: torch.Tensor | None) -> torch.Tensor:
    """Phased DMD eq. (13) in x0 form: (x_t - sigma_t^2 / sigma_{t|s} eps) / alpha_t, whose mean given x_t is
    E[x0 | x_t] when x_t = alpha_{t|s} x_s + sigma_{t|s} eps (eps the noise of that last transition)."""
    a_t, s_t, _, s_ts = transition(schedule, t, s, x_t)
    return (x_t - s_t**2 / s_ts * eps) / a_t


def unit_of(schedule, s: float) -> float:
    """The u in [0, 1] with schedule.t_from_unit(u) = s (t_from_unit is increasing), by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(UNIT_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if float(schedule.t_from_unit(torch.tensor(mid, dtype=torch.float64))) < s:
            lo = mid
        else:
            hi = mid
    return hi


@register_objective
class PhasedDMD(CriticObjective):
    name = "phased_dmd"
    Config = PhasedDMDConfig
    generator_keys = ("experts",)

    @classmethod
    def shape_generator(cls, gc, net):
        if gc.experts == 1:
            return net  # (the loss names the keys to set)
        if gc.experts != gc.steps:
            raise ConfigError(f"generator.experts={gc.experts} gives one expert per student step: pass "
                              f"generator.steps={gc.experts} (got generator.steps={gc.steps})")
        if gc.lora.rank is not None:
            raise ConfigError(f"generator.experts={gc.experts} trains full copies of one network; unset "
                              "generator.lora.rank")
        ts = Student.from_config(net.schedule, gc).ts
        return PhaseExperts(net, ts.tolist(), gc.method)  # (copies the init once per step)

    @classmethod
    def export_refusal(cls, gc):
        if gc.experts > 1:
            return (f"generator.experts={gc.experts}: a phased (Phased DMD) generator runs a different network at "
                    "each step")
        return None

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        check_t_range(cfg)
        if cfg.discriminator != "none":
            raise ConfigError(f"objective.discriminator={cfg.discriminator}: objective=phased_dmd has no GAN term (the "
                              "paper trains data-free, without GAN or regression losses); use "
                              "objective.discriminator=none")
        if cfg.phase_length < 1:
            raise ConfigError(f"objective.phase_length={cfg.phase_length} must be >= 1 (generator steps per phase)")
        self._units: dict[float, float] = {}

    # --- phases -------------------------------------------------------------------------------------------------

    def experts(self, nets: Nets) -> int:
        k = getattr(nets.generator, "num_experts", 1)
        if k < 2:
            raise ConfigError("objective=phased_dmd trains one expert per student step; pass generator.steps=K "
                              "generator.experts=K (K >= 2, e.g. experiment=gmm_phased_dmd), or use objective=dmd2")
        return k

    def phase(self, nets: Nets, step: int) -> int:
        return min(step // self.cfg.phase_length, self.experts(nets) - 1)

    def phase_sample(self, nets: Nets, batch: Batch, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x_s, s): the frozen experts 0..i-1 take noise to x_{t_i} (no gradient), expert i's step to s = t_{i+1}
        carries it (s None: the last expert's clean output)."""
        g, noise = nets.generator, batch.noise
        ts = torch.tensor(g.phase_ts, dtype=noise.dtype, device=noise.device)
        x = noise * g.schedule.prior_std(ts[0])
        with torch.no_grad():
            for j in range(i):
                x = self._step(g, x, g.x0(x, ts[j].expand(len(x)), batch.cond), ts[j], ts[j + 1])
        x0 = g.x0(x, ts[i].expand(len(x)), batch.cond)
        if i == len(ts) - 1:
            return x0, None
        s = ts[i + 1].expand(len(x))
        return self._step(g, x, x0, ts[i], ts[i + 1]), s

    @staticmethod
    def _step(g, x, x0, t, s):
        """The student's sampler from t to s given its x0 prediction (onestep.sampling's renoise / ddim step)."""
        sched = g.schedule
        a_s, s_s = sched.alpha(s).to(x), sched.sigma(s).to(x)
        if g.phase_method == "ddim":
            return a_s * x0 + s_s * (x - sched.alpha(t).to(x) * x0) / sched.sigma(t).to(x)
        return a_s * x0 + s_s * g.randn_like(x)

    def draw_t(self, schedule, s: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """t in the sub-interval (s, 1]: u ~ U[max(u_s, t_lo), t_hi] through the schedule."""
        lo = self.cfg.t_lo
        if s is not None:
            key = float(s[0])
            if key not in self._units:
                self._units[key] = unit_of(schedule, key)
            lo = max(lo, self._units[key])
        if lo >= self.cfg.t_hi:
            raise ConfigError(f"objective.t_hi={self.cfg.t_hi} lies below the phase's start (unit {lo:.3f}); raise "
                              "objective.t_hi or move generator.ts / generator.sigma_init")
        u = lo + (self.cfg.t_hi - lo) * torch.rand(like.shape[0], dtype=torch.float64)
        return schedule.t_from_unit(u).to(device=like.device, dtype=like.dtype)

    # --- losses -------------------------------------------------------------------------------------------------

    def critic_loss(self, nets: Nets, batch: Batch, step: int):
        i = self.phase(nets, step)
        with torch.no_grad():
            x_s, s = self.phase_sample(nets, batch, i)
        loss = subinterval_dsm(nets.critic, x_s, s, batch.cond, t=self.draw_t(nets.critic.schedule, s, x_s))
        return {"loss": loss, "dsm": loss}

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        i = self.phase(nets, step)
        x_s, s = self.phase_sample(nets, batch, i)
        t = self.draw_t(nets.teacher.schedule, s, x_s)
        grad, logs = phased_dmd_gradient(nets.teacher, nets.critic, x_s, s, batch.cond, t=t)
        loss = surrogate_loss(x_s, grad)
        return {"loss": loss, "dm": loss, **logs, "phase": torch.tensor(float(i))}


def subinterval_dsm(denoiser, x_s: torch.Tensor, s: torch.Tensor | None, cond=None, *, t: torch.Tensor,
                    eps: torch.Tensor | None = None, sigma_data: float = 0.5) -> torch.Tensor:
    """Score matching within the sub-interval (s, 1] on samples x_s (Phased DMD eq. (13), x0 form): EDM's lambda(t)
    sigma_{t|s}^2 / sigma_t^2 ||D(x_t) - x0*||^2, mean over the batch; at s None it is dsm_loss(weighting="edm")."""
    sched = denoiser.schedule
    eps = torch.randn_like(x_s) if eps is None else eps
    a_t, s_t, a_ts, s_ts = transition(sched, t, s, x_s)
    x_t = a_ts * x_s + s_ts * eps
    target = subinterval_x0_target(sched, x_t, eps, t, s)
    sig = s_t / a_t
    lam = (sig**2 + sigma_data**2) / (sig * sigma_data) ** 2 * (s_ts**2 / s_t**2)
    err = lam * (denoiser.x0(x_t, t, cond) - target) ** 2
    return err.flatten(1).mean(1).mean()


@torch.no_grad()
def phased_dmd_gradient(teacher, critic, x_s: torch.Tensor, s: torch.Tensor | None, cond=None, *, t: torch.Tensor,
                        eps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The distribution matching direction at the phase's output x_s (module docstring): (E_fake[x_s|x_t] -
    E_real[x_s|x_t]) / mean|x_s - E_real[x_s|x_t]|; DMD's dmd_gradient when s is None."""
    wdtype = torch.promote_types(x_s.dtype, torch.float32)
    x_s = x_s.detach().to(wdtype)
    eps = torch.randn_like(x_s) if eps is None else eps.to(wdtype)
    a_t, s_t, a_ts, s_ts = transition(teacher.schedule, t, s, x_s)
    x_t = a_ts * x_s + s_ts * eps
    mu_real, mu_fake = teacher.x0(x_t, t, cond).to(wdtype), critic.x0(x_t, t, cond).to(wdtype)
    # Tweedie from t back to s: E[x_s | x_t] = (x_t + sigma_{t|s}^2 score(x_t)) / alpha_{t|s},
    # score = (alpha_t mu - x_t) / sigma_t^2
    xs_real = (x_t + s_ts**2 * (a_t * mu_real - x_t) / s_t**2) / a_ts
    diff = (s_ts**2 * a_t / (a_ts * s_t**2)) * (mu_fake - mu_real)
    norm = (x_s - xs_real).abs().flatten(1).mean(1).clamp_min(NORMALIZER_FLOOR).view(-1, *([1] * (x_s.ndim - 1)))
    grad = torch.nan_to_num(diff / norm)
    return grad, {"dm_grad_norm": grad.flatten(1).norm(dim=1).mean()}
