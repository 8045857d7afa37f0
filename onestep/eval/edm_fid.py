"""Class-conditional FID as EDM reports it (``eval.protocol=edm_fid``): the FID-50k of DMD2's ImageNet-64 1.28 and
SiD's CIFAR-10 1.92, against EDM-format reference statistics.

EDM's fid.py (NVlabs/edm, calculate_inception_stats / calculate_fid_from_inception_stats / ``fid.py ref``):
- reference: an ``.npz`` with ``mu`` (2048,) and ``sigma`` (2048, 2048), as ``fid.py ref`` writes it and as EDM
  publishes them (fid-refs/cifar10-32x32.npz, imagenet-64x64.npz); ``eval.reference``;
- images: uint8 at the generator's own resolution, quantized as EDM's generate.py does
  (``(x * 127.5 + 128).clip(0, 255).to(torch.uint8)``), grey repeated to RGB, no resize outside the network;
- features: ``detector_net(images, return_features=True)``, the 2048-D pool features of the TF Inception-v3
  translation, which resizes to 299 inside (bilinear, as TF did). EDM unpickles inception-2015-12-05.pkl, which
  needs EDM's own torch_utils; this module loads the TorchScript file of the same translation that StyleGAN2-ADA
  published and clean-fid uses (inception-2015-12-05.pt, ``eval.inception_path``) and calls it the same way;
- statistics: float64 sums, mu = sum f / n, sigma = (sum f f^T - n mu mu^T) / (n - 1); FID = |mu - mu_r|^2 +
  tr(S + S_r - 2 (S S_r)^(1/2)) (frechet.py, float64).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from onestep.errors import ConfigError
from onestep.eval.fid import FeatureEvaluator, RefStats, _file_digest, inception_file
from onestep.eval.frechet import frechet_distance
from onestep.progress import bar as progress_bar

FEATURE_DIM = 2048
#: images per Inception batch (EDM's fid.py max_batch_size)
BATCH = 64


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (N, C, H, W) -> uint8 as EDM's generate.py writes its PNGs; grey repeated to RGB."""
    u8 = (images.detach().float().cpu() * 127.5 + 128).clip(0, 255).to(torch.uint8)
    return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8


def load_detector(path: str | os.PathLike | None, device: str | torch.device = "cpu"):
    """The TorchScript Inception (``return_features=True`` -> 2048-D) from a local file, and its identifying name."""
    file = inception_file(path, "eval.protocol=edm_fid needs the Inception weights",
                          "pass eval.inception_path=<inception-2015-12-05.pt>")
    net = torch.jit.load(str(file), map_location=device).eval()
    return net, f"{file.name}:{_file_digest(file)[:16]}"


def load_edm_stats(path: str | os.PathLike) -> RefStats:
    """An EDM-format reference ``.npz`` (``mu`` (D,), ``sigma`` (D, D)); anything else is a one-line error."""
    p = Path(path).expanduser()
    fix = "pass eval.reference=<EDM-format .npz with mu and sigma, e.g. fid-refs/imagenet-64x64.npz>"
    if not p.is_file():
        raise ConfigError(f"eval.reference '{path}' is not a file; {fix}")
    try:
        with np.load(p) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"eval.reference '{path}' is not a readable .npz ({e}); {fix}") from None
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise ConfigError(f"eval.reference '{path}' lacks {' and '.join(missing)} (it holds {sorted(arrays)}); {fix}")
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ConfigError(f"eval.reference '{path}': mu has shape {mu.shape} and sigma {sigma.shape}, not (D,) and "
                          f"(D, D); {fix}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ConfigError(f"eval.reference '{path}' holds non-finite statistics; {fix}")
    return RefStats(torch.from_numpy(mu).double(), torch.from_numpy(sigma).double())


def save_edm_stats(path: str | os.PathLike, stats: RefStats) -> None:
    """mu / sigma as EDM's ``fid.py ref`` writes them (np.savez, float64)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=stats.mu.double().numpy(), sigma=stats.sigma.double().numpy())


class EdmStats:
    """EDM's running float64 sums of features and their outer products."""

    def __init__(self, dim: int = FEATURE_DIM):
        self.n, self.sum, self.outer = 0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim,
                                                                                               dtype=torch.float64)

    def add(self, feats: torch.Tensor) -> None:
        f = feats.double().cpu()
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def result(self) -> RefStats:
        mu = self.sum / self.n
        return RefStats(mu, (self.outer - torch.outer(mu, mu) * self.n) / (self.n - 1))


class EdmFidEvaluator(FeatureEvaluator):
    """FID of pixel-space samples (images in [-1, 1]) against EDM-format statistics; plots as image experiments do."""

    headline = "fd"

    def __init__(self, detector, detector_name: str, reference: RefStats, reference_name: str,
                 device: str | torch.device = "cpu", progress: bool = True):
        self.detector, self.reference = detector, reference
        self.device, self.progress = torch.device(device), progress
        self.fixed = {"protocol": "edm_fid", "reference": reference_name, "inception": detector_name,
                      "quantize": "x * 127.5 + 128, truncate (EDM generate.py)"}
        self.what = f"edm_fid: FID against {reference_name} (EDM fid.py conventions, {detector_name})"

    @torch.no_grad()
    def features(self, u8: torch.Tensor) -> torch.Tensor:
        return self.detector(u8.to(self.device).float(), return_features=True).view(u8.shape[0], -1)

    def metrics(self, x: torch.Tensor, cond=None) -> dict:
        stats, shape = EdmStats(self.reference.mu.shape[0]), None
        for i in progress_bar(range(0, x.shape[0], BATCH), desc="edm_fid features", disable=not self.progress,
                              leave=False):
            u8 = quantize(x[i:i + BATCH])
            shape = u8.shape[-2:]
            feats = self.features(u8)
            if feats.shape[1] != stats.sum.shape[0]:
                raise ConfigError(f"the Inception features are {feats.shape[1]}-D but eval.reference holds "
                                  f"{stats.sum.shape[0]}-D statistics; pass statistics of this extractor")
            stats.add(feats)
        gen = stats.result()
        fd = frechet_distance(gen.mu, gen.sigma, self.reference.mu, self.reference.sigma)
        return {"fd": fd, "n": int(x.shape[0]), "resolution": f"{shape[0]}x{shape[1]}", **self.fixed}


def edm_evaluator(cfg, setup, progress: bool = True) -> EdmFidEvaluator:
    """The builder behind PROTOCOLS['edm_fid']: eval.reference (EDM .npz), eval.inception_path (TorchScript)."""
    ev = cfg.eval
    if setup.codec is not None:
        raise ConfigError(f"eval.protocol=edm_fid evaluates pixel-space students (EDM's setting); teacher.kind "
                          f"'{cfg.teacher.kind}' samples latents: use eval.protocol=coco2014 or the family's default")
    if not ev.reference:
        raise ConfigError("eval.protocol=edm_fid needs eval.reference=<EDM-format .npz with mu and sigma, e.g. "
                          "fid-refs/imagenet-64x64.npz>")
    reference = load_edm_stats(ev.reference)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.trainer.cpu else "cpu")
    detector, name = load_detector(ev.inception_path, device)
    return EdmFidEvaluator(detector, name, reference, str(ev.reference), device, progress)
