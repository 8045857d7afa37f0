"""Noise schedules: x_t = alpha(t) * x0 + sigma(t) * eps, eps ~ N(0, I).

Every schedule is a continuous-time object with a time interval [t_min, t_max]; discrete schedules (SD's
1000-step tables) interpolate log-SNR between table entries. Schedules are plain functions of t so the
same code serves float64 tests, training and sampling. Derivatives come from forward-mode autodiff of
alpha/sigma, so no schedule carries a hand-derived (and possibly wrong) derivative.
"""

from __future__ import annotations

import math

import torch

from onestep.errors import ConfigError


def _t(t, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.get_default_dtype()
    return torch.as_tensor(t, dtype=dtype, device=None if like is None else like.device)


def quiet_forward_ad() -> None:
    """Import torch's forward-AD decompositions (first ``torch.func.jvp`` does it) without their FutureWarning:
    torch 2.14 scripts them with its own deprecated ``torch.jit.script``, a warning no user can act on that
    otherwise lands inside the progress bar. Cached by Python's import system after the first call."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
        from torch._decomp import decompositions_for_jvp  # noqa: F401


class Schedule:
    """Base class. Subclasses define alpha, sigma, t_min, t_max; the rest is derived."""

    name = "schedule"
    t_min: float
    t_max: float

    def alpha(self, t):
        raise NotImplementedError(f"{type(self).__name__} must define alpha(t)")

    def sigma(self, t):
        raise NotImplementedError(f"{type(self).__name__} must define sigma(t)")

    def logsnr(self, t):
        t = _t(t)
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def t_of_logsnr(self, logsnr):
        """Inverse of logsnr(t). Generic bisection (logsnr is decreasing); subclasses override with closed forms."""
        logsnr = _t(logsnr)
        lo = torch.full_like(logsnr, self.t_min)
        hi = torch.full_like(logsnr, self.t_max)
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            above = self.logsnr(mid) > logsnr
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def prior_std(self, t):
        """Std of the Gaussian a sampler (teacher or student) starting at time t draws x_t from: sigma(t), the noise
        part of x_t (SiD's sigma_init start). Discrete diffusers tables override it at t_max."""
        return self.sigma(t)

    def student_ts(self, t_start: float, steps: int) -> torch.Tensor:
        """A few-step student's t-list: ``steps`` times evenly spaced from ``t_start`` toward t_min."""
        return torch.linspace(t_start, self.t_min, steps + 1, dtype=torch.float64)[:-1]

    def derivatives(self, t):
        """(d alpha/dt, d sigma/dt) by forward-mode autodiff."""
        t = _t(t).clone()  # forward-mode AD cannot attach a tangent to an expanded (aliased) tensor
        quiet_forward_ad()
        ones = torch.ones_like(t)
        _, da = torch.func.jvp(self.alpha, (t,), (ones,))
        _, ds = torch.func.jvp(self.sigma, (t,), (ones,))
        return da, ds

    def check_t(self, t: torch.Tensor, what: str = "t") -> None:
        lo, hi = float(t.min()), float(t.max())
        eps = 1e-6 * max(1.0, abs(self.t_max))
        if lo < self.t_min - eps or hi > self.t_max + eps:
            raise ConfigError(f"{what} has values in [{lo:.4g}, {hi:.4g}] outside the {self.name} schedule's "
                              f"[{self.t_min:.4g}, {self.t_max:.4g}]; choose times inside it")

    def default_ts(self, n: int) -> torch.Tensor:
        """A decreasing t-list of n sampling times from t_max (uniform in t)."""
        return torch.linspace(self.t_max, self.t_min_sample, n + 1, dtype=torch.float64)[:-1]

    def t_from_unit(self, u):
        """Map u in [0, 1] onto [t_min, t_max] (linearly; EDM overrides with log-sigma)."""
        return self.t_min + _t(u) * (self.t_max - self.t_min)

    @property
    def t_min_sample(self) -> float:
        """Smallest time a sampler goes to before the final jump to clean data."""
        return self.t_min

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class VPLinear(Schedule):
    """Continuous VP with linear beta(t) (Song et al. 2021): log alpha = -t^2 (b1-b0)/4 - t b0/2."""

    name = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        self.b0, self.b1, self.t_min, self.t_max = beta_min, beta_max, t_min, 1.0

    def _log_alpha(self, t):
        t = _t(t)
        return -0.25 * t**2 * (self.b1 - self.b0) - 0.5 * t * self.b0

    def alpha(self, t):
        return torch.exp(self._log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))

    def logsnr(self, t):
        la2 = 2 * self._log_alpha(t)
        return la2 - torch.log(-torch.expm1(la2))

    def t_of_logsnr(self, logsnr):
        # alpha^2 = sigmoid(logsnr)  =>  (b1-b0)/2 t^2 + b0 t + log sigmoid(logsnr) = 0
        c = torch.nn.functional.logsigmoid(_t(logsnr))
        a, b = 0.5 * (self.b1 - self.b0), self.b0
        return (-b + torch.sqrt(b * b - 4 * a * c)) / (2 * a)


class VPCosine(Schedule):
    """Cosine VP (Nichol & Dhariwal 2021): alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t+s)/(1+s) pi/2)."""

    name = "vp_cosine"

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.999):
        self.s, self.t_min, self.t_max = s, t_min, t_max
        self._f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2

    def _alpha_bar(self, t):
        return torch.cos((_t(t) + self.s) / (1 + self.s) * math.pi / 2) ** 2 / self._f0

    def alpha(self, t):
        return torch.sqrt(self._alpha_bar(t))

    def sigma(self, t):
        return torch.sqrt(1 - self._alpha_bar(t))

    def t_of_logsnr(self, logsnr):
        ab = torch.sigmoid(_t(logsnr))
        return (1 + self.s) * 2 / math.pi * torch.arccos(torch.sqrt(ab * self._f0)) - self.s


