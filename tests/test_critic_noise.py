"""The critic's (fake score's) DSM noise levels, ``objective.critic_t_dist`` (onestep.core.dsm_t), against float64
transcriptions of the official codes' draws with the same seeds:

    grid       DMD2's fake-score update: sigma = karras_sigmas[randint(0, 1000)] (tianweiy/DMD2
               main/edm/edm_guidance.py:9-15, :61-66, :138-145), loss mean((1/sigma^2 + 1/sigma_d^2) (D - x)^2) (:153-160)
    lognormal  SiD's fake-score update: sigma = exp(-1.2 + 1.2 N) (mingyuanzhou/SiD training/sid_loss.py:18, :59-61)
    grid in [critic_t_lo, critic_t_hi]   SiD-LSG's: timesteps randint(20, 980) (mingyuanzhou/SiD-LSG
               training/sid_training_loop.py:413)
    unit       the previous draw, still every objective's default
"""

from __future__ import annotations

import pytest
import torch

from conftest import compose
from onestep.core import Batch, Nets, dsm_loss, dsm_t, sample_t
from onestep.denoisers.gmm import GMMDenoiser, ring
from onestep.denoisers.nets import MLPDenoiser
from onestep.errors import ConfigError
from onestep.help import field_docs
from onestep.objectives.dmd2 import DMD2, DMD2Config
from onestep.objectives.rcm import RCM, RCMConfig
from onestep.objectives.sid import SiD, SiDConfig
from onestep.objectives.sida import SiDA, SiDAConfig
from onestep.schedules import make_schedule

SMIN, SMAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5


def dmd2_karras_sigmas(n: int = 1000) -> torch.Tensor:
    """edm_guidance.py:9-15 (get_sigmas_karras, largest first) flipped as :61-66 does: index 0 is sigma_min."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = SMIN ** (1 / RHO), SMAX ** (1 / RHO)
    return torch.flip((hi + ramp * (lo - hi)) ** RHO, dims=[0])


def sid_sigma(n: int) -> torch.Tensor:
    """sid_loss.py:59-60: rnd_normal = randn(n); sigma = (rnd_normal * P_std + P_mean).exp(), P = (-1.2, 1.2) (:18)."""
    rnd_normal = torch.randn(n, dtype=torch.float64)
    return (rnd_normal * 1.2 + -1.2).exp()


def _critic_setting(seed: int = 0):
    edm = make_schedule("edm")
    torch.manual_seed(seed)
    critic = MLPDenoiser(edm, 2, hidden=16, depth=2).double()
    x = 0.7 * torch.randn(32, 2, dtype=torch.float64)
    return edm, Nets(teacher=GMMDenoiser(ring(), edm), generator=None, critic=critic), x


def test_grid_is_dmd2s_fake_score_draw_and_loss():
    """On EDM, critic_t_dist=grid draws DMD2's karras_sigmas[randint(0, 1000)] (every index 0..999, the same numbers
    for the same seed) and the critic loss is compute_loss_fake's mean((snr + 1/sigma_d^2) (D(x + sigma n) - x)^2)."""
    edm, nets, x = _critic_setting()
    obj = DMD2(DMD2Config(critic_t_dist="grid"), lambda _, b: x)
    torch.manual_seed(3)
    got = obj.critic_t(nets, torch.zeros(100_000, 2, dtype=torch.float64))
    torch.manual_seed(3)
    timesteps = torch.randint(0, 1000, [100_000])
    want = dmd2_karras_sigmas()[timesteps]
    assert torch.allclose(got, want, rtol=1e-12)
    assert set(timesteps.tolist()) == set(range(1000))
    assert 2.4 < float(got.median()) < 2.7  # the 2.53, against 0.40 for unit

    torch.manual_seed(4)
    ours = obj.critic_loss(nets, Batch(noise=x), step=0)["dsm"]
    torch.manual_seed(4)  # ours draws the timesteps before the noise, the official code after: the same distribution
    sigma = dmd2_karras_sigmas()[torch.randint(0, 1000, [32])][:, None]
    noise = torch.randn_like(x)
    weights = sigma**-2 + 1.0 / SIGMA_DATA**2
    official = torch.mean(weights * (nets.critic(x + sigma * noise, sigma[:, 0]) - x) ** 2)
    assert float(ours.detach()) == pytest.approx(float(official.detach()), rel=1e-10)


