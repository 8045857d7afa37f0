"""Evaluation: Fréchet distance against closed forms, KID and precision/recall sanity, the clean-fid
Inception path (wiring with a stand-in TorchScript file; one-line errors without weights), reference
statistics caching, CLIP score on a tiny random open_clip model saved and reloaded, and `onestep bench`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, compose
from onestep.errors import ConfigError
from onestep.eval import fid as fidmod
from onestep.eval.frechet import frechet_distance, frechet_distance_feats, gaussian_stats
from onestep.eval.kid import kid
from onestep.eval.precision_recall import precision_recall


def _random_cov(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


# ---- Fréchet distance ---------------------------------------------------------------------------------

def test_frechet_commuting_gaussians_closed_form():
    """Covariances Q diag(a) Q^T and Q diag(b) Q^T commute: d^2 = |dmu|^2 + sum (sqrt a - sqrt b)^2."""
    g = torch.Generator().manual_seed(0)
    d = 12
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a, b = torch.rand(d, generator=g, dtype=torch.float64) * 4, torch.rand(d, generator=g, dtype=torch.float64) * 4
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    got = frechet_distance(mu1, q @ torch.diag(a) @ q.T, mu2, q @ torch.diag(b) @ q.T)
    want = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_general_gaussians_match_sqrtm_of_product():
    """Non-commuting covariances: tr((S1 S2)^{1/2}) from scipy's general sqrtm gives the same distance."""
    from scipy import linalg

    g = torch.Generator().manual_seed(1)
    d = 10
    s1, s2 = _random_cov(d, g), _random_cov(d, g)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    want = float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * np.trace(covmean))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_frechet_one_dimensional_is_w2_squared():
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[0.25]]) == pytest.approx(3.0**2 + (2.0 - 0.5) ** 2)


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_noise():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 16, generator=g) @ torch.randn(16, 16, generator=g)
    assert frechet_distance_feats(x, x) < 1e-8
    noise = torch.randn(x.shape, generator=g)
    fds = [frechet_distance_feats(x, x + s * noise) for s in (0.05, 0.2, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


def test_gaussian_stats_are_unbiased_float64():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, sigma = gaussian_stats(x)
    assert mu.dtype == sigma.dtype == torch.float64
    torch.testing.assert_close(sigma, torch.from_numpy(np.cov(x.numpy(), rowvar=False)))


# ---- KID, precision / recall ---------------------------------------------------------------------------

def test_kid_zero_for_one_distribution_positive_for_two():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(600, 8, generator=g), torch.randn(600, 8, generator=g)
    same = kid(a, b, num_subsets=20, subset_size=300)
    shifted = kid(a, b + 1.0, num_subsets=20, subset_size=300)
    assert abs(same) < 0.02 and shifted > 0.5, (same, shifted)


def test_precision_recall_identical_disjoint_and_half_coverage():
    g = torch.Generator().manual_seed(4)
    real = torch.randn(400, 4, generator=g)
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(real, real + 100.0) == {"precision": 0.0, "recall": 0.0}
    # two real clusters, the fake covers one: precise (every fake is real-looking) but half the recall
    two = torch.cat([real, real + 50.0])
    pr = precision_recall(two, real.clone())
    assert pr["precision"] == 1.0 and pr["recall"] == pytest.approx(0.5)
    # the k-NN balls have volume: a fresh draw from the same 2-D distribution mostly lies inside them
    a, b = torch.randn(2, 1000, 2, generator=g)
    pr = precision_recall(a, b)
    assert pr["precision"] > 0.9 and pr["recall"] > 0.9, pr


# ---- feature spaces, reference statistics --------------------------------------------------------------

class _Counting:
    """A fixed random feature map on images, counting the images it sees."""

    def __init__(self, dim: int = 24):
        g = torch.Generator().manual_seed(5)
        self.w = torch.randn(3 * 8 * 8, dim, generator=g) / 8
        self.seen = 0

    def __call__(self, x):
        self.seen += x.shape[0]
        return torch.tanh(x.flatten(1) @ self.w)


def _images(n: int, seed: int) -> torch.Tensor:
    base = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return (base + 0.4 * torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


def test_generic_feature_fn_fid_grows_with_noise_and_reference_is_cached(tmp_path):
    fn = _Counting()
    space = fidmod.FeatureSpace(fn, name="test-random-features", batch_size=128)
    ref_images = _images(800, 0)
    ref = fidmod.reference_stats(ref_images, space, cache_dir=tmp_path)
    assert fn.seen == 800 and len(list(tmp_path.glob("ref_*.npz"))) == 1
    fn.seen = 0
    again = fidmod.reference_stats(ref_images, space, cache_dir=tmp_path)
    assert fn.seen == 0, "cached reference statistics were recomputed"
    torch.testing.assert_close(again.sigma, ref.sigma)
    fidmod.reference_stats(ref_images.flip(0)[:799], space, cache_dir=tmp_path)  # other content -> new entry
    assert fn.seen == 799 and len(list(tmp_path.glob("ref_*.npz"))) == 2

    other = _images(800, 1)  # independent draw of the same distribution
    noise = torch.randn(other.shape, generator=torch.Generator().manual_seed(6))

    def fd_at(sigma):
        return fidmod.fid(lambda i, k: other[i:i + k] + sigma * noise[i:i + k], 800, ref, space, kid_subsets=10)

    rows = [fd_at(s) for s in (0.0, 0.1, 0.3, 1.0)]
    fds = [r["fd"] for r in rows]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds
    assert rows[0]["precision"] > 0.7 and rows[-1]["precision"] < 0.5 * rows[0]["precision"]
    assert rows[0]["kid"] < rows[-1]["kid"]


def test_to_uint8_matches_png_quantization():
    levels = torch.arange(256, dtype=torch.float32)
    assert torch.equal(fidmod.to_uint8(levels / 127.5 - 1), levels.to(torch.uint8))
    assert fidmod.to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])).tolist() == [0, 0, 128, 255, 255]


