"""The published evaluation protocols (onestep/eval/coco.py, clip_score.ClipScorer.cosines): GigaGAN's crop and
resize and DMD2's patch crop pixel for pixel, FID on two folders equal to clean-fid's own compute_fid with the same
extractor, the CLIP score against a hand computation with a tiny random open_clip model, the protocol end to end on
the shipped text-to-image digits teacher, and its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose, one_line
from onestep.errors import ConfigError
from onestep.eval import coco


def _gigagan_resize_and_center_crop(image_np: np.ndarray, resize_size: int) -> np.ndarray:
    """Transcription of GigaGAN's evaluation/evaluation.py compute_fid.resize_and_center_crop (CenterCropLongEdge of
    evaluation/data_util.py = torchvision center_crop to min(size), then PIL LANCZOS)."""
    import torchvision.transforms as transforms

    image_pil = Image.fromarray(image_np)
    image_pil = transforms.functional.center_crop(image_pil, min(image_pil.size))
    image_pil = image_pil.resize((resize_size, resize_size), Image.LANCZOS)
    return np.array(image_pil)


def _dmd2_patch(image_np: np.ndarray) -> np.ndarray:
    """Transcription of DMD2's main/coco_eval/coco_evaluator.py compute_fid(patch_fid=True) transform."""
    import torchvision.transforms as transforms

    image_pil = Image.fromarray(image_np)
    if image_pil.size[0] >= 299 and image_pil.size[1] >= 299:
        image_pil = transforms.functional.center_crop(image_pil, 299)
    return np.array(image_pil)


