"""Paper recipes, part 2 (issue 19): each option changes the weighting / head / balance exactly as documented, checked
in float64 against the official code's formula written out on the same tensors (or a closed form):

    objective.weighting=sigma2, fake_guidance, critic_weighting=alpha2_eps, critic_t_dist, critic_label_dropout  (vsd)
    objective.gan_head=conv|channel_mean, gan_t_dist, disc_weight                                   (the GAN block)
    objective.gan_balance=official, gan_start_images                                                (sida)
    objective.c_units, normalize                                                                    (sim)
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import compose
from onestep.conditioning import Labels
from onestep.core import Batch, Nets, dsm_loss, noised, sample_t
from onestep.denoisers.base import Denoiser, Guided, guided
from onestep.denoisers.gmm import GaussianMixture, GMMDenoiser, class_mixture, ring
from onestep.denoisers.nets import MLPDenoiser
from onestep.errors import ConfigError
from onestep.help import field_docs
from onestep.objectives.adversarial import ConvHead, GANConfig, GANTerm, point_norm
from onestep.objectives.distribution_matching import denoised_pair
from onestep.objectives.sida import SiDA, SiDAConfig
from onestep.objectives.sim import SIMConfig, sim_loss
from onestep.objectives.vsd import VSD, VSDConfig, vsd_gradient
from onestep.schedules import make_schedule

RHO, SMIN, SMAX = 7.0, 0.002, 80.0


def _gaussian(mean, std):
    mean = torch.as_tensor(mean, dtype=torch.float64)[None]
    d = mean.shape[1]
    return GaussianMixture(mean, std**2 * torch.eye(d, dtype=torch.float64)[None], [1.0])


def _pair(sched):
    return GMMDenoiser(ring(), sched), GMMDenoiser(_gaussian([0.1, -0.2], 0.7), sched)


# --- VSD / SwiftBrush ---------------------------------------------------------------------------------------------

def test_vsd_sigma2_is_swiftbrush_gradient_on_a_vp_table():
    """train_swiftbrush.py:781-782 on the same x_t: (1 - alphabar_t) (eps_teacher - eps_lora), SD's scaled-linear table
    at integer timesteps; x0 is heavier by exactly 1 / (alpha_t sigma_t), eps by 1 / sigma_t^2."""
    sd = make_schedule("vp_discrete")
    real, fake = _pair(sd)
    g = torch.Generator().manual_seed(0)
    x = 0.6 * torch.randn(64, 2, dtype=torch.float64, generator=g)
    eps = torch.randn(64, 2, dtype=torch.float64, generator=g)
    t = sample_t(sd, 64, 0.02, 0.98, dist="grid")
    got = vsd_gradient(real, fake, x, weighting="sigma2", t=t, eps=eps)
    x_t, _ = noised(sd, x, t, eps)
    alphabar = sd.alpha(t) ** 2
    want = (1 - alphabar)[:, None] * (real.eps(x_t, t) - fake.eps(x_t, t))
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    a, s = sd.alpha(t)[:, None], sd.sigma(t)[:, None]
    x0 = vsd_gradient(real, fake, x, weighting="x0", t=t, eps=eps)
    assert torch.allclose(x0, want / (a * s), rtol=1e-9, atol=1e-12)
    assert torch.allclose(vsd_gradient(real, fake, x, weighting="eps", t=t, eps=eps), want / s**2, rtol=1e-9, atol=1e-12)
    k = sd.index(torch.tensor([20.0, 980.0], dtype=torch.float64) / 999)  # the 7.4x at t=20, 13x at t=980
    ends = sd.t_from_unit(torch.tensor([20.0, 980.0], dtype=torch.float64) / 999)
    ratio = 1 / (sd.alpha(ends) * sd.sigma(ends))
    assert k.round().tolist() == [20.0, 980.0] and 6.5 < float(ratio[0]) < 8 and 12 < float(ratio[1]) < 14


def test_vsd_sigma2_on_edm_is_the_vp_sigma_at_the_same_snr():
    """On EDM (alpha = 1) sigma2 is the VP schedule's sigma_t^2 = sig^2 / (1 + sig^2) on the eps difference."""
    edm = make_schedule("edm")
    real, fake = _pair(edm)
    g = torch.Generator().manual_seed(1)
    x = 0.6 * torch.randn(64, 2, dtype=torch.float64, generator=g)
    eps = torch.randn(64, 2, dtype=torch.float64, generator=g)
    t = sample_t(edm, 64, 0.02, 0.98)
    x_t, _ = noised(edm, x, t, eps)
    s2_vp = (t**2 / (1 + t**2))[:, None]
    want = s2_vp * (real.eps(x_t, t) - fake.eps(x_t, t))
    assert torch.allclose(vsd_gradient(real, fake, x, weighting="sigma2", t=t, eps=eps), want, rtol=1e-9, atol=1e-12)


