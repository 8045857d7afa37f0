"""TSCD (onestep/objectives/tscd.py): inside each of k segments the student is a consistency function onto the
segment's lower boundary, reparametrized from its x0 prediction by a DDIM step. On a single-Gaussian teacher the
exact segment consistency function is known in closed form (the PF-ODE keeps the z-score (x - a mu) / sqrt(a^2 var +
s^2) constant), so the boundary mapping, the targets, the vanishing loss and the k-step sampler on the boundaries are
checked exactly; k = 1 is cd.py's loss draw for draw; a short ring run beats the teacher's 1-step sampler."""

from __future__ import annotations

import pytest
import torch

from onestep.core import Batch, Nets
from onestep.denoisers.base import Denoiser
from onestep.denoisers.gmm import GaussianMixture, GMMDenoiser
from onestep.errors import ConfigError
from onestep.objectives import consistency as C
from onestep.objectives.cd import CDConfig, ConsistencyDistillation
from onestep.objectives.tscd import TSCD, TSCDConfig, boundaries, boundary_ts
from onestep.sampling import sample
from onestep.schedules import make_schedule

MU, VAR = torch.tensor([0.3, -0.5], dtype=torch.float64), 0.2
SCHED = make_schedule("edm")


def sd(t):
    return torch.sqrt(SCHED.alpha(t) ** 2 * VAR + SCHED.sigma(t) ** 2)


def ode_state(x, t, s):
    """The exact PF-ODE map of the Gaussian teacher from (x, t) to time s (s = 0: the data endpoint)."""
    z = (x - SCHED.alpha(t)[:, None] * MU) / sd(t)[:, None]
    a_s = SCHED.alpha(s) if not isinstance(s, float) else torch.tensor(1.0, dtype=torch.float64)
    sd_s = sd(s) if not isinstance(s, float) else torch.tensor(VAR**0.5, dtype=torch.float64)
    a_s, sd_s = (v[:, None] if v.ndim else v for v in (a_s, sd_s))
    return a_s * MU + sd_s * z


class ExactSegments(Denoiser):
    """The exact k-segment consistency model on an n-level grid: at t in (t(b_j), t(b_{j+1})] its x0 prediction is
    the one whose DDIM step onto t(b_j) lands on the exact ODE state there (solved for x0 independently of tscd.py);
    in the lowest segment it is the ODE's data endpoint. ``offset`` perturbs it by offset * t (a t-independent shift
    would nearly cancel between the pair, as in any consistency loss)."""

    prediction = "x0"
    data_shape = (2,)

    def __init__(self, n_levels: int, k: int, offset: float = 0.0):
        super().__init__()
        self.schedule, self.offset = SCHED, offset
        sig = C.karras_sigmas(n_levels, *C.sigma_range(SCHED))
        self.bounds_t = C.t_of_sigma(SCHED, sig[boundaries(n_levels, k)])

    def forward(self, x_t, t, cond=None):
        t = self._time(t, x_t)
        j = (torch.searchsorted(self.bounds_t, t.contiguous()) - 1).clamp(0, len(self.bounds_t) - 2)  # t in (b_j, b_{j+1}]
        s = self.bounds_t[j]
        # x_s = a_s x0 + s_s (x - a_t x0) / s_t  =>  x0 = (x_s - (s_s / s_t) x) / (a_s - s_s a_t / s_t)
        r = (SCHED.sigma(s) / SCHED.sigma(t))[:, None]
        x0 = (ode_state(x_t, t, s) - r * x_t) / (SCHED.alpha(s)[:, None] - r * SCHED.alpha(t)[:, None])
        x0 = torch.where((j == 0)[:, None], ode_state(x_t, t, 0.0), x0)
        return x0 + self.offset * t[:, None]


def teacher():
    return GMMDenoiser(GaussianMixture(MU[None], VAR * torch.eye(2, dtype=torch.float64)[None], [1.0]), SCHED)


