"""Gaussian mixtures: ``gmm`` = the exact mixture score through any schedule (denoisers/gmm.py); ``gmm_learned`` =
an MLP fitted to the mixture by denoising score matching. Either way the MLP, fitted once per run folder, is what
generator and critic start from; data are mixture samples and metrics are exact (eval/gmm_eval.py)."""

from __future__ import annotations

from onestep.denoisers.gmm import GMMDenoiser, make_mixture
from onestep.denoisers.nets import MLPDenoiser
from onestep.errors import ConfigError
from onestep.schedules import make_schedule
from onestep.teachers import register
from onestep.teachers.base import Family, Parts

MLP_FIELDS = ("net_hidden", "net_depth", "net_time_scale", "net_steps", "net_lr", "net_batch")


class Mixture(Family):
    kinds = ("gmm", "gmm_learned")
    presets = {"gmm_ring": {"mixture": "ring"}, "gmm_grid": {"mixture": "grid"},
               "gmm_classes": {"mixture": "class_mixture", "guidance": 2.0},
               "gmm_ring_learned": {"kind": "gmm_learned", "mixture": "ring"}}
    fields = {"teacher": ("mixture", "mixture_args", "schedule", "schedule_args", *MLP_FIELDS)}
    data_kinds = ("gmm",)
    data_hint = "mixture samples: use data=gmm"
    evaluation = "mixture"

    def load(self, cfg, kind, device) -> Parts:
        tc = cfg.teacher
        mix, sched = _mixture(tc), _schedule(tc)
        net = MLPDenoiser(sched, mix.dim, hidden=tc.net_hidden, depth=tc.net_depth, num_classes=mix.num_classes,
                          time_scale=tc.net_time_scale)

        def clean(n: int):
            labels = mix.sample_labels(n)
            return mix.sample(n, labels).float(), labels

        exact = GMMDenoiser(mix, sched) if kind == "gmm" else None
        return Parts(denoiser=exact, student_init=net, fit_on=clean, num_classes=mix.num_classes, distribution=mix)


def _mixture(tc):
    try:
        return make_mixture(tc.mixture, **tc.mixture_args)
    except TypeError as e:
        raise ConfigError(f"teacher.mixture_args {dict(tc.mixture_args)} do not fit mixture '{tc.mixture}' ({e})") from None


def _schedule(tc):
    try:
        return make_schedule(tc.schedule, **tc.schedule_args)
    except TypeError as e:
        raise ConfigError(f"teacher.schedule_args {dict(tc.schedule_args)} do not fit schedule '{tc.schedule}' ({e})") from None


register(Mixture())