def test_vsd_objective_guides_the_critic_with_the_teachers_scale():
    """fake_guidance=None: the generator gradient is SwiftBrush's sigma_t^2 ((e_u + w (e_c - e_u))_teacher - (same)_critic),
    w = the teacher's CFG scale (train_swiftbrush.py:770-782); fake_guidance=1 leaves the critic unguided. Checked on
    x.grad of the surrogate (grad / numel) of a class-conditional GMM pair under VP-linear."""
    vp = make_schedule("vp_linear")
    mix = class_mixture(dim=3, num_classes=3, per_class=1, seed=0)
    other = class_mixture(dim=3, num_classes=3, per_class=1, scale=1.3, seed=1)
    teacher_base, critic = GMMDenoiser(mix, vp), GMMDenoiser(other, vp)
    teacher = guided(teacher_base, 2.5)
    n = 32
    g = torch.Generator().manual_seed(2)
    x = (0.5 * torch.randn(n, 3, dtype=torch.float64, generator=g)).requires_grad_(True)
    cond = Labels(torch.randint(0, 3, (n,), generator=g), 3)
    for fake_guidance, scale in [(None, 2.5), (1.0, 1.0)]:
        obj = VSD(VSDConfig(weighting="sigma2", fake_guidance=fake_guidance), lambda _, b: x)
        nets = Nets(teacher=teacher, generator=None, critic=critic)
        x.grad = None
        torch.manual_seed(3)
        obj.generator_loss(nets, Batch(noise=x, cond=cond), 0)["loss"].backward()
        torch.manual_seed(3)
        t = sample_t(vp, n, 0.02, 0.98, like=x)
        x_t, _ = noised(vp, x.detach(), t)

        def cfg_eps(net, w):
            e_c, e_u = net.eps(x_t, t, cond), net.eps(x_t, t, cond.null())
            return e_u + w * (e_c - e_u)

        want = (1 - vp.alpha(t) ** 2)[:, None] * (cfg_eps(teacher_base, 2.5) - cfg_eps(critic, scale))
        assert torch.allclose(x.grad * x.numel(), want, rtol=1e-8, atol=1e-12), fake_guidance


def test_alpha2_eps_critic_loss_is_swiftbrushs():
    """critic_weighting=alpha2_eps: mean(alphabar_t (eps_hat - eps)^2) (train_swiftbrush.py:817-822) on the same x_t;
    on EDM alphabar is the VP one, 1 / (1 + sigma^2)."""
    for name in ("vp_linear", "edm"):
        sched = make_schedule(name)
        critic = GMMDenoiser(_gaussian([0.2, 0.1], 0.6), sched)
        g = torch.Generator().manual_seed(4)
        x0 = torch.randn(50, 2, dtype=torch.float64, generator=g)
        eps = torch.randn(50, 2, dtype=torch.float64, generator=g)
        t = sample_t(sched, 50, 0.02, 0.98)
        got = dsm_loss(critic, x0, weighting="alpha2_eps", t=t, eps=eps)
        x_t, _ = noised(sched, x0, t, eps)
        a2 = sched.alpha(t) ** 2 / (sched.alpha(t) ** 2 + sched.sigma(t) ** 2)
        want = (a2[:, None] * (critic.eps(x_t, t) - eps) ** 2).mean()
        assert float(got) == pytest.approx(float(want), rel=1e-12)
        assert float(dsm_loss(critic, x0, weighting="eps", t=t, eps=eps)) != pytest.approx(float(want), rel=1e-3)


