"""The objective suite against closed forms (float64).

Setting shared by the gradient tests: data p = N(mu, s^2 I), generator x = a + b z (z ~ N(0, I), parameters a in
R^D and scalar b), exact fake score q = N(a, b^2 I) (the critic is the closed form at the *current* a, b and
holds no parameters, as a converged critic would). At a given (t, eps), x_t = A x + S eps (A = alpha_t,
S = sigma_t) and a Gaussian N(m, c^2 I) has the affine posterior mean
    mu_c(x_t) = m + k_c (x_t - A m),   k_c = A c^2 / (A^2 c^2 + S^2),
so d mu_p / dx = A k_p I and d mu_q / dx = A k_q I (the critic's mean m = a is a constant of the critic).
Each test writes the derivative dL/dx of the objective's per-sample loss in these terms, and the chain rule
gives the (a, b) gradient: dL/da = sum_i dL/dx_i, dL/db = sum_i z_i . dL/dx_i. The objective's own
autograd gradient must match to 1e-5 (relative).
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from onestep.denoisers.base import Denoiser
from onestep.denoisers.gmm import GaussianMixture, GMMDenoiser
from onestep.denoisers.nets import MLPDenoiser
from onestep.errors import ConfigError
from onestep.objectives.adversarial import GANConfig, GANTerm, Head
from onestep.core import Nets
from onestep.objectives.distribution_matching import dmd_loss
from onestep.objectives.fdistill import F_OF, H, f_weights, fdistill_gradient, normalize_per_bin
from onestep.objectives.distribution_matching import surrogate_loss
from onestep.objectives.sid import sid_loss
from onestep.objectives.sim import sim_loss
from onestep.objectives.vsd import vsd_gradient
from onestep.schedules import make_schedule

N, D = 64, 2
MU, S_DATA = torch.tensor([0.3, -0.2], dtype=torch.float64), 0.7


def gaussian(mean, std):
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, D)
    return GaussianMixture(mean, (std**2) * torch.eye(D, dtype=torch.float64)[None], [1.0])


class Setting:
    """Everything a closed-form check needs at fixed (t, eps, z)."""

    def __init__(self, schedule="edm", seed=0):
        g = torch.Generator().manual_seed(seed)
        self.sched = make_schedule(schedule)
        self.a = torch.tensor([1.0, 0.4], dtype=torch.float64, requires_grad=True)
        self.b = torch.tensor(0.35, dtype=torch.float64, requires_grad=True)
        self.z = torch.randn(N, D, generator=g, dtype=torch.float64)
        self.eps = torch.randn(N, D, generator=g, dtype=torch.float64)
        self.u = 0.05 + 0.9 * torch.rand(N, generator=g, dtype=torch.float64)
        self.t = self.sched.t_from_unit(self.u)
        self.real = GMMDenoiser(gaussian(MU, S_DATA), self.sched)
        self.fake = GMMDenoiser(gaussian(self.a.detach(), float(self.b.detach())), self.sched)
        # closed-form pieces
        A, S = self.sched.alpha(self.t)[:, None], self.sched.sigma(self.t)[:, None]
        self.A, self.S = A, S
        a, b = self.a.detach(), self.b.detach()
        self.x = a + b * self.z
        x_t = A * self.x + S * self.eps
        self.k_p = A * S_DATA**2 / (A**2 * S_DATA**2 + S**2)
        self.k_q = A * b**2 / (A**2 * b**2 + S**2)
        self.mu_p = MU + self.k_p * (x_t - A * MU)
        self.mu_q = a + self.k_q * (x_t - A * a)
        self.norm = (self.x - self.mu_p).abs().mean(1, keepdim=True)  # DMD eq. (8) normalizer

    def generated(self):
        return self.a + self.b * self.z

    def autograd(self, loss):
        return torch.autograd.grad(loss, (self.a, self.b), retain_graph=True)

    def chain(self, dl_dx):
        return dl_dx.sum(0), (dl_dx * self.z).sum()

    def check(self, loss, dl_dx):
        got_a, got_b = self.autograd(loss)
        want_a, want_b = self.chain(dl_dx)
        assert torch.allclose(got_a, want_a, rtol=1e-5, atol=1e-12), (got_a, want_a)
        assert torch.allclose(got_b, want_b, rtol=1e-5, atol=1e-12), (got_b, want_b)


@pytest.mark.parametrize("schedule", ["edm", "vp_linear"])
def test_dmd_gradient_closed_form(schedule):
    """DMD / DMD2 (eq. 7-8): dL/dx = (mu_q - mu_p) / mean|x - mu_p| / (N D) (the surrogate's mean)."""
    s = Setting(schedule)
    loss, _ = dmd_loss(s.real, s.fake, s.generated(), t=s.t, eps=s.eps)
    s.check(loss, (s.mu_q - s.mu_p) / s.norm / (N * D))


def test_dmd_regression_closed_form():
    """DMD eq. (9) on pairs (z_j, y_j = mu + s z_j, the exact ODE map of N(mu, s^2 I)): with pair indices j_i,
    L = mean_i,d (a + b z_j - y_j)^2, so dL/da = 2 sum (x_j - y_j) / (N D), dL/db = 2 sum z_j (x_j - y_j) / (N D)."""
    from onestep.core import Batch
    from onestep.objectives.regression import TeacherPairs

    s = Setting()
    pool = TeacherPairs(count=N, steps=1)
    pool.pairs = {"noise": s.z, "sample": MU + S_DATA * s.z}
    nets = Nets(teacher=s.real, generator=None)
    torch.manual_seed(3)
    loss = pool.loss(nets, Batch(noise=torch.zeros(N, D, dtype=torch.float64)), lambda _, b: s.a + s.b * b.noise)
    torch.manual_seed(3)
    j = torch.randint(0, N, (N,))
    zj = s.z[j]
    r = s.a.detach() + s.b.detach() * zj - (MU + S_DATA * zj)
    got_a, got_b = s.autograd(loss)
    assert torch.allclose(got_a, 2 * r.sum(0) / (N * D), rtol=1e-5)
    assert torch.allclose(got_b, 2 * (r * zj).sum() / (N * D), rtol=1e-5)


def test_dmd_pairs_are_the_teacher_ode_map():
    """The pool built by make_pairs solves the teacher's ODE: for N(mu, s^2 I) data its exact map is mu + s z
    (up to the discretization and the prior starting at sigma_max z instead of N(mu, s^2 + sigma_max^2))."""
    from onestep.objectives.regression import make_pairs

    real = GMMDenoiser(gaussian(MU, S_DATA), make_schedule("edm"))
    p = make_pairs(real, 256, steps=256)
    assert torch.allclose(p["sample"], (MU + S_DATA * p["noise"]).to(p["sample"]), rtol=3e-2, atol=1e-2)


def test_dmd_pairs_file_is_cached_and_checked(tmp_path):
    """pairs_file: built and written at first use, loaded (not rebuilt) afterwards, refused for another shape."""
    from onestep.objectives.regression import TeacherPairs

    real = GMMDenoiser(gaussian(MU, S_DATA), make_schedule("edm"))
    path = tmp_path / "pairs.safetensors"
    first = TeacherPairs(16, 4, str(path)).get(real, torch.device("cpu"))
    assert path.exists()
    again = TeacherPairs(16, 4, str(path))
    again.count = 999  # a rebuild would make 999 pairs
    loaded = again.get(real, torch.device("cpu"))
    assert loaded["sample"].shape[0] == 16 and torch.equal(loaded["sample"], first["sample"])
    other = GMMDenoiser(GaussianMixture(torch.zeros(1, 3), torch.eye(3)[None], [1.0]), make_schedule("edm"))
    with pytest.raises(ConfigError, match="pairs_file"):
        TeacherPairs(16, 4, str(path)).get(other, torch.device("cpu"))


@pytest.mark.parametrize("weighting", ["x0", "eps"])
def test_vsd_gradient_closed_form(weighting):
    """VSD (ProlificDreamer eq. 9): w(t)(eps_p - eps_q) = (A/S)(mu_q - mu_p) w(t); w = S/A ("x0") or 1 ("eps")."""
    s = Setting()
    x = s.generated()
    grad = vsd_gradient(s.real, s.fake, x, weighting=weighting, t=s.t, eps=s.eps)
    g = s.mu_q - s.mu_p
    if weighting == "eps":
        g = g * s.A / s.S
    s.check(surrogate_loss(x, grad), g / (N * D))


@pytest.mark.parametrize("alpha", [1.2, 1.0, 0.0])
def test_sid_gradient_closed_form(alpha):
    """SiD: l = [(1-al)|d|^2 + d.(mu_q - x)] / (D n), d = mu_p - mu_q, n = sg(mean|x - mu_p|). With
    dd/dx = A (k_p - k_q) =: c and dmu_q/dx = A k_q (gradients through both denoisers):
    dl/dx = [2 (1-al) c d + c (mu_q - x) + (A k_q - 1) d] / (D n), averaged over the batch."""
    s = Setting()
    loss, _ = sid_loss(s.real, s.fake, s.generated(), alpha=alpha, t=s.t, eps=s.eps)
    d, c = s.mu_p - s.mu_q, s.A * (s.k_p - s.k_q)
    dl = (2 * (1 - alpha) * c * d + c * (s.mu_q - s.x) + (s.A * s.k_q - 1) * d) / (D * s.norm)
    s.check(loss, dl / N)


@pytest.mark.parametrize("distance", ["l2", "pseudo_huber"])
def test_sim_gradient_closed_form(distance):
    """SIM: l = d'(y).(mu_q - x) / (D n), y = mu_p - mu_q. l2: d' = 2y; pseudo-Huber: d' = y / rho,
    rho = sqrt(|y|^2 + C^2), C = c sqrt(D), whose Jacobian in x is c_y (I / rho - y y^T / rho^3), c_y = A (k_p - k_q):
    dl/dx = [J^T (mu_q - x) + (A k_q - 1) d'(y)] / (D n)."""
    s = Setting()
    hc = 0.05
    loss, _ = sim_loss(s.real, s.fake, s.generated(), distance=distance, huber_c=hc, t=s.t, eps=s.eps)
    y, cy, r = s.mu_p - s.mu_q, s.A * (s.k_p - s.k_q), s.mu_q - s.x
    if distance == "l2":
        dl = 2 * cy * r + (s.A * s.k_q - 1) * 2 * y
    else:
        rho = torch.sqrt((y**2).sum(1, keepdim=True) + hc**2 * D)
        dl = cy * (r / rho - y * (y * r).sum(1, keepdim=True) / rho**3) + (s.A * s.k_q - 1) * y / rho
    s.check(loss, dl / (D * s.norm) / N)


def test_sim_l2_is_twice_sid_at_alpha_one():
    s = Setting()
    a, _ = sim_loss(s.real, s.fake, s.x, distance="l2", t=s.t, eps=s.eps)
    b, _ = sid_loss(s.real, s.fake, s.x, alpha=1.0, t=s.t, eps=s.eps)
    assert torch.allclose(a, 2 * b, rtol=1e-12)


@pytest.mark.parametrize("divergence", sorted(H))
def test_fdistill_gradient_closed_form(divergence):
    """f-distill: g = h(r) / mean_bin(h) (mu_q - mu_p) / n with the exact log r = log p_t(x_t) - log q_t(x_t),
    p_t = N(A mu, (A^2 s^2 + S^2) I), q_t = N(A a, (A^2 b^2 + S^2) I); 4 time bins over u in [0.05, 0.95]."""
    s = Setting()
    x = s.generated()

    def exact_logit(x_t, t):
        return s.real.mixture.log_prob(x_t, t, s.sched) - s.fake.mixture.log_prob(x_t, t, s.sched)

    grad, _ = fdistill_gradient(s.real, s.fake, x, exact_logit, divergence=divergence, log_ratio_clamp=4.0,
                                time_bins=4, lo=0.05, hi=0.95, u=s.u, eps=s.eps)
    x_t = s.A * s.x + s.S * s.eps

    def log_normal(m, c):
        var = s.A**2 * c**2 + s.S**2
        return (-0.5 * ((x_t - s.A * m) ** 2 / var + torch.log(2 * math.pi * var))).sum(1)

    r = (log_normal(MU, S_DATA) - log_normal(s.a.detach(), float(s.b.detach()))).clamp(-4, 4).exp()
    h = {"reverse_kl": torch.ones_like(r), "forward_kl": r, "js": r / (r + 1), "hellinger": r.sqrt() / 2,
         "jeffreys": r + 1, "pearson": 2 * r**2, "neyman": 2 / r}[divergence]
    bins = ((s.u - 0.05) / 0.9 * 4).long()
    means = torch.stack([h[bins == k].mean() for k in range(4)])
    g = (h / means[bins])[:, None] * (s.mu_q - s.mu_p) / s.norm
    s.check(surrogate_loss(x, grad), g / (N * D))


def test_fdistill_weights_match_table():
    """h(r) for given logits equals the table exactly, equals r^2 f''(r) of each f, and the ratio is clamped."""
    logits = torch.tensor([-7.0, -2.0, -0.5, 0.0, 0.7, 3.0, 9.0], dtype=torch.float64)
    r = torch.tensor([math.exp(max(-5.0, min(5.0, v))) for v in logits.tolist()], dtype=torch.float64)
    table = {"reverse_kl": [1.0] * 7, "forward_kl": [v for v in r.tolist()],
             "js": [v / (v + 1) for v in r.tolist()], "hellinger": [math.sqrt(v) / 2 for v in r.tolist()],
             "jeffreys": [v + 1 for v in r.tolist()], "pearson": [2 * v * v for v in r.tolist()],
             "neyman": [2 / v for v in r.tolist()]}
    assert set(table) == set(H)
    for name, want in table.items():
        got = f_weights(logits, name, log_ratio_clamp=5.0)
        assert got.tolist() == pytest.approx(want, rel=1e-12, abs=0), name
        # h = r^2 f''(r) by double autograd of f
        rr = r.clone().requires_grad_(True)
        (d1,) = torch.autograd.grad(F_OF[name](rr).sum(), rr, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), rr)
        assert torch.allclose(r**2 * d2, got, rtol=1e-9), name
        assert float(F_OF[name](torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(0.0, abs=1e-15), name
    with pytest.raises(ConfigError, match="divergence"):
        f_weights(logits, "kl", 5.0)


def test_time_bin_normalization():
    h = torch.tensor([1.0, 3.0, 10.0, 30.0, 5.0], dtype=torch.float64)
    bins = torch.tensor([0, 0, 1, 1, 3])
    out = normalize_per_bin(h, bins, 4)
    assert out.tolist() == pytest.approx([0.5, 1.5, 0.5, 1.5, 1.0])
    assert normalize_per_bin(h, bins, 4, max_weight=1.2).tolist() == pytest.approx([0.5, 1.2, 0.5, 1.2, 1.0])


def _bin_worker(rank, world, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    h = torch.tensor([[1.0, 3.0, 4.0], [5.0, 7.0, 2.0]], dtype=torch.float64)[rank]
    bins = torch.tensor([[0, 0, 1], [0, 1, 1]])[rank]
    out = normalize_per_bin(h, bins, 2)
    # bin 0 holds 1, 3, 5 (mean 3); bin 1 holds 4, 7, 2 (mean 13/3) across both ranks
    want = torch.tensor([[1 / 3, 1.0, 12 / 13], [5 / 3, 21 / 13, 6 / 13]], dtype=torch.float64)[rank]
    assert torch.allclose(out, want), (rank, out, want)
    dist.destroy_process_group()


@pytest.mark.slow
def test_time_bin_normalization_all_reduces_across_processes(tmp_path):
    """Two gloo processes: each bin's mean is taken over both processes' samples (~10-20 s: process start-up)."""
    torch.multiprocessing.spawn(_bin_worker, args=(2, str(tmp_path / "rdzv")), nprocs=2, join=True)


class LinearFeatures(Denoiser):
    """features(x_t) = x_t: with a linear head the discriminator logit is w.x_t + c in closed form."""

    def __init__(self, sched):
        super().__init__()
        self.schedule, self.data_shape, self.feature_dim = sched, (D,), D
        self.p = torch.nn.Parameter(torch.zeros(()))

    def features(self, x_t, t, cond=None):
        return x_t + 0 * self.p


@pytest.mark.parametrize("kind", ["critic", "teacher"])
def test_gan_generator_gradient_closed_form(kind):
    """Non-saturating L_G = lam mean softplus(-(w.x_t + c)): dL/dx = -lam sigmoid(-(w.x_t + c)) A w / N.
    Head on the critic's features (DMD2, SiDA) or on a frozen teacher copy (LADD)."""
    s = Setting()
    net = LinearFeatures(s.sched).double()
    cfg = GANConfig(discriminator=kind, gan_weight=0.3, gan_t_lo=0.1, gan_t_hi=0.9)
    cfg.name = "test"
    term = GANTerm(cfg, has_critic=True)
    head = term.build(SimpleNamespace(student_init=net))["disc"][0].double()  # LADD: holds a frozen copy of net
    head.mlp = torch.nn.Linear(D, 1).double()
    nets = Nets(teacher=s.real, generator=None, critic=net, modules={"disc": head})
    torch.manual_seed(5)
    loss, _ = term.generator_loss(nets, s.generated(), None)
    torch.manual_seed(5)
    u = 0.1 + 0.8 * torch.rand(N, dtype=torch.float64)
    t = s.sched.t_from_unit(u)
    eps = torch.randn(N, D, dtype=torch.float64)
    A, S = s.sched.alpha(t)[:, None], s.sched.sigma(t)[:, None]
    w, c = head.mlp.weight.detach()[0], head.mlp.bias.detach()[0]
    logit = ((A * s.x + S * eps) * w).sum(1, keepdim=True) + c
    s.check(loss, -0.3 * torch.sigmoid(-logit) * A * w / N)
    # the critic and head take no gradient from the generator loss, and stay trainable
    loss.backward()
    assert net.p.grad is None and head.mlp.weight.grad is None and s.a.grad is not None
    assert net.p.requires_grad and head.mlp.weight.requires_grad


def test_gan_discriminator_loss_closed_form():
    """L_D = mean softplus(-D(real_t)) + mean softplus(D(fake_t)) with the same t for both halves."""
    s = Setting()
    net = LinearFeatures(s.sched).double()
    cfg = GANConfig(discriminator="critic", disc_weight=2.0)
    cfg.name = "test"
    head = Head(D, 4).double()
    head.mlp = torch.nn.Linear(D, 1).double()
    nets = Nets(teacher=s.real, generator=None, critic=net, modules={"disc": head})
    from onestep.core import Batch

    real = MU + S_DATA * torch.randn(N, D, dtype=torch.float64)
    torch.manual_seed(9)
    loss, _ = GANTerm(cfg, True).discriminator_loss(nets, s.x, Batch(noise=s.z, real=real))
    torch.manual_seed(9)
    t = s.sched.t_from_unit(0.02 + 0.96 * torch.rand(2 * N, dtype=torch.float64))
    eps = torch.randn(2 * N, D, dtype=torch.float64)
    x_t = s.sched.alpha(t)[:, None] * torch.cat([real, s.x]) + s.sched.sigma(t)[:, None] * eps
    logit = head.mlp(x_t).squeeze(-1).detach()
    want = 2.0 * (F.softplus(-logit[:N]).mean() + F.softplus(logit[N:]).mean())
    assert torch.allclose(loss.detach(), want, rtol=1e-12)


def test_score_losses_leave_no_gradient_on_the_critic():
    """SiD / SIM back-propagate through the critic to x, but the critic's parameters get no .grad."""
    sched = make_schedule("edm")
    critic = MLPDenoiser(sched, D, hidden=16, depth=1).double()
    real = GMMDenoiser(gaussian(MU, S_DATA), sched)
    x = torch.randn(8, D, dtype=torch.float64, requires_grad=True)
    for fn in (sid_loss, sim_loss):
        loss, _ = fn(real, critic, x)
        loss.backward()
        assert all(p.grad is None for p in critic.parameters()) and x.grad is not None
        assert all(p.requires_grad for p in critic.parameters())


def _compose(*overrides):
    from hydra import compose, initialize_config_module

    import onestep.config  # noqa: F401
    import onestep.objectives  # noqa: F401

    with initialize_config_module("onestep.configs", version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("overrides,match", [
    (["objective=sid", "objective.alpha=2.0"], "alpha"),
    (["objective=sid", "objective.alpha=-0.1"], "alpha"),
    (["objective=fdistill", "objective.divergence=kl"], "divergence"),
    (["objective=fdistill", "objective.discriminator=none"], "discriminator"),
    (["objective=dmd2", "objective.gan_weight=0.1"], "discriminator"),
    (["objective=sid", "objective.gan_weight=0.1"], "discriminator"),
    (["objective=vsd", "objective.discriminator=gan"], "discriminator"),
    (["objective=sim", "objective.distance=l1"], "distance"),
    (["objective=vsd", "objective.weighting=sds"], "weighting"),
    (["objective=adversarial", "objective.discriminator=critic"], "critic"),
    (["objective=sida", "objective.gan_weight=0"], "sida"),
])
def test_bad_hyperparameters_fail_in_one_line(overrides, match):
    from onestep.objectives import make_objective

    cfg = _compose(f"experiment=gmm_{overrides[0].split('=')[1]}", *overrides[1:])
    with pytest.raises(ConfigError, match=match) as e:
        make_objective(cfg.objective, None)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["dmd", "dmd2", "vsd", "sid", "sida", "sim", "fdistill", "adversarial"])
def test_every_objective_is_selectable(name):
    from onestep.objectives import make_objective

    cfg = _compose(f"experiment=gmm_{name}")
    assert cfg.objective.name == name
    assert make_objective(cfg.objective, None).name == name


def test_sid_lsg_guidance_scales():
    """SiD-LSG: real_guidance re-guides the *unguided* teacher, fake_guidance guides the critic in the generator
    loss, critic_guidance guides the critic that DSM trains; zero (0) and anti (-1) guidance included."""
    from onestep.denoisers.base import Guided, guided
    from onestep.core import Batch
    from onestep.objectives.sid import SiD, SiDConfig

    sched = make_schedule("edm")
    means = torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)
    mix = GaussianMixture(means, 0.04 * torch.eye(D, dtype=torch.float64).expand(2, D, D), [1.0, 1.0], labels=[0, 1])
    base = GMMDenoiser(mix, sched)
    critic = MLPDenoiser(sched, D, hidden=16, depth=1, num_classes=2).double()
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    cond = torch.randint(0, 2, (N,))
    nets = Nets(teacher=Guided(base, 3.0), generator=None, critic=critic)
    for real, fake in [(0.0, 1.0), (-1.0, 2.0), (4.5, 4.5)]:
        obj = SiD(SiDConfig(real_guidance=real, fake_guidance=fake), lambda _, b: x)
        torch.manual_seed(1)
        got = obj.generator_loss(nets, Batch(noise=x, cond=cond), 0)["loss"]
        torch.manual_seed(1)
        want, _ = sid_loss(guided(base, real), guided(critic, fake), x, cond, alpha=1.2)
        assert torch.allclose(got, want, rtol=1e-12), (real, fake)
    # the trainer's teacher.guidance (3.0) is used when real_guidance is None
    obj = SiD(SiDConfig(), lambda _, b: x)
    torch.manual_seed(1)
    got = obj.generator_loss(nets, Batch(noise=x, cond=cond), 0)["loss"]
    torch.manual_seed(1)
    assert torch.allclose(got, sid_loss(nets.teacher, critic, x, cond, alpha=1.2)[0], rtol=1e-12)
    # critic training: DSM regresses the guided critic's output; labels drop to "unconditional" at the set rate
    obj = SiD(SiDConfig(critic_guidance=2.0, critic_label_dropout=0.5), lambda _, b: x.detach())
    assert obj.critic_model(nets).scale == 2.0 and obj.critic_model(nets).base is critic
    from onestep.conditioning import Labels
    dropped = obj.critic_cond(nets, Batch(noise=x, cond=Labels(torch.zeros(4000, dtype=torch.long), 2))).labels
    assert abs(float((dropped == 2).double().mean()) - 0.5) < 0.05 and set(dropped.tolist()) == {0, 2}
    assert SiD(SiDConfig(), None).critic_cond(nets, Batch(noise=x, cond=cond)) is cond


def test_objectives_register_themselves_and_a_plugin_objective_trains_through_the_cli(tmp_path):
    """Every module of onestep/objectives registers by being there (no import list), and an objective from a module
    outside onestep (tests/plugins/plugin_objective.py) trains through `onestep train plugins=[...] objective=...`."""
    import json
    import os
    import pkgutil
    import subprocess
    import sys
    from pathlib import Path

    import onestep.objectives as objectives
    from conftest import CLI_SMALL

    modules = {f"onestep.objectives.{m.name}" for m in pkgutil.iter_modules(objectives.__path__)}
    assert modules <= set(sys.modules), modules - set(sys.modules)  # each file imported, so each registered
    assert {cls.__module__ for cls in objectives.OBJECTIVES.values()} <= modules
    assert "plugin_pull" not in objectives.OBJECTIVES  # only a run that names the plugin imports it
    plugin_dir = Path(__file__).parent / "plugins"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(plugin_dir),
                                                                            os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "onestep.cli", "train", "plugins=[plugin_objective]", "experiment=gmm_adversarial",
           "objective=plugin_pull", *CLI_SMALL, f"out_root={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    stats = [json.loads(line) for f in tmp_path.rglob("stats.jsonl") for line in f.read_text().splitlines()]
    assert stats and all("gen/plugin_gap" in s for s in stats), stats