def _random_image(h: int, w: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    smooth = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
    return np.clip(smooth + g.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


# odd and even excess on either side (torchvision rounds half the excess half-to-even), portrait and landscape
SIZES = [(480, 640), (500, 333), (98, 101), (301, 299), (300, 303), (512, 512), (427, 640), (17, 256)]


def test_crop_resize_and_patch_equal_gigagan_and_dmd2_pixel_for_pixel():
    for i, (h, w) in enumerate(SIZES):
        im = _random_image(h, w, i)
        for size in (256, 512):
            assert np.array_equal(coco.crop_resize(im, size), _gigagan_resize_and_center_crop(im, size)), (h, w, size)
        assert np.array_equal(coco.patch_crop(im), _dmd2_patch(im)), (h, w)
    assert coco.patch_crop(_random_image(320, 400, 0)).shape == (299, 299, 3)


def test_quantize_truncates_as_dmd2():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 6)
    want = ((x + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)  # main/test_folder_sd.py
    got = coco.quantize(x)
    assert got.shape == (1, 1, 6, 3) and np.array_equal(got[0, 0, :, 0], want.flatten().numpy())
    assert got[0, 0, 2, 0] == 127  # truncation: 127.5 -> 127 (a PNG writer would round to 128)


class _TinyFeatures(torch.nn.Module):
    """A small fixed feature map on 299x299 [0, 255] inputs (what clean-fid hands its extractor): pooled colours
    through a fixed random projection, 8-D so that the covariance of a few dozen images is full rank."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 4 * 4, 8)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0), std=0.05)

    def forward(self, x):
        return torch.tanh(self.proj(torch.nn.functional.adaptive_avg_pool2d(x / 255, 4).flatten(1)))


def _folder(path, n: int, seed: int, shift: int = 0):
    path.mkdir()
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        im = np.clip(_random_image(h // 4 + 8, w // 4 + 8, seed * 1000 + i).astype(int) + shift, 0, 255)
        Image.fromarray(im.astype(np.uint8)).save(path / f"{i:03d}.png")
    return path


def test_fid_of_two_folders_equals_clean_fid_compute_fid(tmp_path):
    from cleanfid import fid as cleanfid

    real, fake = _folder(tmp_path / "real", 40, 1), _folder(tmp_path / "fake", 40, 2, shift=30)
    model = _TinyFeatures().eval()
    transform = lambda a: coco.crop_resize(a, 64)  # noqa: E731  (small, to keep the test fast; 256 in the protocol)
    want = cleanfid.compute_fid(str(real), str(fake), mode="clean", custom_feat_extractor=model, num_workers=0,
                                batch_size=16, device=torch.device("cpu"), verbose=False,
                                custom_image_tranform=transform)
    features = coco.CleanFeatures(model, "tiny-test-features", batch_size=16)
    ref = coco.reference_stats(real, features, transform, "crop-64", tmp_path / "cache", progress=False)
    generated = [np.array(Image.open(f).convert("RGB")) for f in coco.image_files(fake)]
    got = coco._fid([features.of_arrays(generated, transform)], ref)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9) and want > 1e-3
    # the folder's statistics are cached under the transform's name, and reused without reading the images
    cached = list((tmp_path / "cache").glob("coco_*.npz"))
    assert len(cached) == 1 and str(np.load(cached[0])["protocol"]) == "crop-64"
    again = coco.reference_stats(real, coco.CleanFeatures(None, "tiny-test-features"), transform, "crop-64",
                                 tmp_path / "cache", progress=False)
    torch.testing.assert_close(again.sigma, ref.sigma)
    # statistics made for another transform are refused
    with pytest.raises(ConfigError) as e:
        coco.reference_stats(cached[0], features, coco.patch_crop, "center-crop-299")
    assert "'crop-64' images" in one_line(e)


def _tiny_clip(tmp_path):
    from test_rewards import _tiny_clip as tiny_open_clip

    model, cfg_file = tiny_open_clip(tmp_path, "onestep-proto-clip")
    ckpt = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    return cfg_file, ckpt, model


def test_published_clip_score_equals_a_hand_computation(tmp_path):
    import open_clip
    import torchvision.transforms as T

    from onestep.eval.clip_score import ClipScorer

    cfg_file, ckpt, model = _tiny_clip(tmp_path)
    scorer = ClipScorer(str(cfg_file), ckpt, prefix="A photo depicts ")
    captions = ["a cat on a red sofa", "two people riding bikes down a street"]
    images = [Image.fromarray(coco.crop_resize(_random_image(h, w, i), 256)) for i, (h, w) in enumerate(SIZES[:2])]
    got = scorer.cosines(images, captions)
    # by hand: CLIP's eval transform (bicubic resize of the short side, center crop, mean / std), raw cosine
    pp = open_clip.get_model_preprocess_cfg(model)
    to_clip = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                         T.Normalize(pp["mean"], pp["std"])])
    with torch.no_grad():
        img = model.encode_image(torch.stack([to_clip(im) for im in images]))
        tokens = open_clip.get_tokenizer("onestep-proto-clip")(["A photo depicts " + c for c in captions])
        txt = model.encode_text(tokens)
    want = torch.nn.functional.cosine_similarity(img, txt, dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.abs().max() < 1  # the raw cosine: neither x100 nor clamped
    assert scorer.provenance() == {"clip_model": str(cfg_file), "clip_checkpoint": str(ckpt),
                                   "clip_prefix": "A photo depicts "}


def test_prefix_tokens_equal_gigagans_token_splice():
    """GigaGAN / DMD2 insert tokenize("A photo depicts ")[1:4] after the start token and force the end token at
    position 77; open_clip's tokenizer on the concatenated text gives the same tokens, short or truncated."""
    import open_clip

    tok = open_clip.get_tokenizer("ViT-g-14")
    for caption in ("A man riding a horse on a beach.", " ".join(["word"] * 90)):
        tokens = tok([caption])
        prefix = tok(["A photo depicts "])[:, 1:4]
        spliced = torch.cat([tokens[:, :1], prefix, tokens[:, 1:]], dim=1)[:, :77]
        last = spliced[:, 76:77]
        last[last > 0] = 49407
        spliced = torch.cat([spliced[:, :76], last], dim=1)
        assert torch.equal(tok(["A photo depicts " + caption]), spliced), caption


class _StandInInception(torch.nn.Module):
    """Saved under clean-fid's Inception file name (the real weights are not available offline): 2048-D features."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 2048))

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


def _coco_cfg(tmp_path, *extra):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(f"a handwritten {w}" for w in ("one", "two", "three", "four", "five", "six")) + "\n")
    cfg_file, ckpt, _ = _tiny_clip(tmp_path)
    torch.jit.script(_StandInInception()).save(str(tmp_path / "inception-2015-12-05.pt"))
    real = tmp_path / "val2014"
    if not real.exists():
        _folder(real, 6, 3)
    return compose(["experiment=digits_t2i_dmd2", "eval.protocol=coco2014", f"eval.captions={captions}",
                    f"eval.reference={real}", f"eval.inception_path={tmp_path}", f"eval.clip.model={cfg_file}",
                    f"eval.clip.checkpoint={ckpt}", "eval.clip.prefix='A photo depicts '", f"out_root={tmp_path}",
                    "eval.num_samples=4", *extra])


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_coco2014_end_to_end_on_the_digits_teacher(tmp_path):
    """eval.protocol=coco2014 through the registry on the shipped text-to-image digits teacher: caption i for sample
    i, FID / patch FID / CLIP score of decoded samples, every row naming what made it."""
    from onestep import experiment
    from onestep.eval.evaluators import evaluated
    from onestep.eval.report import eval_inputs

    cfg = _coco_cfg(tmp_path, "eval.patch_fid=true")
    setup = evaluated(cfg, experiment.build(cfg, tmp_path / "run", progress=False))
    assert isinstance(setup.eval_data, coco.CaptionData)
    noise, cond = eval_inputs(setup, 4, seed=0)
    assert cond.texts == ["a handwritten one", "a handwritten two", "a handwritten three", "a handwritten four"]
    with torch.no_grad():
        x = setup.teacher(noise, torch.full((4,), 0.5), cond)  # any latents: the metrics' wiring is under test
    m = setup.evaluator.metrics(x, cond)
    assert setup.evaluator.headline == "fd" and np.isfinite([m["fd"], m["patch_fd"], m["clip_score"]]).all()
    assert -1 < m["clip_score"] < 1
    assert m["n"] == 4 and m["resolution"] == "16x16" and m["fid_resolution"] == 256
    assert m["protocol"] == "coco2014" and m["clip_prefix"] == "A photo depicts " and m["captions"].endswith(".txt")
    assert m["inception"].startswith("clean-fid:inception-2015-12-05.pt:") and m["reference"].endswith("val2014")
    assert len(list((tmp_path / "fid_stats").glob("coco_*.npz"))) == 2  # the 256-px and the patch statistics
    with pytest.raises(ConfigError) as e:
        eval_inputs(setup, 7, seed=0)
    assert "holds 6 captions" in one_line(e)


def test_bad_input_is_one_line(tmp_path):
    from onestep import experiment
    from onestep.eval.evaluators import make_evaluator

    cfg = _coco_cfg(tmp_path)
    setup = experiment.build(cfg, tmp_path / "run", progress=False)
    cases = [("eval.captions=/nonexistent/captions.txt", "eval.captions '/nonexistent/captions.txt'"),
             (f"eval.reference={tmp_path / 'empty'}", "holds 0 images"),
             ("eval.reference=/nonexistent/val2014", "eval.reference '/nonexistent/val2014' does not exist"),
             ("eval.protocol=coco2015", "eval.protocol='coco2015' is not a protocol")]
    (tmp_path / "empty").mkdir()
    for override, message in cases:
        with pytest.raises(ConfigError) as e:
            make_evaluator(_coco_cfg(tmp_path, override), setup)
        assert message in one_line(e), override


def test_eval_group_sets_the_published_protocol():
    ev = compose(["experiment=sd15_dmd2", "eval=coco2014"]).eval
    assert (ev.protocol, ev.num_samples, ev.clip.model, ev.clip.prefix) == ("coco2014", 30000, "ViT-g-14",
                                                                            "A photo depicts ")
    assert compose(["experiment=sdxl_dmd2_4step", "eval=coco2014", "eval.patch_fid=true",
                    "eval.num_samples=10000"]).eval.patch_fid


# ---- EDM-format class-conditional FID --------------------------------------------------------------------

def test_edm_stats_round_trip_and_accumulate_as_edm(tmp_path):
    from onestep.eval import edm_fid

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    stats = edm_fid.EdmStats(6)
    for chunk in feats.split(64):
        stats.add(chunk)
    got = stats.result()
    torch.testing.assert_close(got.mu, feats.mean(0))
    torch.testing.assert_close(got.sigma, torch.from_numpy(np.cov(feats.numpy(), rowvar=False)))
    # what EDM's `fid.py ref` writes (np.savez(dest, mu=mu, sigma=sigma)) loads back; what we write, EDM reads
    edm_file = tmp_path / "edm-ref.npz"
    np.savez(edm_file, mu=got.mu.numpy(), sigma=got.sigma.numpy())
    back = edm_fid.load_edm_stats(edm_file)
    assert torch.equal(back.mu, got.mu) and torch.equal(back.sigma, got.sigma) and back.feats is None
    edm_fid.save_edm_stats(tmp_path / "ours.npz", back)
    ref = dict(np.load(tmp_path / "ours.npz"))
    assert sorted(ref) == ["mu", "sigma"] and ref["sigma"].dtype == np.float64
    assert np.array_equal(ref["mu"], got.mu.numpy()) and np.array_equal(ref["sigma"], got.sigma.numpy())


def test_bad_edm_statistics_are_one_line(tmp_path):
    from onestep.eval.edm_fid import load_edm_stats

    np.savez(tmp_path / "nomu.npz", sigma=np.eye(3))
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(4))
    np.savez(tmp_path / "nan.npz", mu=np.array([np.nan, 0.0]), sigma=np.eye(2))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    cases = [("nomu.npz", "lacks mu (it holds ['sigma'])"), ("shape.npz", "mu has shape (3,) and sigma (4, 4)"),
             ("nan.npz", "non-finite"), ("junk.npz", "not a readable .npz"), ("missing.npz", "is not a file")]
    for name, message in cases:
        with pytest.raises(ConfigError) as e:
            load_edm_stats(tmp_path / name)
        assert message in one_line(e) and "eval.reference" in one_line(e), name


class _StandInDetector(torch.nn.Module):
    """Stands in for EDM's Inception (which resizes inside): any resolution in, features out with return_features."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 2 * 2, 5)

    def forward(self, x, return_features: bool = False):
        assert return_features
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x / 255, 2).flatten(1))


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_edm_fid_on_the_digits_teacher_equals_a_hand_computation(tmp_path):
    from onestep import experiment
    from onestep.eval.edm_fid import save_edm_stats
    from onestep.eval.evaluators import make_evaluator
    from onestep.eval.fid import RefStats
    from onestep.eval.frechet import frechet_distance

    net = _StandInDetector()
    torch.jit.script(net).save(str(tmp_path / "inception-2015-12-05.pt"))
    ref = RefStats(torch.rand(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64) * 0.1)
    save_edm_stats(tmp_path / "ref.npz", ref)
    cfg = compose(["experiment=digits_dmd2", "eval=edm_fid50k", f"eval.reference={tmp_path / 'ref.npz'}",
                   f"eval.inception_path={tmp_path}", f"out_root={tmp_path}"])
    setup = experiment.build(cfg, tmp_path / "run", progress=False)
    evaluator = make_evaluator(cfg, setup)
    x = torch.rand(100, 1, 16, 16) * 2.2 - 1.1
    m = evaluator.metrics(x)
    # by hand: EDM's generate.py quantization, grey -> RGB, the detector at native resolution, np.cov
    u8 = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    with torch.no_grad():
        f = net(u8.float(), return_features=True).double().numpy()
    want = frechet_distance(torch.from_numpy(f.mean(0)), torch.from_numpy(np.cov(f, rowvar=False)), ref.mu, ref.sigma)
    assert m["fd"] == pytest.approx(want, rel=1e-9)
    assert (m["protocol"], m["n"], m["resolution"]) == ("edm_fid", 100, "16x16")
    assert m["reference"].endswith("ref.npz") and m["inception"].startswith("inception-2015-12-05.pt:")
    assert compose(["eval=edm_fid50k"]).eval.num_samples == 50000
    with pytest.raises(ConfigError) as e:
        make_evaluator(compose(["experiment=digits_t2i_dmd2", "eval.protocol=edm_fid"]), _coco_setup(tmp_path))
    assert "pixel-space" in one_line(e)