def test_vsd_critic_draws_swiftbrush_timesteps_and_null_prompts():
    """critic_t_dist=grid: integer timesteps 0..999 of SD's table (randint(0, 1000)); critic_label_dropout=0.1: a
    tenth of the rows take the null label; the defaults leave both as before (continuous t, no dropout)."""
    sd = make_schedule("vp_discrete")
    obj = VSD(VSDConfig(critic_t_dist="grid", critic_label_dropout=0.1), None)
    nets = Nets(teacher=None, generator=None, critic=SimpleNamespace(schedule=sd))
    torch.manual_seed(5)
    k = sd.index(obj.critic_t(nets, torch.zeros(50_000, 2, dtype=torch.float64)))
    assert (k - k.round()).abs().max() < 1e-9 and set(k.round().long().tolist()) == set(range(1000))
    assert VSD(VSDConfig(), None).critic_t(nets, torch.zeros(4, 2)) is None
    cond = Labels(torch.zeros(20_000, dtype=torch.long), 10)
    dropped = (obj.critic_cond(nets, Batch(noise=None, cond=cond)).labels == 10).double().mean()
    assert abs(float(dropped) - 0.1) < 0.01
    assert VSD(VSDConfig(), None).critic_cond(nets, Batch(noise=None, cond=cond)) is cond
    with pytest.raises(ConfigError, match="weighting='sds' is unknown"):
        VSD(VSDConfig(weighting="sds"), None)
    with pytest.raises(ConfigError, match="critic_t_dist"):
        VSD(VSDConfig(critic_t_dist="karras"), None)


# --- DMD2's GAN: the conv head, its noise levels ------------------------------------------------------------------

