"""FID (and FD in any other feature space) of in-memory samples against cached reference statistics.

A *feature space* maps images in [-1, 1], shape (N, C, H, W), to features (N, D):

- ``inception``: clean-fid's protocol (Parmar et al. 2022): quantize to uint8 as a saved PNG would be,
  resize to 299x299 with clean-fid's anti-aliased PIL bicubic resizer, then its TorchScript Inception-v3
  (the StyleGAN2-ADA port of the TF FID network), pool3 features (2048-D). Needs the weights file
  ``inception-2015-12-05.pt`` on disk (``eval.inception_path``); it is never downloaded.
- ``digits``: the small digits feature net shipped with the project (offline; ``onestep.rewards.digits_features``).
- any callable, wrapped in :class:`FeatureSpace` with a name that identifies it in cache keys.

Reference statistics (mean, covariance, and the features themselves for KID and precision/recall) come
from an image folder, a tensor of images, or an ``.npz`` (``mu``, ``sigma``[, ``feats``], clean-fid's
layout), and are cached under ``<cache>/ref_<hash>.npz`` keyed by the feature space and a hash of the
content, so editing a folder or switching extractor never reuses stale statistics.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from onestep.errors import ConfigError
from onestep.eval.frechet import frechet_distance, gaussian_stats
from onestep.eval.kid import kid
from onestep.eval.precision_recall import precision_recall
from onestep.progress import bar as progress_bar

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
#: reference features kept in the cache for KID / precision-recall (the mean/covariance use all of them)
MAX_REF_FEATS = 50_000


@dataclass
class FeatureSpace:
    #: images in [-1, 1], (N, C, H, W) -> features (N, D)
    fn: Callable[[torch.Tensor], torch.Tensor]
    #: identifies the extractor (and its weights) in reference-statistics cache keys
    name: str
    batch_size: int = 250
    #: channels the extractor expects when images are read from a folder (1 = grey, 3 = RGB)
    channels: int = 3

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.fn(images[i:i + self.batch_size]).float().cpu().flatten(1)
                          for i in range(0, images.shape[0], self.batch_size)])


def inception_file(path: str | os.PathLike | None, needs: str, where: str) -> Path:
    """The Inception TorchScript file at ``path`` (the file or its folder); ``needs`` says who needs it and ``where``
    how to pass it, in the one-line errors."""
    if not path:
        raise ConfigError(f"{needs} and eval.inception_path is not set: download {INCEPTION_URL} and {where}")
    file = Path(path) / INCEPTION_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ConfigError(f"eval.inception_path '{path}' has no {INCEPTION_FILE}: download {INCEPTION_URL} "
                          f"there and {where}")
    return file


def load_inception(path: str | os.PathLike | None, device: str | torch.device = "cpu"):
    """clean-fid's ``InceptionV3W`` (299x299 inputs in [0, 255] -> 2048-D pool features) from a local file (``path`` =
    the file or its folder), and a name that identifies the weights (file name + content hash)."""
    from cleanfid.inception_torchscript import InceptionV3W

    where = "pass eval.inception_path=<file>"
    file = inception_file(path, "FID needs clean-fid's Inception weights", f"{where} (or use eval.features=digits "
                          "offline)")
    if file.name != INCEPTION_FILE:
        raise ConfigError(f"eval.inception_path '{path}': clean-fid loads the file by its name; rename it to "
                          f"{INCEPTION_FILE} and {where}")
    # download=False: clean-fid only joins the folder and the file name and torch.jit.loads it (no network)
    model = InceptionV3W(str(file.parent), download=False, resize_inside=False).to(device).eval()
    return model, f"clean-fid:{INCEPTION_FILE}:{_file_digest(file)[:16]}"


def inception_space(path: str | os.PathLike | None, device: str | torch.device = "cpu",
                    batch_size: int = 64) -> FeatureSpace:
    """clean-fid's Inception features, loaded from a local file (``path`` = the file or its folder)."""
    from cleanfid.resize import build_resizer

    device = torch.device(device)
    model, name = load_inception(path, device)
    resize = build_resizer("clean")

    def fn(x: torch.Tensor) -> torch.Tensor:
        u8 = to_uint8(x)
        if u8.shape[1] == 1:
            u8 = u8.expand(-1, 3, -1, -1)
        batch = np.stack([resize(im) for im in u8.permute(0, 2, 3, 1).numpy()])  # (N, 299, 299, 3) float32
        return model(torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(device))

    return FeatureSpace(fn, name=name, batch_size=batch_size)