def test_reference_from_folder_and_npz(tmp_path):
    space = fidmod.FeatureSpace(_Counting(), name="test-random-features")
    images = _images(40, 7)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(fidmod.to_uint8(images)):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    from_folder = fidmod.reference_stats(folder, space, cache_dir=tmp_path / "cache")
    from_tensor = fidmod.reference_stats(fidmod.to_uint8(images).float() / 127.5 - 1, space)
    torch.testing.assert_close(from_folder.mu, from_tensor.mu)
    npz = tmp_path / "stats.npz"
    np.savez(npz, mu=from_folder.mu.numpy(), sigma=from_folder.sigma.numpy())  # clean-fid's layout: no feats
    loaded = fidmod.reference_stats(npz, space)
    assert loaded.feats is None
    assert set(fidmod.feature_metrics(space(images), loaded)) == {"fd"}
    with pytest.raises(ConfigError, match="eval.reference"):
        fidmod.reference_stats(tmp_path / "missing", space)


def test_inception_without_weights_is_a_one_line_error_and_never_downloads(tmp_path, monkeypatch):
    import urllib.request

    def no_network(*a, **k):
        raise AssertionError("clean-fid tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    for path in (None, tmp_path, tmp_path / "inception-2015-12-05.pt"):
        with pytest.raises(ConfigError) as e:
            fidmod.inception_space(path)
        msg = str(e.value)
        assert "\n" not in msg and "eval.inception_path" in msg and fidmod.INCEPTION_URL in msg
    with pytest.raises(ConfigError, match="eval.inception_path '/nonexistent/x.pt'"):
        fidmod.feature_space(compose(["eval.features=inception", "eval.inception_path=/nonexistent/x.pt"]).eval)
    with pytest.raises(ConfigError, match="eval.features"):
        fidmod.feature_space(compose(["eval.features=nope"]).eval)


class _FakeInceptionLayers(torch.nn.Module):
    """Stand-in for the Inception trunk (pool3 is 2048-D): average pooling + a fixed 1x1 projection."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2048)

    def forward(self, x):
        return self.proj(x.mean((2, 3)))


class _FakeInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _FakeInceptionLayers()

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_inception_path_uses_clean_fid_resize_and_torchscript_file(tmp_path):
    """The clean-fid wiring, with a TorchScript stand-in saved under Inception's file name (real weights are
    not available offline): uint8 quantization, clean 299x299 resize, clean-fid's (x - 128) / 128 input."""
    from cleanfid.resize import build_resizer

    fake = _FakeInception()
    torch.jit.script(fake).save(str(tmp_path / fidmod.INCEPTION_FILE))
    space = fidmod.inception_space(tmp_path)
    x = torch.rand(3, 3, 20, 28) * 2 - 1
    feats = space(x)
    assert feats.shape == (3, 2048)
    resize = build_resizer("clean")
    u8 = fidmod.to_uint8(x).permute(0, 2, 3, 1).numpy()
    resized = torch.from_numpy(np.stack([resize(im) for im in u8])).permute(0, 3, 1, 2)
    assert resized.shape[-2:] == (299, 299)
    with torch.no_grad():
        want = fake.layers((resized - 128) / 128)
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-5)
    gray = space(x[:, :1])  # 1-channel images are repeated to RGB
    with torch.no_grad():
        torch.testing.assert_close(gray, space(x[:, :1].expand(-1, 3, -1, -1)))

    # the same file through the config: eval.features=inception, eval.inception_path, cached dataset statistics
    cfg = compose([f"eval.inception_path={tmp_path / fidmod.INCEPTION_FILE}", f"eval.stats_cache={tmp_path / 'st'}"])
    data = torch.rand(12, 1, 8, 8) * 2 - 1
    evaluator = fidmod.image_evaluator(cfg, data, kid_subsets=2)
    assert len(list((tmp_path / "st").glob("ref_*.npz"))) == 1
    m = evaluator.metrics(data)  # one 2048-D Fréchet distance: a few seconds of eigh
    assert m["fd"] < 1e-6 and m["precision"] == m["recall"] == 1.0 and m["n"] == 12