def _coco_setup(tmp_path):
    from onestep import experiment

    cfg = compose(["experiment=digits_t2i_dmd2", f"out_root={tmp_path}"])
    return experiment.build(cfg, tmp_path / "t2i", progress=False)


def _cli(*args: str) -> None:
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "onestep.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_onestep_eval_and_bench_run_each_protocol_end_to_end(tmp_path):
    """Each published protocol end to end: `onestep eval run_dir=... protocol=...` (the CLI, in a process of its
    own) on a trained run's checkpoint writes a row in eval/<protocol>.jsonl naming what made it, and the bench with
    eval.protocol on the same run writes the student and a teacher point; tiny stand-ins for Inception and CLIP."""
    from onestep.eval.bench import bench
    from onestep.train.trainer import train

    _coco_cfg(tmp_path)  # writes the captions, the COCO stand-in folder, the Inception and CLIP stand-ins
    cfg_file, ckpt, _ = _tiny_clip(tmp_path)
    coco_keys = [f"eval.captions={tmp_path / 'captions.txt'}", f"eval.reference={tmp_path / 'val2014'}",
                 f"eval.inception_path={tmp_path}"]
    coco_keys += [f"eval.clip.model={cfg_file}", f"eval.clip.checkpoint={ckpt}", "eval.num_samples=4"]
    tiny = ["trainer.steps=2", "trainer.checkpoint_every=2", "eval.num_samples=8", "eval.teacher_steps=[1]",
            "eval.plot=false", f"out_root={tmp_path}"]
    t2i = tmp_path / "t2i"
    train(compose(["experiment=digits_t2i_dmd2", *tiny]), t2i)
    edm_ref = tmp_path / "ref.npz"
    from onestep.eval.edm_fid import save_edm_stats
    from onestep.eval.fid import RefStats

    (tmp_path / "edm").mkdir()
    torch.jit.script(_StandInDetector()).save(str(tmp_path / "edm" / "inception-2015-12-05.pt"))
    save_edm_stats(edm_ref, RefStats(torch.rand(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64) * 0.1))
    pixel = tmp_path / "pixel"
    train(compose(["experiment=digits_dmd2", "objective.regression_weight=0", *tiny]), pixel)
    edm_keys = [f"eval.reference={edm_ref}", f"eval.inception_path={tmp_path / 'edm'}", "eval.num_samples=8"]
    for run, protocol, keys in ((t2i, "coco2014", coco_keys), (t2i, "coco2014_512", coco_keys + ["eval.patch_fid=true"]),
                                (pixel, "edm_fid", edm_keys)):
        _cli("eval", f"run_dir={run}", f"protocol={protocol}", "progress=false", *keys)
        rows = [json.loads(line) for line in (run / "eval" / f"{protocol}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [2] and rows[0]["protocol"] == protocol, rows
        assert np.isfinite(rows[0]["fd"]) and rows[0]["provenance"]["eval"]["protocol"] == protocol
        out = tmp_path / "bench" / protocol
        experiment = "digits_t2i_dmd2" if run == t2i else "digits_dmd2"
        bench(compose([f"experiment={experiment}", f"bench.runs=[{run}]", f"eval.protocol={protocol}",
                       "bench.teacher_methods=[ddim]", "bench.teacher_steps=[1]", "bench.student_steps=[1]",
                       "bench.num_samples=4", "bench.progress=false", *keys]), out)
        table = (out / "bench.md").read_text()
        assert table.count("\n| ") >= 2 and (out / "bench.csv").is_file() and (out / "bench.png").is_file(), table
