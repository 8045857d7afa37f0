"""Official values that follow from an official option (the official code's number, not this project's, once the
option names the official recipe), and the paper experiments' hyperparameters:

    SiDA        gan_balance=official: gan_weight 1e-4 unless set (mingyuanzhou/SiD branch sida run_sida.sh:42-44);
                grid25_sida alpha 1 (every run of run_sida.sh)
    f-distill   preset=fastgen: FastGen's generator loss end to end (NVlabs/FastGen f_distill.py, common_loss.py)
    rCM         dm_after_warmup: the DMD term from the end of the tangent warm-up (NVlabs/rcm); dm_weight 0.02
    MeanFlow    ratio_split=leading_block, norm_c 0.01 (Gsunshine/meanflow, the official JAX code)
    sCM         prior_sigma=native: FastGen's 1 / sigma_t of the network's own schedule (digits_scd)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import compose
from onestep.core import Batch, Nets
from onestep.denoisers.gmm import GaussianMixture, GMMDenoiser, ring
from onestep.errors import ConfigError
from onestep.objectives.fdistill import FASTGEN, FDistill, FDistillConfig
from onestep.objectives.meanflow import MeanFlow, MeanFlowConfig
from onestep.objectives import scm as scm_module
from onestep.objectives.rcm import RCM, RCMConfig
from onestep.objectives.scm import SCD, SCDConfig
from onestep.objectives.sida import SiDA, SiDAConfig
from onestep.schedules import make_schedule


@pytest.mark.parametrize("balance, want", [("official", 1e-4), ("constant", 0.01)])
def test_sida_gan_weight_follows_the_balance_unless_set(balance, want):
    """Unset, lambda is the balance's (official: loss_scaling_G_gan / loss_scaling_G = 0.01 / 100); a value set by
    hand wins; the config handed in keeps "unset"."""
    cfg = SiDAConfig(gan_balance=balance)
    assert SiDA(cfg, None).cfg.gan_weight == want and cfg.gan_weight is None
    assert SiDA(SiDAConfig(gan_balance=balance, gan_weight=0.5), None).cfg.gan_weight == 0.5
    composed = compose(["experiment=gmm_sida", "objective.gan_weight=null", f"objective.gan_balance={balance}"]).objective
    assert SiDA(composed, None).cfg.gan_weight == want and composed.gan_weight is None


def test_grid25_sida_is_the_official_run():
    obj = compose(["experiment=grid25_sida"]).objective
    assert (obj.alpha, obj.gan_weight, obj.gan_balance) == (1.0, 1e-4, "official")
    assert SiDA(obj, None).cfg.gan_weight == 1e-4


# --- f-distill: preset=fastgen ---------------------------------------------------------------------------------------

def fastgen_h(logits, t, t_min, t_max, bin_num=10):
    """NVlabs/FastGen fastgen/methods/distribution_matching/f_distill.py:59-111 with its config_f_distill.py defaults
    (js, ratio in [0.1, 20], ratio_normalization, 10 bins, ratio_ema_rate 0, bins initialised to ones at :57)."""
    ratio = torch.exp(torch.clamp(logits.mean(dim=1), min=-10.0, max=10.0)).detach()
    ratio = torch.clamp(ratio, 0.1, 20.0)
    bin_width = (t_max - t_min) / bin_num
    idx = ((t.double() - t_min) / bin_width).floor().long().clamp(0, bin_num - 1)
    cnt = torch.bincount(idx, minlength=bin_num).double()
    ratio_sum = torch.bincount(idx, weights=ratio, minlength=bin_num).double()
    valid = cnt > 0
    new_vals = ratio_sum / (cnt + 1e-6)
    bins = torch.ones(bin_num, dtype=torch.float64)
    bins[valid] = bins[valid] * 0.0 + (1 - 0.0) * new_vals[valid]
    ratio = ratio / (bins[idx] + 1e-6)
    h = 1 - 1 / (1 + ratio)
    return h / (h.sum() / len(h) + 1e-6)


def fastgen_vsd_loss(gen_data, teacher_x0, fake_score_x0, h):
    """fastgen/methods/common_loss.py:63-103 (variational_score_distillation_loss with additional_scale h)."""
    with torch.no_grad():
        w = 1 / ((gen_data - teacher_x0).abs().mean(dim=1, keepdim=True) + 1e-6) * h[:, None]
        pseudo_target = gen_data - (fake_score_x0 - teacher_x0) * w
    return 0.5 * F.mse_loss(gen_data, pseudo_target, reduction="mean")


def test_fdistill_fastgen_preset_is_fastgens_generator_loss():
    """preset=fastgen: f_distill.py:138-169 written out in float64 on one t and noise (ours draws them; FastGen's t
    distribution is its sample_t_cfg's): x_t = x + sigma eps, D(x_t) read once, h from it (detached), loss =
    VSD(x, teacher x0, fake x0, h) + 1e-3 softplus(-D(x_t)).mean(); in value and in d/dx. Without gan_at_fdistill_t
    the GAN term reads D at its own t."""
    edm = make_schedule("edm")
    g = torch.Generator().manual_seed(3)
    teacher = GMMDenoiser(ring(), edm)
    critic = GMMDenoiser(GaussianMixture(torch.tensor([[0.1, 0.0]], dtype=torch.float64),
                                         0.64 * torch.eye(2, dtype=torch.float64)[None], [1.0]), edm)
    x = (0.7 * torch.randn(64, 2, dtype=torch.float64, generator=g)).requires_grad_(True)
    w_d = torch.tensor([[1.5], [-2.0]], dtype=torch.float64)

    def disc(nets, x_t, t, cond):
        return (x_t @ w_d)[:, 0] + 0.3

    obj = FDistill(FDistillConfig(preset="fastgen"), lambda _, b: x)
    obj.gan.generator_logits = disc
    nets = Nets(teacher=teacher, generator=None, critic=critic)
    torch.manual_seed(11)
    ours = obj.generator_loss(nets, Batch(noise=x), step=0)["loss"]
    (g_ours,) = torch.autograd.grad(ours, x)
    torch.manual_seed(11)
    u = 0.02 + 0.96 * torch.rand(64, dtype=torch.float64)
    t = edm.t_from_unit(u)
    eps = torch.randn_like(x)
    perturbed_data = x + t[:, None] * eps
    teacher_x0, fake_score_x0 = teacher(perturbed_data, t).detach(), critic(perturbed_data, t).detach()
    fake_logits = disc(None, perturbed_data, t, None)[:, None]
    h = fastgen_h(fake_logits, t, edm.t_min, edm.t_max)
    official = fastgen_vsd_loss(x, teacher_x0, fake_score_x0, h) + 1e-3 * F.softplus(-fake_logits).mean()
    (g_official,) = torch.autograd.grad(official, x)
    assert float(ours.detach()) == pytest.approx(float(official.detach()), rel=1e-4)  # FastGen's 1e-6 epsilons
    assert torch.allclose(g_ours, g_official, rtol=1e-3, atol=1e-12)
    apart = FDistill(FDistillConfig(**{**FASTGEN, "gan_at_fdistill_t": False}), lambda _, b: x)
    apart.gan.generator_logits = apart.gan.logits = disc
    torch.manual_seed(11)
    assert float(apart.generator_loss(nets, Batch(noise=x), step=0)["gan_g"]) != pytest.approx(
        float(F.softplus(-fake_logits).mean().detach()), rel=1e-3)


def test_fdistill_preset_sets_fastgens_keys_and_refuses_conflicts():
    cfg = FDistillConfig(preset="fastgen")
    got = FDistill(cfg, None).cfg
    assert {k: getattr(got, k) for k in FASTGEN} == FASTGEN
    assert (got.log_ratio_clamp, got.ratio_lower, got.ratio_upper, got.max_weight, got.normalization) == (
        10.0, 0.1, 20.0, math.inf, "ratio_bins")
    assert cfg.normalization == "h_bins"  # the run's config is left as given
    assert FDistill(FDistillConfig(), None).cfg.normalization == "h_bins"
    assert FDistill(FDistillConfig(preset="fastgen", ratio_upper=20.0), None).cfg.ratio_upper == 20.0
    with pytest.raises(ConfigError, match="preset=fastgen sets log_ratio_clamp=10.0; drop objective.log_ratio_clamp=7"):
        FDistill(FDistillConfig(preset="fastgen", log_ratio_clamp=7.0), None)
    with pytest.raises(ConfigError, match="preset='official' is unknown"):
        FDistill(FDistillConfig(preset="official"), None)


@pytest.mark.parametrize("experiment, preset", [("grid25_fdistill", "fastgen"), ("gmm_fdistill", "none"),
                                                ("digits_fdistill", "none")])
def test_fdistill_experiments(experiment, preset):
    """The grid25 paper-recipe run is FastGen's; the CI-measured ones keep the previous recipe."""
    assert compose([f"experiment={experiment}"]).objective.preset == preset


# --- rCM: dm_after_warmup, dm_weight --------------------------------------------------------------------------------

@pytest.mark.parametrize("after, warmup, dm_steps", [(True, 10, [10, 11, 50]), (False, 10, [0, 9, 10, 11, 50]),
                                                     (True, 0, [0, 9, 10, 11, 50])])
def test_rcm_dmd_term_starts_after_the_tangent_warmup(after, warmup, dm_steps):
    """NVlabs/rcm t2v_model_distill_rcm.py:709: emit_dmd = iteration >= tangent_warmup (with the warm-up ratio of
    :548, min(1, iteration / tangent_warmup)); the step's loss is the sCM loss alone before it, + dm_weight L_DMD after."""
    edm = make_schedule("edm")
    g = torch.Generator().manual_seed(4)
    x = (0.7 * torch.randn(16, 2, dtype=torch.float64, generator=g)).requires_grad_(True)
    critic = GMMDenoiser(GaussianMixture(torch.tensor([[0.1, 0.0]], dtype=torch.float64),
                                         0.64 * torch.eye(2, dtype=torch.float64)[None], [1.0]), edm)
    nets = Nets(teacher=GMMDenoiser(ring(), edm), generator=None, critic=critic)
    obj = RCM(RCMConfig(dm_after_warmup=after, warmup_steps=warmup, dm_weight=0.02), lambda _, b: x)
    obj.scm_loss = lambda nets, batch, step: {"loss": torch.tensor(1.0, dtype=torch.float64)}
    emitted = []
    for iteration in (0, 9, 10, 11, 50):
        out = obj.generator_loss(nets, Batch(noise=x), step=iteration)
        emit_dmd = "dm" in out
        dm = 0.02 * float(out["dm"]) if emit_dmd else 0.0
        assert float(out["loss"].detach()) == pytest.approx(1.0 + dm, rel=1e-12)
        if emit_dmd:
            emitted.append(iteration)
    assert emitted == dm_steps


@pytest.mark.parametrize("experiment, want", [
    ("flux_rcm", {"dm_weight": 0.02, "dm_after_warmup": True}),
    ("wan_rcm", {"dm_weight": 0.02, "dm_after_warmup": True}),
    ("gmm_rcm", {"dm_weight": 0.1, "dm_after_warmup": False}),  # CI-measured: the previous recipe
])
def test_rcm_experiments(experiment, want):
    obj = compose([f"experiment={experiment}"]).objective
    assert {k: obj[k] for k in want} == want


# --- MeanFlow: ratio_split, norm_c ---------------------------------------------------------------------------------

def test_meanflow_leading_block_is_the_official_sample_tr():
    """Gsunshine/meanflow meanflow.py:138-157 in float64 on the same normals: t, r = max / min of two logit-normal
    draws, the first int(B data_proportion) rows r = t (zero_mask = arange(B) < data_size); times mapped through the
    schedule (rectified flow: the same numbers). per_row draws each row's bucket instead (a random count)."""
    sched = make_schedule("rectified_flow")
    n, p_mean, p_std = 256, -0.4, 1.0
    obj = MeanFlow(MeanFlowConfig(flow_matching_ratio=0.75, ratio_split="leading_block"), generate=None)
    torch.manual_seed(2)
    t, r = obj.sample_tr(sched, n, torch.zeros(1, dtype=torch.float64))
    torch.manual_seed(2)
    t_off = torch.sigmoid(torch.randn(n, dtype=torch.float64) * p_std + p_mean)
    r_off = torch.sigmoid(torch.randn(n, dtype=torch.float64) * p_std + p_mean)
    t_off, r_off = torch.maximum(t_off, r_off), torch.minimum(t_off, r_off)
    data_size = int(n * 0.75)
    zero_mask = torch.arange(n) < data_size
    r_off = torch.where(zero_mask, t_off, r_off)
    assert torch.allclose(t, sched.t_from_unit(t_off), rtol=1e-12, atol=0)
    assert torch.allclose(r, sched.t_from_unit(r_off), rtol=1e-12, atol=0)
    assert int((r == t).sum()) == 192
    block = MeanFlow(MeanFlowConfig(flow_matching_ratio=0.5, consistency_ratio=0.25, ratio_split="leading_block"), None)
    t, r = block.sample_tr(sched, 10, torch.zeros(1, dtype=torch.float64))
    assert torch.equal(r[:5], t[:5]) and bool((r[5:7] == 0).all()) and bool((r[7:] > 0).all())
    with pytest.raises(ConfigError, match="ratio_split='blocks' is unknown"):
        MeanFlow(MeanFlowConfig(ratio_split="blocks"), None)


def test_gmm_meanflow_takes_the_official_split_and_norm_eps():
    obj = compose(["experiment=gmm_meanflow"]).objective
    assert (obj.ratio_split, obj.norm_c) == ("leading_block", 0.01)


# --- sCM: prior_sigma ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["vp_cosine", "vp_linear", "edm"])
def test_scm_native_prior_weight_is_fastgens_one_over_sigma_t(monkeypatch, schedule):
    """FastGen sCM.py:198-203, :278 in float64: at the network's own time t, sigma_t = sigma(t), t_hat = atan2(sigma_t,
    alpha_t sigma_d) and the error is weighted by 1 / sigma_t. At F = F- with c -> 0 and rms the error is 1, so the loss
    is mean(1 / sigma_t); prior_sigma=trigflow gives mean(1 / (sigma_d tan t_hat)), smaller by alpha_t on VP, equal on EDM."""
    dim, n, sd = 4, 8, 0.5
    sched = make_schedule(schedule)
    t_native = sched.t_from_unit(torch.linspace(0.1, 0.9, n, dtype=torch.float64))
    sigma_t, alpha_t = sched.sigma(t_native), sched.alpha(t_native)
    t_hat = torch.atan2(sigma_t, alpha_t * sd)
    monkeypatch.setattr(scm_module, "trig_times", lambda *a, like, **k: t_hat.to(like))
    mix = GaussianMixture(torch.tensor([[0.3, -0.2, 0.1, 0.5]], dtype=torch.float64),
                          0.49 * torch.eye(dim, dtype=torch.float64)[None], [1.0])
    off = GaussianMixture(torch.tensor([[1.0, 0.4, -0.5, 0.0]], dtype=torch.float64),
                          0.12 * torch.eye(dim, dtype=torch.float64)[None], [1.0])
    nets = Nets(teacher=GMMDenoiser(mix, sched), generator=GMMDenoiser(off, sched))
    x0 = torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    losses = {}
    for form in ("native", "trigflow"):
        cfg = SCDConfig(sigma_data=sd, tangent_norm_c=1e-12, adaptive_weighting=False, warmup_steps=0,
                        tangent_norm="rms", prior_weighting=True, prior_sigma=form)
        losses[form] = float(SCD(cfg, None).scm_loss(nets, Batch(noise=x0, real=x0), 10)["loss"])
    weight = 1.0 / sigma_t
    assert losses["native"] == pytest.approx(float(weight.mean()), rel=1e-9)
    assert losses["trigflow"] == pytest.approx(float((1 / (sd * torch.tan(t_hat))).mean()), rel=1e-9)
    if schedule == "edm":
        assert losses["native"] == pytest.approx(losses["trigflow"], rel=1e-9)
    else:
        assert losses["native"] > 1.05 * losses["trigflow"]


def test_scm_prior_sigma_defaults():
    assert compose(["experiment=digits_scd"]).objective.prior_sigma == "native"  # "FastGen defaults"
    assert compose(["experiment=sana_sprint"]).objective.prior_sigma == "trigflow"  # SANA-Sprint's 1 / (tan t sigma_d)
    with pytest.raises(ConfigError, match="prior_sigma='fastgen' is unknown"):
        SCD(SCDConfig(prior_sigma="fastgen"), None)