# ---- CLIP score ------------------------------------------------------------------------------------------

def test_clip_score_tiny_random_model_saved_and_reloaded(tmp_path):
    import open_clip

    from onestep.eval.clip_score import ClipScorer, clip_score, load_prompts, make_scorer

    from test_rewards import _tiny_clip

    model, cfg_file = _tiny_clip(tmp_path, "onestep-tiny-clip")
    ckpt = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a photo of a cat\n\n a red square \nthe digit seven\n")
    prompts = load_prompts(prompts_file)
    assert prompts == ["a photo of a cat", "a red square", "the digit seven"]

    cfg = compose([f"eval.clip.model={cfg_file}", f"eval.clip.checkpoint={ckpt}"])
    scorer = make_scorer(cfg.eval)
    images = torch.rand(3, 3, 40, 48) * 2 - 1
    got = scorer.scores(images, prompts)
    # reference: the in-memory model with CLIP's preprocessing -> 100 * max(cos, 0)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(scorer.preprocess(images)), dim=-1)
        tok = open_clip.get_tokenizer("onestep-tiny-clip")(prompts)
        txt = torch.nn.functional.normalize(model.encode_text(tok), dim=-1)
    torch.testing.assert_close(got, 100 * (img * txt).sum(-1).clamp_min(0))
    assert scorer.preprocess(images).shape == (3, 3, 32, 32)
    mean = clip_score(lambda i, ps: images[i:i + len(ps)], prompts, scorer, batch_size=2)
    assert mean == pytest.approx(float(got.mean()), rel=1e-5)

    with pytest.raises(ConfigError, match="eval.clip.checkpoint"):
        ClipScorer(str(cfg_file), None)
    with pytest.raises(ConfigError, match="does not exist"):
        ClipScorer(str(cfg_file), tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="eval.clip.model"):
        ClipScorer("no-such-arch", ckpt)
    with pytest.raises(ConfigError, match="eval.clip.prompts"):
        load_prompts(None)


# ---- bench -----------------------------------------------------------------------------------------------

