"""The Denoiser interface shared by teacher, critic and generator.

A Denoiser maps (x_t, t, cond) to its *native* prediction (``self.prediction``) under its own
``self.schedule``. Every other parametrization is derived by :mod:`onestep.param`, never re-implemented
per model. Conditioning ``cond`` is an opaque :class:`onestep.conditioning.Cond` (class labels for the
built-in models, prompt embeddings for text-to-image adapters); only the model that consumes it reads it.
"""

from __future__ import annotations

import torch
from torch import nn

from onestep import param
from onestep.conditioning import Cond, as_cond
from onestep.errors import ConfigError
from onestep.schedules import Schedule, bcast


class Denoiser(nn.Module):
    schedule: Schedule
    prediction: str = "x0"
    #: per-sample data shape, e.g. (2,) for 2-D points or (1, 8, 8) for digits
    data_shape: tuple[int, ...] = ()
    #: video data (a 4-D data_shape): the index of the frame axis in data_shape (Wan's (C, F, h, w): 1, CogVideoX's
    #: (F, C, h, w): 0); None = not a video. Objectives that look at single frames (MCM) read it
    frame_axis: int | None = None
    #: number of classes for class-conditional models (0 = unconditional); label ``num_classes`` = unconditional
    num_classes: int = 0
    #: the network takes the guidance scale as an input (guidance-distilled Flux): ``guided`` then feeds it the
    #: scale as the conditioning field ``GUIDANCE`` instead of running two CFG branches
    embedded_guidance: bool = False

    @property
    def conditional(self) -> bool:
        """Takes a condition with a null branch (class labels, prompts): what CFG and condition dropout need."""
        return self.num_classes > 0

    def unguided(self) -> "Denoiser":
        """The network without classifier-free guidance: the denoiser itself; the CFG wrapper returns what it guides.
        Objectives that guide a teacher their own way (SiD-LSG, SNOOPI) or read a network's features ask this."""
        return self

    @property
    def guidance_scale(self) -> "float | torch.Tensor":
        """The classifier-free guidance scale this denoiser applies: 1 (none); the CFG wrapper's ``scale``."""
        return 1.0

    def guidance_at(self, scale: "float | torch.Tensor", t: torch.Tensor) -> "float | torch.Tensor":
        """The CFG scale ``Guided`` applies at the batch's times t (B,) when asked for ``scale``: ``scale`` itself.
        A network whose pipeline guides some times at another scale (Wan 2.2 A14B's low-noise expert) answers per
        row (B,)."""
        return scale

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x_t, t, cond)")

    def predict(self, kind: str, x_t: torch.Tensor, t, cond=None) -> torch.Tensor:
        t = self._time(t, x_t)
        return param.convert(self(x_t, t, cond), self.prediction, kind, x_t, t, self.schedule)

    def x0(self, x_t, t, cond=None):
        return self.predict("x0", x_t, t, cond)

    def eps(self, x_t, t, cond=None):
        return self.predict("eps", x_t, t, cond)

    def v(self, x_t, t, cond=None):
        return self.predict("v", x_t, t, cond)

    def flow(self, x_t, t, cond=None):
        return self.predict("flow", x_t, t, cond)

    def score(self, x_t, t, cond=None):
        return self.predict("score", x_t, t, cond)

    def check_input(self, x: torch.Tensor, what: str = "x") -> None:
        """x's per-sample shape is data_shape; a video network takes any number of frames (single frames: MCM)."""
        got, want = list(x.shape[1:]), list(self.data_shape)
        if self.frame_axis is not None and len(got) == len(want):
            got[self.frame_axis] = want[self.frame_axis]
        if want and got != want:
            raise ConfigError(f"{what} has per-sample shape {tuple(x.shape[1:])} but the {type(self).__name__} "
                              f"expects {tuple(self.data_shape)}; set data/teacher dimensions to agree")

    def randn_like(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Fresh noise like x for re-noising sampler steps, drawn on the generator's device and moved to x's
        (diffusers' ``randn_tensor``). A network whose pipeline draws it in another layout (Flux: packed tokens)
        overrides this, so a multi-step student consumes the generator exactly as its exported pipeline does.
        Wrappers (CFG, views, consistency boundary) delegate to the network they wrap."""
        inner = next((getattr(self, a) for a in ("base", "net") if isinstance(getattr(self, a, None), Denoiser)), None)
        if inner is not None:
            return inner.randn_like(x, generator)
        device = x.device if generator is None else generator.device
        return torch.randn(x.shape, dtype=x.dtype, device=device, generator=generator).to(x.device)

    @staticmethod
    def _time(t, x: torch.Tensor) -> torch.Tensor:
        # at least fp32: a bf16 / fp16 t would move a 1000-entry table index by several entries
        t = torch.as_tensor(t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        return t.expand(x.shape[0]) if t.ndim == 0 else t


#: the Cond field that carries the guidance scale (B,) to a network with ``embedded_guidance``
GUIDANCE = "guidance"


def with_guidance(cond, scale: "float | torch.Tensor"):
    """``cond`` plus the field ``GUIDANCE`` = scale on every row (and on the null row: it is no part of the prompt).
    ``scale`` may be one value per row (B,) (a w-conditioned student trained on random scales); the kind of ``cond``
    (Labels, prompts) is kept."""
    if not isinstance(cond, Cond):
        return cond  # nothing to add it to: the network names the conditioning it needs
    dev = next(iter(cond.fields.values())).device
    null_dev = next(iter(cond.null_fields.values())).device
    g = torch.as_tensor(scale, dtype=torch.float32, device=dev).expand(len(cond)).clone()
    return cond._like({**cond.fields, GUIDANCE: g}, cond.texts, {**cond.null_fields, GUIDANCE: g[:1].to(null_dev)})


#: the Cond field (B,) that selects a network's shifted-condition branch (APEX, objectives/apex.py): 1 = shifted, 0 = the
#: network as it is; only a network given ``add_shift_input`` reads it
SHIFT = "shift"


def with_shift(cond, n: int, device) -> Cond:
    """``cond`` (None for an unconditional network) plus the field ``SHIFT`` = 1 on its ``n`` rows and its null row: the
    same condition, asked of the network's shifted branch."""
    one = torch.ones(n, device=device)
    if cond is None:
        return Cond({SHIFT: one}, {SHIFT: one[:1]})
    if not isinstance(cond, Cond):
        raise ConfigError(f"the shifted-condition branch needs the conditioning as a onestep.conditioning.Cond, got "
                          f"{type(cond).__name__}")
    null_dev = next(iter(cond.null_fields.values())).device
    return cond._like({**cond.fields, SHIFT: one.to(next(iter(cond.fields.values())).device)}, cond.texts,
                      {**cond.null_fields, SHIFT: one[:1].to(null_dev)})


class Guided(Denoiser):
    """Classifier-free guidance: D_w = D(x, t, null) + w (D(x, t, c) - D(x, t, null)).

    Predictions at a fixed (x_t, t) are affine in one another, so combining in the native
    parametrization equals combining in any other (x0, eps, score...). ``scale`` 1 is the conditional model;
    a (B,) tensor is one scale per sample (SNOOPI's random-scale guidance, a guidance-distillation target).

    A base with ``embedded_guidance`` (guidance-distilled Flux: the transformer was trained to output the guided
    prediction for the scale it is given) is run once, D_w = D(x, t, c | guidance = w), as its pipeline does.
    """

    conditional = True

    def __init__(self, base: Denoiser, scale: float):
        super().__init__()
        if not base.conditional:
            raise ConfigError(f"guidance scale {scale} needs a conditional teacher; this one is unconditional "
                              "(set teacher.guidance=1 or use a conditional teacher)")
        self.base, self.scale = base, scale if isinstance(scale, torch.Tensor) else float(scale)
        self.schedule, self.prediction = base.schedule, base.prediction
        self.data_shape, self.num_classes = base.data_shape, base.num_classes

    def unguided(self) -> Denoiser:
        return self.base

    @property
    def guidance_scale(self) -> "float | torch.Tensor":
        return self.scale

    def forward(self, x_t, t, cond=None):
        if self.base.embedded_guidance:
            return self.base(x_t, t, with_guidance(cond, self.scale))
        scale = self.base.guidance_at(self.scale, t)
        per_sample = isinstance(scale, torch.Tensor)
        if cond is None or (not per_sample and scale == 1.0):
            return self.base(x_t, t, cond)
        cond = as_cond(cond, self.num_classes)
        both = self.base(torch.cat([x_t, x_t]), torch.cat([t, t]), Cond.cat([cond, cond.null()]))
        c, u = both.chunk(2)
        scale = bcast(scale, c).to(c) if per_sample else scale
        return u + scale * (c - u)


def guided(denoiser: Denoiser, scale: "float | torch.Tensor") -> Denoiser:
    """The denoiser at guidance ``scale``: CFG, or the scale fed to an embedded-guidance network. Scale 1 is the
    denoiser itself, for every caller that means "no extra guidance" by it; on an embedded-guidance network that
    keeps the network's own default scale (flow.py: ``guidance``, set from teacher.guidance), not guidance 1.
    A (B,) tensor of scales always guides (each row at its own scale, 1 included)."""
    if isinstance(scale, torch.Tensor):
        return Guided(denoiser, scale)
    return denoiser if scale == 1.0 else Guided(denoiser, scale)