def digits_space(device: str | torch.device = "cpu", batch_size: int = 500) -> FeatureSpace:
    """The project's offline digits feature network (1-channel images)."""
    try:
        from onestep.rewards.digits_features import load_digits_features
    except ImportError as e:
        raise ConfigError(f"eval.features=digits needs onestep.rewards.digits_features ({e}); use eval.features="
                          "inception with eval.inception_path=<file>") from None
    net = load_digits_features().to(device).eval()
    digest = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        digest.update(k.encode())
        digest.update(v.detach().cpu().contiguous().numpy().tobytes())

    def fn(x: torch.Tensor) -> torch.Tensor:
        return net.features(x.to(device))

    return FeatureSpace(fn, name=f"digits-features:{digest.hexdigest()[:16]}", batch_size=batch_size, channels=1)


def feature_space(eval_cfg, device: str | torch.device = "cpu") -> FeatureSpace:
    features = eval_cfg.features
    if features == "inception":
        return inception_space(eval_cfg.inception_path, device)
    if features == "digits":
        return digits_space(device)
    raise ConfigError(f"eval.features '{features}' is unknown; choose inception (clean-fid, needs eval.inception_path) "
                      "or digits (offline)")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, as writing a PNG would quantize them (clean-fid's point: match real data)."""
    return ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ---- reference statistics -----------------------------------------------------------------------------

@dataclass
class RefStats:
    mu: torch.Tensor  # float64 (D,)
    sigma: torch.Tensor  # float64 (D, D)
    #: float32 (n, D) features, for KID and precision/recall (None for mu/sigma-only .npz files)
    feats: torch.Tensor | None = None


def reference_stats(source, space: FeatureSpace, cache_dir: str | os.PathLike | None = None,
                    progress: bool = True) -> RefStats:
    """Statistics of ``source``: an ``.npz`` file (used as is), an image folder or a tensor in [-1, 1]."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"reference '{source}' does not exist; pass eval.reference=<image folder or .npz>")
        if path.is_file():
            if path.suffix != ".npz":
                raise ConfigError(f"reference '{source}' is a file but not an .npz of statistics (mu, sigma); "
                                  "pass an image folder or a .npz")
            return load_stats(path)
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if len(files) < 2:
            raise ConfigError(f"reference folder '{source}' holds {len(files)} images; it needs at least 2")
        digest = _files_digest(files, path)
        load = lambda: _read_images(files, space.channels)  # noqa: E731
    else:
        images = torch.as_tensor(source)
        digest = hashlib.sha256(images.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
        load = lambda: images  # noqa: E731
    key = hashlib.sha256(f"{space.name}|{digest}".encode()).hexdigest()[:24]
    cached = Path(cache_dir) / f"ref_{key}.npz" if cache_dir else None
    if cached is not None and cached.exists():
        return load_stats(cached)
    feats = features_of_images(load(), space, progress=progress, desc="reference features")
    stats = stats_of(feats)
    if cached is not None:
        save_stats(cached, stats)
    return stats


def stats_of(feats: torch.Tensor) -> RefStats:
    mu, sigma = gaussian_stats(feats)
    return RefStats(mu, sigma, feats[:MAX_REF_FEATS].float())


def save_stats(path: Path, stats: RefStats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays = {"mu": stats.mu.numpy(), "sigma": stats.sigma.numpy()}
    if stats.feats is not None:
        arrays["feats"] = stats.feats.numpy()
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_stats(path: Path) -> RefStats:
    try:
        with np.load(path) as z:
            feats = torch.from_numpy(z["feats"]).float() if "feats" in z.files else None
            return RefStats(torch.from_numpy(z["mu"]).double(), torch.from_numpy(z["sigma"]).double(), feats)
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"statistics file '{path}' is unreadable or lacks mu/sigma ({e}); delete it or pass "
                          "another eval.reference") from None


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files_digest(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode())
        h.update(_file_digest(f).encode())
    return h.hexdigest()


def _read_images(files: list[Path], channels: int) -> torch.Tensor:
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    arrays = [np.asarray(Image.open(f).convert(mode)) for f in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ConfigError(f"reference images have different sizes {sorted(shapes)[:3]}; resize them to one size")
    x = torch.from_numpy(np.stack(arrays)).float() / 127.5 - 1
    return x[:, None] if channels == 1 else x.permute(0, 3, 1, 2)


# ---- generated samples and metrics --------------------------------------------------------------------

def features_of_images(images: torch.Tensor, space: FeatureSpace, progress: bool = False,
                       desc: str = "features") -> torch.Tensor:
    out = [space(images[i:i + space.batch_size])
           for i in progress_bar(range(0, images.shape[0], space.batch_size), desc=desc, disable=not progress,
                                 leave=False)]
    return torch.cat(out)


def features_of_generator(sample_fn: Callable[[int, int], torch.Tensor], n: int, space: FeatureSpace,
                          batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
    """Features of ``n`` samples drawn batch by batch: ``sample_fn(start, count)`` returns images (count, C, H, W)
    in [-1, 1] (the start index lets it pick fixed per-sample seeds); nothing is written to disk."""
    bs = batch_size or space.batch_size
    out = [space(sample_fn(i, min(bs, n - i)))
           for i in progress_bar(range(0, n, bs), desc="sample + features", disable=not progress, leave=False)]
    return torch.cat(out)


def feature_metrics(feats: torch.Tensor, ref: RefStats, *, kid_subsets: int = 100, kid_subset_size: int = 1000,
                    pr_k: int = 3, pr_max: int = 10_000) -> dict[str, float]:
    """FD (FID in Inception space), and KID / precision / recall when the reference kept its features."""
    mu, sigma = gaussian_stats(feats)
    if mu.shape != ref.mu.shape:
        raise ConfigError(f"generated features are {mu.numel()}-D but the reference statistics are "
                          f"{ref.mu.numel()}-D; the reference was made with another feature extractor")
    out = {"fd": frechet_distance(mu, sigma, ref.mu, ref.sigma)}
    if ref.feats is not None:
        out["kid"] = kid(feats, ref.feats, num_subsets=kid_subsets, subset_size=kid_subset_size)
        out |= precision_recall(ref.feats[:pr_max], feats[:pr_max], k=pr_k)
    return out


def fid(sample_fn: Callable[[int, int], torch.Tensor], n: int, reference, space: FeatureSpace,
        cache_dir: str | os.PathLike | None = None, progress: bool = False, **metric_args) -> dict[str, float]:
    """FD/KID/precision/recall of ``n`` samples from ``sample_fn`` against ``reference`` in ``space``."""
    ref = reference if isinstance(reference, RefStats) else reference_stats(reference, space, cache_dir, progress)
    return feature_metrics(features_of_generator(sample_fn, n, space, progress=progress), ref, **metric_args)


def image_evaluator(cfg, dataset: torch.Tensor, device: str | torch.device = "cpu", **metric_args) -> "FeatureEvaluator":
    """The evaluator of an image experiment: ``eval.features`` space, reference = ``eval.reference`` if given,
    else ``dataset`` (images in [-1, 1]); statistics cached in ``eval.stats_cache`` (<out_root>/fid_stats)."""
    space = feature_space(cfg.eval, device)
    cache = cfg.eval.stats_cache or Path(cfg.out_root) / "fid_stats"
    reference = cfg.eval.reference if cfg.eval.reference else dataset
    return FeatureEvaluator(space, reference_stats(reference, space, cache, progress=False), **metric_args)


class FeatureEvaluator:
    """The ``eval.evaluators.Evaluator`` for image experiments: FD (+ KID, precision/recall) against reference
    statistics in one feature space, and an image-grid plot."""

    headline = "fd"

    def __init__(self, space: FeatureSpace, reference: RefStats, **metric_args):
        self.space, self.reference, self.metric_args = space, reference, metric_args

    def metrics(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> dict:
        return {**feature_metrics(features_of_images(x, self.space), self.reference, **self.metric_args),
                "n": x.shape[0]}

    def plot(self, path: Path, panels) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from torchvision.utils import make_grid

        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
        for ax, (title, (x, _)) in zip(axes[0], panels.items()):
            grid = make_grid(to_uint8(x[:64]), nrow=8, padding=1, pad_value=255)
            ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