BENCH = ["bench.num_samples=256", "bench.teacher_steps=[1,2,16]", "bench.student_steps=[1,2]",
         "bench.progress=false"]


def test_bench_gmm_writes_csv_md_png_and_resumes(tmp_path):
    from onestep.eval.bench import bench
    from onestep.train.trainer import train

    run = tmp_path / "run"
    train(compose(TINY), run)
    cfg = compose(TINY + BENCH + [f"bench.runs=[{run}]"])
    out = bench(cfg, tmp_path / "bench")
    n_points = 2 * 3 + 2  # ddim, heun at 3 step counts + the student at 2
    assert (out["computed"], out["cached"]) == (n_points, 0)
    with open(out["csv"]) as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 + n_points and lines[0].startswith("model,kind,sampler,steps,nfe,sliced_w2")
    assert "| run | renoise | 2 | 2 |" in Path(out["md"]).read_text()
    with Image.open(out["png"]) as im:
        assert im.size[0] > 200 and im.size[1] > 200
    rows = {(r["model"], r["sampler"], r["steps"]): r for r in out["rows"]}
    assert rows[("teacher", "heun", 16)]["nfe"] == 31 and rows[("run", "renoise", 2)]["nfe"] == 2
    assert rows[("teacher", "heun", 16)]["sliced_w2"] != rows[("teacher", "ddim", 16)]["sliced_w2"]
    # more steps of the exact teacher's ODE get closer to the mixture
    assert rows[("teacher", "ddim", 16)]["sliced_w2"] < rows[("teacher", "ddim", 1)]["sliced_w2"]
    # same protocol as the trainer's final eval (same seed, noise, 256 samples): the checkpoint's EMA weights
    # and the teacher give the very numbers the run reported
    trained = {(r["model"], r["steps"]): r for r in json.loads((run / "metrics.json").read_text())["rows"]}
    assert rows[("run", "renoise", 1)]["sliced_w2"] == trained[("student", 1)]["sliced_w2"]
    assert rows[("teacher", "ddim", 2)]["sliced_w2"] == trained[("teacher", 2)]["sliced_w2"]

    again = bench(cfg, tmp_path / "bench")
    assert (again["computed"], again["cached"]) == (0, n_points)
    assert again["rows"] == out["rows"]
    next(iter((tmp_path / "bench" / "points").glob("run_renoise_2_*.json"))).unlink()
    assert bench(cfg, tmp_path / "bench")["computed"] == 1
    # another protocol (sample count) is another set of points
    other = bench(compose(TINY + BENCH + [f"bench.runs=[{run}]", "bench.num_samples=300"]), tmp_path / "bench")
    assert other["computed"] == n_points and other["rows"][0]["n"] == 300


def test_bench_bad_runs_are_one_line_errors(tmp_path):
    from onestep.eval.bench import bench

    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.yaml").write_text("seed: 0\n")
    for runs, match in ((tmp_path / "nope", "not a folder"), (tmp_path, "no config.yaml"),
                        (tmp_path / "empty_run", "no checkpoint")):
        with pytest.raises(ConfigError, match=match) as e:
            bench(compose(TINY + BENCH + [f"bench.runs=[{runs}]"]), tmp_path / "b")
        assert "\n" not in str(e.value) and "bench.runs" in str(e.value)
    with pytest.raises(ConfigError, match="bench.teacher_methods"):
        bench(compose(TINY + BENCH + ["bench.teacher_methods=[rk4]"]), tmp_path / "b")