def test_grid_range_is_sid_lsgs_fake_score_timesteps():
    """SiD-LSG's fake-score update draws timesteps = randint(tmin=20, tmax=980) (mingyuanzhou/SiD-LSG
    training/sid_training_loop.py:172-173, :413): critic_t_dist=grid with critic_t_lo 0.02, critic_t_hi 0.979 on SD's
    table gives the same integers for the same seed."""
    sd = make_schedule("vp_discrete")
    obj = SiD(SiDConfig(critic_t_dist="grid", critic_t_lo=0.02, critic_t_hi=0.979), None)
    nets = Nets(teacher=None, generator=None, critic=GMMDenoiser(ring(), sd))
    torch.manual_seed(12)
    got = sd.index(obj.critic_t(nets, torch.zeros(50_000, 2, dtype=torch.float64)))
    torch.manual_seed(12)
    timesteps = torch.randint(20, 980, (50_000,), dtype=torch.long)
    assert torch.equal(got.round().long(), timesteps) and (got - got.round()).abs().max() < 1e-9
    with pytest.raises(ConfigError, match="critic_t_lo=0.5, objective.critic_t_hi=0.2 must satisfy"):
        SiD(SiDConfig(critic_t_lo=0.5, critic_t_hi=0.2), None)


def test_lognormal_is_sids_fake_score_draw_and_loss():
    """On EDM, critic_t_dist=lognormal draws SiD's sigma = exp(-1.2 + 1.2 N) (clamped to EDM's 0.002..80, which
    ~1e-5 of the draws leave) and the critic loss is SID_EDMLoss.__call__'s weight (D(y + n) - y)^2, mean."""
    edm, nets, x = _critic_setting(1)
    obj = SiD(SiDConfig(critic_t_dist="lognormal"), lambda _, b: x)
    torch.manual_seed(5)
    got = obj.critic_t(nets, torch.zeros(200_000, 2, dtype=torch.float64))
    torch.manual_seed(5)
    want = sid_sigma(200_000)
    inside = (want > SMIN) & (want < SMAX)
    assert torch.allclose(got[inside], want[inside], rtol=1e-12)
    assert torch.equal(got[~inside], want[~inside].clamp(SMIN, SMAX))
    assert abs(float(got.median()) - 0.301) < 0.005  # exp(-1.2)

    torch.manual_seed(6)
    ours = obj.critic_loss(nets, Batch(noise=x), step=0)["dsm"]
    torch.manual_seed(6)
    sigma = sid_sigma(32)[:, None]
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    n = torch.randn_like(x) * sigma
    official = (weight * (nets.critic(x + n, sigma[:, 0]) - x) ** 2).mean()
    assert float(ours.detach()) == pytest.approx(float(official.detach()), rel=1e-10)


@pytest.mark.parametrize("schedule", ["vp_cosine", "vp_linear", "rectified_flow"])
def test_lognormal_on_other_schedules_matches_sigma_by_snr(schedule):
    """On a VP or flow teacher the lognormal draw is the t whose sigma_t / alpha_t is SiD's sigma (the same SNR)."""
    sched = make_schedule(schedule)
    torch.manual_seed(7)
    t = dsm_t(sched, 20_000, "lognormal")
    torch.manual_seed(7)
    want = sid_sigma(20_000)
    ends = sched.sigma(torch.tensor([sched.t_min, sched.t_max], dtype=torch.float64))
    ends = ends / sched.alpha(torch.tensor([sched.t_min, sched.t_max], dtype=torch.float64))
    inside = (want > ends[0] * 1.001) & (want < ends[1] * 0.999)
    assert float(inside.double().mean()) > 0.95
    assert torch.allclose((sched.sigma(t) / sched.alpha(t))[inside], want[inside], rtol=1e-9)