#: log-SNR that stands for a zero-terminal-SNR table's last entry (alpha = 0): a log-SNR table cannot hold -inf (its
#: interpolation would give nan), and alpha(1)^2 = sigmoid(-40) ~ 4e-18 is far below float32's resolution of any x_t
#: term next to sigma = 1, while SNR conversions (sigma / alpha ~ 5e8) stay finite
ZERO_SNR_LOGSNR = -40.0


class VPDiscrete(Schedule):
    """Discrete DDPM table of N steps (``linear`` or SD's ``scaled_linear`` betas).

    Continuous time t in [0, 1] maps to the table index i = t (N - 1); log-SNR is interpolated linearly
    between entries, so the schedule agrees with the table exactly at the N integer timesteps.

    CogVideoX's table (diffusers' CogVideoXDDIMScheduler) divides the SNR by ``snr_shift_scale`` s,
    abar' = abar / (s + (1 - s) abar), and may then rescale it to zero terminal SNR (``zero_terminal_snr``;
    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1, applied to sqrt(abar)
    as that scheduler does); the last entry's log-SNR is then ``ZERO_SNR_LOGSNR``.
    """

    name = "vp_discrete"

    def __init__(self, beta_schedule: str = "scaled_linear", num_steps: int = 1000,
                 beta_start: float = 0.00085, beta_end: float = 0.012, snr_shift_scale: float = 1.0,
                 zero_terminal_snr: bool = False):
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        else:
            raise ConfigError(f"beta_schedule '{beta_schedule}' is unknown; use 'linear' or 'scaled_linear'")
        if snr_shift_scale <= 0:
            raise ConfigError(f"snr_shift_scale={snr_shift_scale:.4g} must be > 0")
        self.beta_schedule, self.num_steps = beta_schedule, num_steps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.snr_shift_scale, self.zero_terminal_snr = float(snr_shift_scale), bool(zero_terminal_snr)
        abar = torch.cumprod(1 - betas, 0)
        if snr_shift_scale != 1.0:
            abar = abar / (snr_shift_scale + (1 - snr_shift_scale) * abar)
        if zero_terminal_snr:
            root = abar.sqrt()
            first, last = root[0].clone(), root[-1].clone()
            abar = ((root - last) * (first / (first - last))) ** 2
        self.alphas_cumprod = abar
        self.table_logsnr = torch.log(abar) - torch.log1p(-abar)
        if zero_terminal_snr:
            self.table_logsnr[-1] = ZERO_SNR_LOGSNR
        self.t_min, self.t_max = 0.0, 1.0

    def index(self, t):
        """Continuous table index (what a diffusers model receives as ``timestep``). An index within 1e-3 of an
        integer is snapped to it, so the integer timesteps of a student's t-list (k / (N - 1), rounded in float32)
        reach the network exactly as a diffusers pipeline passes them."""
        i = _t(t) * (self.num_steps - 1)
        near = i.detach().round()
        return torch.where((i.detach() - near).abs() < 1e-3, i + (near - i.detach()), i)

    def prior_std(self, t):
        """diffusers' DDPM / DDIM / LCM schedulers start at the last table entry from x ~ N(0, I) (their
        ``init_noise_sigma`` = 1; DMD2 feeds its generator plain noise at t = 999 too), not from sigma(t_max) x;
        samplers and students do the same there, so an exported pipeline reproduces them exactly."""
        t = _t(t)
        return torch.where(t >= self.t_max, torch.ones_like(self.sigma(t)), self.sigma(t))

    def student_ts(self, t_start: float, steps: int) -> torch.Tensor:
        """On integer table indices: DMD2's ``range(N - 1, 0, -N // steps)`` (999, 749, 499, 249 for 4 steps on SD),
        which an exported LCMScheduler pipeline runs as they are, when the student starts at t_max."""
        if t_start < self.t_max:
            return super().student_ts(t_start, steps)
        idx = torch.arange(self.num_steps - 1, 0, -(self.num_steps // steps), dtype=torch.float64)[:steps]
        return idx / (self.num_steps - 1)

    def logsnr(self, t):
        t = _t(t)
        table = self.table_logsnr.to(device=t.device, dtype=t.dtype if t.is_floating_point() else torch.float64)
        i = self.index(t).clamp(0, self.num_steps - 1)
        i0 = i.detach().floor().clamp(max=self.num_steps - 2).long()
        w = i - i0
        return table[i0] * (1 - w) + table[i0 + 1] * w

    def alpha(self, t):
        return torch.sqrt(torch.sigmoid(self.logsnr(t)))

    def sigma(self, t):
        return torch.sqrt(torch.sigmoid(-self.logsnr(t)))

    def t_of_logsnr(self, logsnr):
        logsnr = _t(logsnr)
        table = self.table_logsnr.to(device=logsnr.device, dtype=logsnr.dtype)
        desc = -table  # increasing, for searchsorted
        j = torch.searchsorted(desc, -logsnr.contiguous()).clamp(1, self.num_steps - 1)
        l0, l1 = table[j - 1], table[j]
        w = (logsnr - l0) / (l1 - l0)
        return ((j - 1) + w) / (self.num_steps - 1)


class EDM(Schedule):
    """VE / EDM (Karras et al. 2022): alpha = 1, sigma = t; time is sigma."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        self.t_min, self.t_max, self.rho = sigma_min, sigma_max, rho

    def alpha(self, t):
        return torch.ones_like(_t(t))

    def sigma(self, t):
        return _t(t) * 1

    def t_of_logsnr(self, logsnr):
        return torch.exp(-0.5 * _t(logsnr))

    def t_from_unit(self, u):
        return torch.exp(math.log(self.t_min) + _t(u) * (math.log(self.t_max) - math.log(self.t_min)))

    def default_ts(self, n: int) -> torch.Tensor:
        # EDM eq. (5): sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho; last one at sigma_min
        if n == 1:
            return torch.tensor([self.t_max], dtype=torch.float64)
        i = torch.arange(n, dtype=torch.float64)
        a, b = self.t_max ** (1 / self.rho), self.t_min ** (1 / self.rho)
        return (a + i / (n - 1) * (b - a)) ** self.rho


class RectifiedFlow(Schedule):
    """Rectified flow / flow matching: alpha = 1 - t, sigma = t.

    ``shift`` (SD3's and Sana's fixed timestep shift; Flux computes it from the resolution) moves sampling grids and
    training times toward noise, t = shift u / (1 + (shift - 1) u) for uniform u, as diffusers'
    FlowMatchEulerDiscreteScheduler does; alpha and sigma, and so every denoiser on the schedule, are unchanged.
    """

    name = "rectified_flow"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0 - 1e-4, shift: float = 1.0):
        if shift <= 0:
            raise ConfigError(f"rectified_flow shift={shift} must be > 0")
        self.t_min, self.t_max, self.shift = t_min, t_max, float(shift)

    def shifted(self, u):
        """The shift map on [t_min, t_max] (clamped there: it moves the ends by up to (shift - 1) t_min)."""
        u = _t(u)
        if self.shift == 1.0:
            return u
        return (self.shift * u / (1 + (self.shift - 1) * u)).clamp(self.t_min, self.t_max)

    def default_ts(self, n: int) -> torch.Tensor:
        return self.shifted(super().default_ts(n))

    def student_ts(self, t_start: float, steps: int) -> torch.Tensor:
        """The evenly spaced list through the shift (the start stays), as the flow pipelines space their steps."""
        ts = super().student_ts(t_start, steps)
        return torch.cat([ts[:1], self.shifted(ts[1:])]) if steps > 1 else ts

    def prior_std(self, t):
        """The flow pipelines (SD3 / Flux / Sana) start from x = z at the first sigma; at t_max = 1 - 1e-4 the
        marginal's std differs from 1 by 1e-4, and starting from z there keeps exported pipelines exact."""
        t = _t(t)
        return torch.where(t >= self.t_max, torch.ones_like(t), self.sigma(t))

    def t_from_unit(self, u):
        return self.shifted(super().t_from_unit(u))

    def alpha(self, t):
        return 1 - _t(t)

    def sigma(self, t):
        return _t(t) * 1

    def t_of_logsnr(self, logsnr):
        return torch.sigmoid(-0.5 * _t(logsnr))


class TrigFlow(Schedule):
    """TrigFlow (Lu & Song 2024): x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I), t in [0, pi/2].

    In the eps ~ N(0, I) convention: alpha = cos t, sigma = sigma_d sin t.
    """

    name = "trigflow"

    def __init__(self, sigma_data: float = 0.5, t_min: float = 1e-3, t_max: float = math.pi / 2 - 1e-4):
        self.sigma_data, self.t_min, self.t_max = sigma_data, t_min, t_max

    def alpha(self, t):
        return torch.cos(_t(t))

    def sigma(self, t):
        return self.sigma_data * torch.sin(_t(t))

    def t_of_logsnr(self, logsnr):
        return torch.arctan(torch.exp(-0.5 * _t(logsnr)) / self.sigma_data)


SCHEDULES = {
    "vp_linear": VPLinear,
    "vp_cosine": VPCosine,
    "vp_discrete": VPDiscrete,
    "edm": EDM,
    "rectified_flow": RectifiedFlow,
    "trigflow": TrigFlow,
}


def make_schedule(name: str, **kwargs) -> Schedule:
    if name not in SCHEDULES:
        raise ConfigError(f"schedule '{name}' is unknown; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](**kwargs)


def match_time(x: torch.Tensor, t, src: Schedule, dst: Schedule):
    """Map a noisy point under ``src`` at time t to the equivalent point under ``dst`` (same SNR).

    x / alpha = x0 + (sigma/alpha) eps is schedule-free, so x_dst = x * alpha_dst(t_dst) / alpha_src(t).
    Returns (x_dst, t_dst).
    """
    t = _t(t, x)
    t_dst = dst.t_of_logsnr(src.logsnr(t))
    scale = dst.alpha(t_dst) / src.alpha(t)
    return x * bcast(scale, x), t_dst


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (B,) or scalar tensor to broadcast against x (B, ...)."""
    v = _t(v, x)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))