def dmd2_head(c: int, size: int) -> nn.Sequential:
    """DMD2's cls_pred_branch written as main/sd_guidance.py:108-133 builds it (channels c instead of 1280)."""
    layers: list[nn.Module] = []
    for _ in range({8: 1, 32: 3}[size]):
        layers += [nn.Conv2d(kernel_size=4, in_channels=c, out_channels=c, stride=2, padding=1),
                   nn.GroupNorm(num_groups=32, num_channels=c), nn.SiLU()]
    layers += [nn.Conv2d(kernel_size=4, in_channels=c, out_channels=c, stride=4, padding=0),
               nn.GroupNorm(num_groups=32, num_channels=c), nn.SiLU(),
               nn.Conv2d(kernel_size=1, in_channels=c, out_channels=1, stride=1, padding=0)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("size", [8, 32])
def test_conv_head_is_dmd2s_head(size):
    """gan_head=conv on an 8x8 (ImageNet / SD1.5) or 32x32 (SDXL) bottleneck is DMD2's head layer for layer: its state
    dict loads into the official stack (same shapes) and gives the same logits (float64). 256 channels: 8 per group at
    the 1x1 norm, as many as the head needs to keep DMD2's GroupNorm(32) there (DMD2's own 768 / 1280 have more)."""
    head = ConvHead((256, size, size)).double()
    official = dmd2_head(256, size).double()
    official.load_state_dict(head.convs.state_dict(), strict=True)
    feats = torch.randn(3, 256, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(head(feats), official(feats).squeeze(dim=3).squeeze(dim=2).squeeze(1), rtol=1e-12)
    assert head(feats).shape == (3,)
    with pytest.raises(ConfigError, match="spatial_feature_shape is wrong"):
        head(torch.randn(3, 256, 2 * size, 2 * size, dtype=torch.float64))


def test_conv_head_logits_vary_with_the_input_on_few_channels():
    """DMD2's GroupNorm(32) on the 1x1 map of a 32-channel bottleneck normalizes one channel per group to 0: every input
    got the same logit (spread ~1e-6). The 1x1 norm keeps >= 8 channels per group (none below 8 channels), so on the
    tiny UNet the logits of 16 inputs spread by a tenth or more; DMD2's sizes keep 32 groups."""
    net = _tiny_unet_denoiser()
    cfg = GANConfig(discriminator="critic", gan_head="conv")
    cfg.name = "test"
    head = GANTerm(cfg, has_critic=True).build(SimpleNamespace(student_init=net))["disc"][0]
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(16, 1, 8, 8, generator=g), 0.05 + 0.9 * torch.rand(16, generator=g)
    with torch.no_grad():
        logits = head(net.spatial_features(x_t, t))
    assert float(logits.std()) > 0.1, logits
    norms = {c: point_norm(c) for c in (4, 32, 64, 768, 1280)}
    assert isinstance(norms[4], nn.Identity)
    assert {c: n.num_groups for c, n in norms.items() if c > 4} == {32: 4, 64: 8, 768: 32, 1280: 32}


def _tiny_unet_denoiser():
    from diffusers import UNet2DModel

    from onestep.denoisers.diffusers import UNet2DDenoiser

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    return UNet2DDenoiser(unet.eval(), make_schedule("vp_cosine"), "eps")


def test_conv_head_reads_a_unets_spatial_bottleneck_and_refuses_vectors():
    """On an image UNet the conv head reads the mid-block's (C, h, w) map (32 x 4 x 4 here; features() is its spatial
    mean); on the 2-D MLP there is no spatial map: a ConfigError that names the fix."""
    net = _tiny_unet_denoiser()
    assert net.spatial_feature_shape == (32, 4, 4)
    cfg = GANConfig(discriminator="critic", gan_head="conv")
    cfg.name = "test"
    term = GANTerm(cfg, has_critic=True)
    head = term.build(SimpleNamespace(student_init=net))["disc"][0]
    assert isinstance(head, ConvHead)
    x_t, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        spatial = net.spatial_features(x_t, t)
        assert spatial.shape == (2, 32, 4, 4)
        assert torch.allclose(net.features(x_t, t), spatial.mean((2, 3)))
        assert term.logits(Nets(teacher=net, generator=None, critic=net, modules={"disc": head}), x_t, t, None).shape == (2,)
        nets = Nets(teacher=net, generator=None, critic=net)
        cm = GANConfig(discriminator="critic", gan_head="channel_mean")
        cm.name = "test"
        assert torch.allclose(GANTerm(cm, True).logits(nets, x_t, t, None), spatial.mean(1))  # (B, h, w)
    with pytest.raises(ConfigError, match="gan_head=conv needs spatial features.*use objective.gan_head=mlp_pool"):
        term.build(SimpleNamespace(student_init=MLPDenoiser(make_schedule("edm"), 2, hidden=16)))
    with pytest.raises(ConfigError, match="gan_head='patch' is unknown"):
        bad = GANConfig(discriminator="critic", gan_head="patch")
        bad.name = "test"
        GANTerm(bad, True)
    with pytest.raises(ConfigError, match="channel_mean has no parameters"):
        bad = GANConfig(discriminator="teacher", gan_head="channel_mean")
        bad.name = "test"
        GANTerm(bad, True)


class _Seen(Denoiser):
    """A critic whose features are x_t itself; remembers every t it was called at."""

    def __init__(self, sched):
        super().__init__()
        self.schedule, self.feature_dim, self.seen = sched, 2, []
        self.p = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def features(self, x_t, t, cond=None):
        self.seen.append(t.detach().clone())
        return x_t + 0 * self.p


def test_gan_grid_draws_dmd2s_indices_apart_for_real_and_fake():
    """gan_t_dist=grid, gan_t_lo=0, gan_t_hi=1: sigma = DMD2's karras_sigmas[k], k uniform over 0..999 (randint(0,
    diffusion_gan_max_timestep = 1000)), real and fake rows drawn apart (two compute_cls_logits calls); sigma quantiles
    10/50/90 % near the issue's 0.017 / 2.5 / 45. disc_weight scales L_D exactly."""
    edm = make_schedule("edm")
    critic = _Seen(edm)
    n = 20_000
    for disc_weight in (1.0, 1e-2):
        cfg = GANConfig(discriminator="critic", gan_head="channel_mean", gan_t_dist="grid", gan_t_lo=0.0, gan_t_hi=1.0,
                        disc_weight=disc_weight)
        cfg.name = "test"
        nets = Nets(teacher=SimpleNamespace(schedule=edm), generator=None, critic=critic)
        torch.manual_seed(7)
        fake = torch.randn(n, 2, dtype=torch.float64)
        loss, logs = GANTerm(cfg, True).discriminator_loss(nets, fake, Batch(noise=fake, real=fake + 1))
        assert float(loss.detach()) == pytest.approx(disc_weight * float(logs["gan_d"]), rel=1e-12)
    sig = critic.seen[-1]
    lo, hi = SMIN ** (1 / RHO), SMAX ** (1 / RHO)
    k = (sig ** (1 / RHO) - lo) / (hi - lo) * 999
    assert (k - k.round()).abs().max() < 1e-6 and int(k.round().min()) == 0 and int(k.round().max()) == 999
    q = torch.quantile(sig, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    assert 0.012 < float(q[0]) < 0.024 and 2.2 < float(q[1]) < 2.8 and 40 < float(q[2]) < 50
    assert not torch.equal(sig[:n], sig[n:])  # real and fake rows: independent levels


# --- SiDA: the official balance -----------------------------------------------------------------------------------

def _sida_setting(seed=8):
    edm = make_schedule("edm")
    torch.manual_seed(seed)
    critic = MLPDenoiser(edm, 2, hidden=16, depth=2).double()
    teacher = GMMDenoiser(ring(), edm)
    g = torch.Generator().manual_seed(seed)
    x = (0.7 * torch.randn(24, 2, dtype=torch.float64, generator=g)).requires_grad_(True)
    real = ring().sample(24, generator=g)
    return edm, teacher, critic, x, real.to(torch.float64)


def _official_cfg(**kw):
    return SiDAConfig(**{**dict(gan_balance="official", gan_weight=1e-4, gan_start_images=0, gan_head="channel_mean",
                                t_dist="karras", t_lo=0.0, t_hi=0.8), **kw})


def test_sida_official_generator_loss_is_the_official_code():
    """sida_loss.py:25-72 with sida_training_loop.py:401-411 written out (float64, same sigma, noise, networks):
    loss = 0.5 (100 / B) sum SiD / w + 0.5 (0.01 / B) sum D BCE(clamp(D(x_t)), 1) / w, w = mean|x - f_phi| per sample,
    D(x_t) = the critic encoder's channel mean at SiD's x_t. Ours is that divided by 100 D (the constant scale), in
    value and in d/dx; before gan_start_images it is SiD's loss alone."""
    edm, teacher, critic, x, _ = _sida_setting()
    obj = SiDA(_official_cfg(), lambda _, b: x)
    nets = Nets(teacher=teacher, generator=None, critic=critic)
    torch.manual_seed(9)
    ours = obj.generator_loss(nets, Batch(noise=x), step=1)["loss"]
    (g_ours,) = torch.autograd.grad(ours, x)
    torch.manual_seed(9)
    sigma = sample_t(edm, 24, 0.0, 0.8, like=x, dist="karras")[:, None]
    y, n = x, torch.randn_like(x) * sigma
    y_real = teacher(y + n, sigma[:, 0])
    y_fake = critic(y + n, sigma[:, 0])
    y_d = critic.features(y + n, sigma[:, 0]).mean(dim=1, keepdim=True)
    wf = (y - y_real).abs().detach().mean(dim=1, keepdim=True).clip(min=1e-5)
    loss = (y_real - y_fake) * ((y_real - y) - 1.2 * (y_real - y_fake)) / wf
    bce = nn.BCEWithLogitsLoss()(y_d.clamp(-10, 10), torch.ones_like(y_d))
    loss_gan = (bce / wf).mean(dim=1, keepdim=True) * 2
    official = 0.5 * loss.sum() * 100 / 24 + 0.5 * loss_gan.sum() * 0.01 / 24
    (g_official,) = torch.autograd.grad(official, x)
    assert float(ours.detach()) == pytest.approx(float(official.detach()) / 200, rel=1e-10)
    assert torch.allclose(g_ours, g_official / 200, rtol=1e-9, atol=1e-14)
    # the GAN term's weight grows with mean(1/w): its share is 1e-4 BCE mean(1/w) against SiD's
    late = SiDA(_official_cfg(gan_start_images=24), lambda _, b: x)
    torch.manual_seed(9)
    before = late.generator_loss(nets, Batch(noise=x), step=1)
    assert "gan_g" not in before
    torch.manual_seed(9)
    sid_only = (loss.sum() * 100 / 24).detach()
    assert float(before["loss"]) == pytest.approx(float(sid_only) / 200, rel=1e-10)
    torch.manual_seed(9)
    assert "gan_g" in late.generator_loss(nets, Batch(noise=x), step=2)  # 48 images seen > 24


def test_sida_official_generator_clamps_logits_at_10():
    """sida_loss.py:72 clamps the generator's logits to [-10, 10]: rows beyond it give the GAN term no gradient. A
    discriminator with logits 30 x_t[:, 0] (most rows beyond the clamp) against the same formula written out."""
    edm, teacher, critic, x, _ = _sida_setting(12)
    obj = SiDA(_official_cfg(gan_weight=1.0), lambda _, b: x)
    obj.gan.logits = lambda nets, x_t, t, cond: 30 * x_t[:, 0]
    nets = Nets(teacher=teacher, generator=None, critic=critic)
    torch.manual_seed(13)
    out = obj.generator_loss(nets, Batch(noise=x), step=1)
    torch.manual_seed(13)
    t = sample_t(edm, 24, 0.0, 0.8, like=x, dist="karras")
    x_t = x + t[:, None] * torch.randn_like(x)
    logits = 30 * x_t[:, 0]
    assert float((logits.abs() > 10).double().mean()) > 0.5
    assert float(out["gan_g"]) == pytest.approx(float(F.softplus(-logits.clamp(-10, 10)).mean()), rel=1e-12)
    assert float(out["gan_g"]) != pytest.approx(float(F.softplus(-logits).mean()), rel=1e-3)


def test_sida_official_critic_loss_is_the_official_code():
    """sida_loss.py:78-123 with the loop's :364-365 (ls = lsd = 1): sigma ~ exp(-1.2 + 1.2 N), the same sigma and
    noise for x_g and x_real, L = (1/B) sum lambda (f_psi - x_g)^2 + (1/B) sum lambda (BCE(D_real, 1) + BCE(D_fake,
    0)) / 2, lambda = (sigma^2 + 0.25) / (0.5 sigma)^2, unclamped logits; ours is that / D."""
    edm, teacher, critic, x, real = _sida_setting()
    x = x.detach()
    obj = SiDA(_official_cfg(), lambda _, b: x)
    nets = Nets(teacher=teacher, generator=None, critic=critic)
    torch.manual_seed(10)
    ours = obj.critic_loss(nets, Batch(noise=x, real=real), step=0)["loss"]
    torch.manual_seed(10)
    sigma = (torch.randn(24, dtype=torch.float64) * 1.2 - 1.2).exp()[:, None]
    assert float(sigma.min()) > SMIN and float(sigma.max()) < SMAX  # (ours clamps to EDM's range)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    n = torch.randn_like(x) * sigma
    y_fake = critic(x + n, sigma[:, 0])
    logit_fake = critic.features(x + n, sigma[:, 0]).mean(dim=1, keepdim=True)
    logit_real = critic.features(real + n, sigma[:, 0]).mean(dim=1, keepdim=True)
    bce = nn.BCEWithLogitsLoss()
    loss_d = weight * (bce(logit_real, torch.ones_like(logit_real)) + bce(logit_fake, torch.zeros_like(logit_fake))) / 2
    official = (weight * (y_fake - x) ** 2).sum() / 24 + loss_d.sum() / 24
    assert float(ours) == pytest.approx(float(official) / 2, rel=1e-10)
    g_ours = torch.autograd.grad(ours, list(critic.parameters()))
    g_official = torch.autograd.grad(official, list(critic.parameters()))
    for a, b in zip(g_ours, g_official):
        assert torch.allclose(a, b / 2, rtol=1e-8, atol=1e-13)


def test_sida_constant_balance_is_unchanged_and_bad_values_fail():
    """gan_balance=constant (the default) is SiD + gan_weight L_G at the GAN's own t, as before; the official one
    needs an unguided critic; unknown names fail at construction."""
    assert SiDAConfig().gan_balance == "constant" and SiDAConfig().gan_start_images == 0
    with pytest.raises(ConfigError, match="gan_balance='paper' is unknown"):
        SiDA(SiDAConfig(gan_balance="paper"), None)
    with pytest.raises(ConfigError, match="unguided critic|fake_guidance=1"):
        SiDA(SiDAConfig(gan_balance="official", fake_guidance=0.5), None)
    obj = SiDA(SiDAConfig(), None)
    obj.set_run({}, images_per_step=100)
    assert not obj.gan_on(0, 4) and obj.gan_on(1, 4)  # the trainer's global batch, not this process's rows


# --- SIM: c_units, normalize --------------------------------------------------------------------------------------

def test_sim_c_units_and_normalizer():
    """c_units=score: d on y = s_p - s_q = (a / s^2)(mu_p - mu_q) with a constant c (the paper's notation), i.e. the
    x0-unit c(t) = c s^2 / a; x0 keeps c constant on mu_p - mu_q. normalize=false drops the 1 / mean|x - mu_p|
    weight. Hand-written per-sample terms on the same x_t (EDM, a = 1, s = sigma)."""
    edm = make_schedule("edm")
    real, fake = _pair(edm)
    g = torch.Generator().manual_seed(11)
    x = 0.6 * torch.randn(40, 2, dtype=torch.float64, generator=g)
    eps = torch.randn(40, 2, dtype=torch.float64, generator=g)
    t = sample_t(edm, 40, 0.02, 0.98)
    x_t, _ = noised(edm, x, t, eps)
    mu_p, mu_q = real.x0(x_t, t), fake.x0(x_t, t)
    c = 0.05 * math.sqrt(2)
    w = (x - mu_p).abs().mean(1)

    def per(direction):
        return (direction * (mu_q - x)).mean(1)

    y_score = (mu_p - mu_q) / t[:, None] ** 2
    d_score = y_score / torch.sqrt(y_score.pow(2).sum(1, keepdim=True) + c**2)
    d_x0 = (mu_p - mu_q) / torch.sqrt((mu_p - mu_q).pow(2).sum(1, keepdim=True) + c**2)
    cases = {("score", True): (per(d_score) / w).mean(), ("x0", True): (per(d_x0) / w).mean(),
             ("score", False): per(d_score).mean(), ("x0", False): per(d_x0).mean()}
    for (units, normalize), want in cases.items():
        got, _ = sim_loss(real, fake, x, c_units=units, normalize=normalize, t=t, eps=eps)
        assert float(got) == pytest.approx(float(want), rel=1e-10), (units, normalize)
    assert float(cases[("score", True)]) != pytest.approx(float(cases[("x0", True)]), rel=1e-2)
    l2 = [sim_loss(real, fake, x, distance="l2", c_units=u, t=t, eps=eps)[0] for u in ("x0", "score")]
    assert float(l2[0]) == float(l2[1])  # no c in l2


# --- the experiments' defaults and the help text -------------------------------------------------------------------

@pytest.mark.parametrize("experiment, want", [
    ("sd21_vsd", {"weighting": "sigma2", "t_dist": "grid", "fake_guidance": None, "critic_weighting": "alpha2_eps",
                  "critic_t_dist": "grid", "critic_label_dropout": 0.1}),
    ("sd15_dmd2", {"gan_head": "conv", "gan_t_dist": "grid", "gan_t_lo": 0.0, "gan_t_hi": 1.0, "disc_weight": 1e-2}),
    ("sdxl_dmd2_4step", {"gan_head": "conv", "gan_t_dist": "grid", "gan_weight": 5e-3, "disc_weight": 1e-2}),
    ("grid25_dmd2", {"gan_head": "mlp_pool", "gan_t_dist": "grid", "disc_weight": 1e-2}),
    ("grid25_vsd", {"weighting": "sigma2"}),
    ("grid25_sida", {"gan_balance": "official", "gan_weight": 1e-4, "gan_start_images": 200000,
                     "gan_head": "channel_mean", "t_dist": "karras", "t_hi": 0.8}),
    # CI-measured experiments keep the previous recipe (results/recipes_gmm.md compares both)
    ("gmm_vsd", {"weighting": "x0", "fake_guidance": 1.0, "critic_weighting": "edm"}),
    ("gmm_sida", {"gan_balance": "constant", "gan_head": "mlp_pool", "gan_weight": 0.01}),
    ("gmm_sim", {"c_units": "x0", "normalize": True}),
])
def test_experiment_recipes(experiment, want):
    obj = compose([f"experiment={experiment}"]).objective
    assert {k: obj[k] for k in want} == want


def test_recipe_options_are_documented_with_their_source():
    vsd, gan, sida, sim = field_docs(VSDConfig), field_docs(GANConfig), field_docs(SiDAConfig), field_docs(SIMConfig)
    assert all("train_swiftbrush.py" in vsd[k] for k in ("weighting", "t_dist", "fake_guidance", "critic_weighting",
                                                           "critic_t_dist", "critic_label_dropout"))
    assert "sd_guidance.py" in gan["gan_t_dist"] and "adversarial.py" in gan["gan_head"]
    assert "sh:" in gan["disc_weight"] and "sh:" in gan["gan_weight"]
    assert "sida_loss.py" in sida["gan_balance"] and "sida_training_loop.py" in sida["gan_start_images"]
    assert "SIM" in sim["c_units"] and "divergence" in sim["normalize"]