def test_unit_is_the_previous_draw_for_every_critic():
    """The default keeps dsm_loss's own draw: DMD2's critic loss and rCM's equal dsm_loss at the same seed."""
    edm, nets, x = _critic_setting(2)
    for obj in (DMD2(DMD2Config(), lambda _, b: x), SiD(SiDConfig(), lambda _, b: x)):
        assert obj.critic_t(nets, x) is None
    rcm = RCM(RCMConfig(), lambda _, b: x)
    torch.manual_seed(8)
    ours = rcm.critic_loss(nets, Batch(noise=x), step=0)["loss"]
    torch.manual_seed(8)
    assert float(ours.detach()) == float(dsm_loss(nets.critic, x, weighting="edm").detach())
    torch.manual_seed(8)
    unit = dsm_t(edm, 32, "unit", like=x)
    torch.manual_seed(8)
    assert torch.equal(unit, sample_t(edm, 32, like=x))


def test_rcm_and_sida_read_critic_t_dist():
    """rCM's critic (its own critic_loss) draws by critic_t_dist too; SiDA's lognormal reads disc_p_mean / disc_p_std."""
    edm, nets, x = _critic_setting(3)
    rcm = RCM(RCMConfig(critic_t_dist="lognormal"), lambda _, b: x)
    torch.manual_seed(9)
    ours = rcm.critic_loss(nets, Batch(noise=x), step=0)["loss"]
    torch.manual_seed(9)
    sigma = sid_sigma(32)[:, None]
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    n = torch.randn_like(x) * sigma
    official = (weight * (nets.critic(x + n, sigma[:, 0]) - x) ** 2).mean()
    assert float(ours.detach()) == pytest.approx(float(official.detach()), rel=1e-10)
    sida = SiDA(SiDAConfig(critic_t_dist="lognormal", disc_p_mean=0.5, disc_p_std=0.1), None)
    torch.manual_seed(10)
    got = sida.critic_t(nets, x)
    torch.manual_seed(10)
    assert torch.allclose(got, (0.5 + 0.1 * torch.randn(32, dtype=torch.float64)).exp(), rtol=1e-12)


def test_bad_critic_t_dist_fails_at_construction():
    for make in (lambda: DMD2(DMD2Config(critic_t_dist="karras"), None),
                 lambda: SiD(SiDConfig(critic_t_dist="log_uniform"), None),
                 lambda: RCM(RCMConfig(critic_t_dist="normal"), None)):
        with pytest.raises(ConfigError, match="critic_t_dist='.*' is unknown; choose one of"):
            make()
    with pytest.raises(ConfigError, match="gan_balance=official draws the critic's sigma"):
        SiDA(SiDAConfig(gan_balance="official", gan_weight=1e-4, critic_t_dist="grid"), None)


@pytest.mark.parametrize("experiment, want", [
    ("grid25_dmd2", "grid"), ("sd15_dmd2", "grid"), ("sdxl_dmd2_4step", "grid"),
    ("grid25_sid", "lognormal"), ("grid25_sida", "lognormal"), ("sd15_sid_lsg", "grid"), ("sd3_sid", "grid"),
    # CI-measured experiments keep the previous draw (their shipped figures were measured with it)
    ("gmm_dmd2", "unit"), ("gmm_sid", "unit"), ("gmm_sida", "unit"), ("digits_dmd2", "unit"),
])
def test_paper_experiments_use_the_official_critic_draw(experiment, want):
    assert compose([f"experiment={experiment}"]).objective.critic_t_dist == want


def test_critic_t_dist_is_documented_with_its_sources():
    doc = field_docs(DMD2Config)["critic_t_dist"]
    assert "edm_guidance.py:138-145" in doc and "sid_loss.py:59-60" in doc