def batch(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = MU + VAR**0.5 * torch.randn(n, 2, dtype=torch.float64, generator=g)
    return Batch(noise=torch.randn(n, 2, dtype=torch.float64, generator=g), real=real)


N = 97  # 96 pairs: fine levels (Heun's error ~1e-4), and the 8 / 4 / 2 boundaries fall on levels


def test_boundaries_nest_and_give_the_k_step_t_list():
    assert boundaries(17, 8).tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert boundaries(17, 1).tolist() == [0, 16]
    for k in (4, 2):
        assert set(boundaries(17, k).tolist()) <= set(boundaries(17, 8).tolist())
    sig = C.karras_sigmas(17, *C.sigma_range(SCHED))
    assert torch.allclose(boundary_ts(SCHED, 17, 2), torch.stack([sig[16], sig[8]]))
    assert float(boundary_ts(SCHED, 17, 1)[0]) == SCHED.t_max
    with pytest.raises(ConfigError, match="num_scales"):
        boundaries(5, 8)


@pytest.mark.parametrize("k", [8, 2])
def test_segment_map_targets_and_loss_are_exact(k):
    """For the exact k-segment model: the student's F(x_{n+1}, t_{n+1}; s) IS the exact ODE state at its segment's
    boundary s (the data endpoint in the lowest segment); a pair starting on a boundary has x^_n itself as target;
    the loss is Heun's error only, and >1e3 times larger for a model off by 0.05 t."""
    obj = TSCD(TSCDConfig(num_scales=N, segments=[8, 4, 2, 1], stage_steps=[10, 10, 10]), generate=None)
    step = {8: 3, 2: 25}[k]
    assert obj.segments_at(step) == k
    exact, b = ExactSegments(N, k), batch()
    n = Nets(teacher=teacher(), generator=exact)
    torch.manual_seed(4)
    p = obj.segment_pairs(n, b, step)
    assert p["segments"] == k
    x0 = exact.x0(p["x_hi"], p["t_hi"])
    from onestep.objectives.tscd import to_boundary

    f = to_boundary(x0, p["x_hi"], p["t_hi"], p["t_end"], SCHED, p["lowest"])
    want = torch.where(p["lowest"][:, None], ode_state(p["x_hi"], p["t_hi"], 0.0),
                       ode_state(p["x_hi"], p["t_hi"], p["t_end"]))
    assert float((f - want).abs().max()) < 1e-10
    assert bool((p["t_end"] < p["t_hi"]).all()) and bool((p["t_end"] <= p["t_lo"] * (1 + 1e-12)).all())
    on = (p["t_lo"] == p["t_end"]) & ~p["lowest"]
    assert bool(on.any()) and torch.equal(p["target"][on], p["x_lo"][on])  # the segment's boundary condition
    assert float((p["target"] - want).abs().max()) < 5e-4  # the target: the same state, up to the Heun step

    def loss(model):
        torch.manual_seed(4)
        return float(obj.generator_loss(Nets(teacher=teacher(), generator=model), b, step)["loss"])

    clean, off = loss(exact), loss(ExactSegments(N, k, offset=0.05))
    assert clean < 1e-7 and off > 1e3 * clean, (clean, off)


def test_one_segment_is_cd():
    """The last stage (k = 1) is cd.py's loss, draw for draw."""
    cfg = dict(num_scales=18, solver="heun")
    obj = TSCD(TSCDConfig(segments=[2, 1], stage_steps=[5], **cfg), generate=None)
    model = ExactSegments(18, 2, offset=0.05)  # any student
    out = []
    for o in (obj, ConsistencyDistillation(CDConfig(**cfg), generate=None)):
        torch.manual_seed(7)
        out.append(o.generator_loss(Nets(teacher=teacher(), generator=model), batch(), step=6)["loss"])
    assert torch.equal(out[0], out[1])
    torch.manual_seed(7)
    assert not torch.equal(obj.generator_loss(Nets(teacher=teacher(), generator=model), batch(), step=4)["loss"],
                           out[1])  # k = 2 is not


@pytest.mark.parametrize("k", [1, 2, 8])
def test_k_segment_model_samples_exactly_in_k_ddim_steps_on_the_boundaries(k):
    """generator.method=ddim on boundary_ts: each step is the segment map, so the exact k-segment model's k-step
    sample is the ODE's data endpoint from the starting noise."""
    noise = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ts = boundary_ts(SCHED, 17, k)
    x = sample(ExactSegments(17, k), noise, ts, method="ddim")
    x_T = noise * SCHED.prior_std(ts[0])
    want = ode_state(x_T, ts[0].expand(64), 0.0)
    assert float((x - want).abs().max()) < 1e-10


def test_stages_and_validation():
    obj = TSCD(TSCDConfig(), generate=None)
    assert [obj.segments_at(s) for s in (0, 199, 200, 399, 400, 599, 600, 10_000)] == [8, 8, 4, 4, 2, 2, 1, 1]
    for bad in (dict(segments=[]), dict(segments=[4, 4, 1], stage_steps=[5, 5]), dict(segments=[0], stage_steps=[]),
                dict(stage_steps=[200, 200]), dict(stage_steps=[200, 0, 200]), dict(num_scales=8)):
        with pytest.raises(ConfigError):
            TSCD(TSCDConfig(**bad), generate=None)


@pytest.mark.slow
def test_tscd_ring_beats_the_teachers_one_step_sampler(tmp_path):
    """experiment=gmm_tscd shortened (8, 4, 2 segments for 40 steps each, then 180 steps of k = 1; a 400-step teacher): the 1-step student covers all 8
    modes with a sliced-W2 far below the teacher's own 1-step sampler (the mixture mean, ~0.70)."""
    from conftest import ring_run_beats_one_step_teacher

    ring_run_beats_one_step_teacher(["experiment=gmm_tscd", "teacher.net_steps=400", "trainer.steps=300",
                                     "objective.stage_steps=[40,40,40]"], tmp_path, 3, "tscd", spread="ring_tscd")