@pytest.mark.slow
def test_cli_bench_teacher_only_and_missing_run(tmp_path):
    """`onestep bench` end to end (teacher only, default folder <out_root>/bench/<experiment>) and the
    one-line error for a missing run folder."""
    cmd = [sys.executable, "-m", "onestep.cli", "bench", *TINY, "bench.num_samples=200",
           "bench.teacher_steps=[1,2]", "bench.teacher_methods=[ddim]", "bench.progress=false",
           f"out_root={tmp_path}"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = tmp_path / "bench" / "gmm_dmd2"
    assert {"bench.csv", "bench.md", "bench.png"} <= {p.name for p in folder.iterdir()}
    assert "2 points computed" in done.stdout

    bad = subprocess.run(cmd + [f"bench.runs=[{tmp_path / 'no_such_run'}]"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onestep: error: bench.runs:"), bad.stderr


def test_bench_protocol_comes_from_the_runs_config(tmp_path):
    """With bench.runs, eval and bench keys come from the run's config.yaml (not the composed default experiment),
    keys given on the command line win, runs of different protocols are refused in one line, and the folder is
    named after the run's experiment (Hydra's record), else after the run folder."""
    from onestep.eval.bench import folder_name, run_experiment, runs_protocol
    from onestep.train.run_dir import prepare_run_dir

    run = tmp_path / "ring"
    prepare_run_dir(compose(TINY + ["bench.student_steps=[1]"]), run)  # config.yaml is all the protocol needs
    runs = [f"bench.runs=[{run}]"]
    cfg = runs_protocol(compose(runs), runs)  # no experiment=: the default (digits) composition
    assert cfg.eval.num_samples == 256 and cfg.eval.features == "inception" and list(cfg.bench.student_steps) == [1]
    given = runs + ["bench.num_samples=300", "eval.features=digits", "bench.student_steps=[1,2]"]
    cfg = runs_protocol(compose(given), given)
    assert (cfg.bench.num_samples, cfg.eval.features, list(cfg.bench.student_steps)) == (300, "digits", [1, 2])
    assert cfg.eval.num_samples == 256

    other = tmp_path / "other"
    other.mkdir()
    saved = (run / "config.yaml").read_text()
    (other / "config.yaml").write_text(saved.replace("num_samples: 256", "num_samples: 512"))
    both = [f"bench.runs=[{run},{other}]"]
    with pytest.raises(ConfigError, match="bench.num_samples") as e:
        runs_protocol(compose(both), both)
    assert "\n" not in str(e.value)
    settled = both + ["bench.num_samples=64"]
    assert runs_protocol(compose(settled), settled).bench.num_samples == 64

    assert run_experiment(run) is None and folder_name([str(run)]) == "ring"
    (run / ".hydra").mkdir()
    (run / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      experiment: gmm_dmd2\n")
    assert folder_name([str(run)]) == folder_name([str(run)], "gmm_dmd2") == "gmm_dmd2"
    with pytest.raises(ConfigError, match="experiment=gmm_dmd2, not experiment=digits_dmd2"):
        folder_name([str(run)], "digits_dmd2")


@pytest.mark.slow
def test_cli_bench_follows_the_runs_experiment(tmp_path):
    """`onestep bench bench.runs=[<gmm run>]` without experiment=, as README shows it: the run's eval.num_samples and
    evaluator (so the run's own results rows come back exactly) and <out_root>/bench/<the run's experiment>;
    bench.num_samples / bench.out on the command line still win; a contradicting experiment= is one line."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train = subprocess.run([sys.executable, "-m", "onestep.cli", "train", *TINY, f"out_root={tmp_path}"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    (run,) = (tmp_path / "gmm_dmd2").iterdir()
    bench = [sys.executable, "-m", "onestep.cli", "bench", f"bench.runs=['{run}']", "bench.teacher_steps=[2]",
             "bench.teacher_methods=[ddim]", "bench.student_steps=[1]", "bench.progress=false", f"out_root={tmp_path}"]
    done = subprocess.run(bench, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(p.read_text()) for p in (tmp_path / "bench" / "gmm_dmd2" / "points").glob("*.json")]
    assert {r["n"] for r in rows} == {256} and len(rows) == 2
    trained = {(r["model"], r["steps"]): r["sliced_w2"] for r in json.loads((run / "metrics.json").read_text())["rows"]}
    assert {(r["kind"], r["steps"]): r["sliced_w2"] for r in rows} == trained

    done = subprocess.run(bench + ["bench.num_samples=300", f"bench.out={tmp_path / 'b300'}"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {json.loads(p.read_text())["n"] for p in (tmp_path / "b300" / "points").glob("*.json")} == {300}

    bad = subprocess.run(bench + ["experiment=digits_dmd2"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and not (tmp_path / "bench" / "digits_dmd2").exists()
    assert bad.stderr.strip().splitlines() == [f"onestep: error: bench.runs: '{run}' was trained with "
                                               "experiment=gmm_dmd2, not experiment=digits_dmd2; leave experiment= "
                                               "out (the runs' config.yaml sets the protocol)"]


def test_fd_is_symmetric_and_zero_only_for_equal_stats():
    g = torch.Generator().manual_seed(8)
    s = _random_cov(5, g)
    mu = torch.randn(5, generator=g, dtype=torch.float64)
    assert frechet_distance(mu, s, mu, s) < 1e-9
    assert frechet_distance(mu, s, mu, 2 * s) == pytest.approx((3 - 2 * math.sqrt(2)) * float(s.trace()), rel=1e-9)


def test_digits_feature_space_offline(tmp_path):
    """eval.features=digits: the shipped digits feature net; held-out digits are close to the train split,
    noisy or blurred ones are not, and the reference statistics are cached."""
    from onestep.data.digits import load_digits_tensors

    train_x, _ = load_digits_tensors("train")
    held_x, _ = load_digits_tensors("heldout")
    cfg = compose(["eval.features=digits", f"eval.stats_cache={tmp_path}"])
    evaluator = fidmod.image_evaluator(cfg, train_x, kid_subsets=10)
    assert evaluator.space.name.startswith("digits-features:") and evaluator.space.channels == 1
    assert len(list(tmp_path.glob("ref_*.npz"))) == 1
    clean = evaluator.metrics(held_x)
    noisy = evaluator.metrics((held_x + 0.5 * torch.randn(held_x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1))
    blurred = evaluator.metrics(torch.nn.functional.avg_pool2d(held_x, 3, 1, 1))
    assert clean["fd"] < 0.2 * min(noisy["fd"], blurred["fd"]), (clean, noisy, blurred)
    assert clean["precision"] > noisy["precision"] and clean["recall"] > noisy["recall"]


@pytest.mark.slow
def test_bench_digits_fd(tmp_path):
    """The bench on an image experiment (digits_dmd2 with a tiny random UNet teacher standing in for the
    shipped one): FD headline in the digits feature space, files written, trainer's eval rows reproduced."""
    from diffusers import UNet2DModel

    from onestep.denoisers.diffusers import UNet2DDenoiser, save_unet_denoiser
    from onestep.eval.bench import bench
    from onestep.schedules import make_schedule
    from onestep.train.trainer import train

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=11)
    save_unet_denoiser(UNet2DDenoiser(unet, make_schedule("vp_cosine"), "v"), tmp_path / "teacher")
    tiny = ["experiment=digits_dmd2", f"teacher.path={tmp_path / 'teacher'}", "trainer.steps=4",
            "trainer.batch_size=16", "trainer.checkpoint_every=2", "trainer.progress=false", "eval.num_samples=64",
            "eval.teacher_steps=[2]", "eval.plot=false"]
    train(compose(tiny), tmp_path / "run")
    cfg = compose(tiny + [f"bench.runs=[{tmp_path / 'run'}]", "bench.num_samples=64", "bench.teacher_steps=[1,2]",
                          "bench.teacher_methods=[ddim]", "bench.student_steps=[1,2]", "bench.progress=false"])
    out = bench(cfg, tmp_path / "bench")
    assert out["headline"] == "fd" and out["computed"] == 4
    with Image.open(out["png"]) as im:
        im.verify()
    rows = {(r["model"], r["steps"]): r for r in out["rows"]}
    trained = {(r["model"], r["steps"]): r for r in json.loads((tmp_path / "run" / "metrics.json").read_text())["rows"]}
    assert rows[("run", 1)]["fd"] == pytest.approx(trained[("student", 1)]["fd"], rel=1e-9)
    assert rows[("teacher", 2)]["fd"] == pytest.approx(trained[("teacher", 2)]["fd"], rel=1e-9)
    assert {"fd", "kid", "precision", "recall"} <= set(rows[("teacher", 1)])
