"""Zero-shot COCO 2014 evaluation as text-to-image distillation papers report it (``eval.protocol=coco2014`` and
``coco2014_512``), after GigaGAN's evaluation code, which DMD2 (SD1.5 FID 8.35, SDXL) and SiD-LSG (8.15 / 0.304)
use:

- captions: ``eval.captions``, one a line; sample i gets caption i (``CaptionData``), ``eval.num_samples`` of them;
- generation at the teacher's native resolution, quantized to uint8 as DMD2's main/test_folder_sd.py does
  (``((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)``: truncation, not rounding);
- real (``eval.reference``: a folder of COCO val2014 images, or statistics this module cached) and generated images
  alike: center crop of the long edge, then PIL LANCZOS resize to 256 (512) px (GigaGAN's evaluation/data_util.py
  CenterCropLongEdge + evaluation/evaluation.py compute_fid's resize_and_center_crop; DMD2's
  main/coco_eval/coco_evaluator.py compute_fid);
- FID with clean-fid in its ``clean`` mode (its PIL bicubic resize to 299, its TorchScript Inception, 2048-D pool
  features) from the local weights ``eval.inception_path``; the Fréchet distance in float64 (frechet.py);
- ``eval.patch_fid``: also FID on 299-px center crops of the full-resolution images, real and generated, no resize
  (DMD2's SDXL protocol: coco_evaluator.py compute_fid(patch_fid=True), main/sdxl/test_folder_sdxl.py);
- CLIP score (with ``eval.clip.checkpoint``): the raw cosine of the image, cropped and resized to 256 px, and
  ``eval.clip.prefix`` + caption, open_clip ViT-g-14 (clip_score.ClipScorer.cosines).

Every metrics row names what produced it: protocol, sample count, resolutions, reference, Inception weights, CLIP
model, checkpoint and prefix, captions file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from onestep.core import Batch
from onestep.data.text import read_prompts
from onestep.errors import ConfigError
from onestep.eval.fid import IMAGE_EXTENSIONS, RefStats, _files_digest, load_inception, load_stats
from onestep.eval.frechet import frechet_distance, gaussian_stats
from onestep.eval.t2i_eval import TextImageEvaluator, decoded
from onestep.progress import bar as progress_bar

#: GigaGAN / DMD2 resolution of the FID (and CLIP) images per protocol name
RESOLUTIONS = {"coco2014": 256, "coco2014_512": 512}
#: the Inception network's input size: DMD2's patch FID crops this much of the full-resolution image
PATCH = 299
#: the CLIP score's images are cropped and resized to 256 px in both protocols (DMD2's compute_clip_score keeps its
#: resize_size=256 default when main/sdxl/test_folder_sdxl.py evaluates FID at --eval_res 512)
CLIP_SIZE = 256
#: images per decode + feature batch
BATCH = 16
#: files per call of clean-fid's get_files_features (one progress-bar step)
FILES_CHUNK = 256


def center_crop_long_edge(im):
    """The central min(w, h) square of a PIL image, at torchvision ``center_crop``'s offsets (Python's round of half
    the excess), as GigaGAN's CenterCropLongEdge computes it."""
    w, h = im.size
    s = min(w, h)
    left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
    return im.crop((left, top, left + s, top + s))


def crop_resize(array: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> center crop of the long edge -> PIL LANCZOS resize to (size, size), uint8."""
    from PIL import Image

    return np.array(center_crop_long_edge(Image.fromarray(array)).resize((size, size), Image.LANCZOS))


def patch_crop(array: np.ndarray) -> np.ndarray:
    """The central 299x299 patch of an image at full resolution (images smaller than that on a side pass unchanged,
    as DMD2's code leaves them: clean-fid then resizes them to 299)."""
    h, w = array.shape[:2]
    if h < PATCH or w < PATCH:
        return array
    top, left = int(round((h - PATCH) / 2.0)), int(round((w - PATCH) / 2.0))
    return np.ascontiguousarray(array[top:top + PATCH, left:left + PATCH])


def quantize(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, 3), truncating as DMD2's evaluation does; grey repeated to RGB."""
    u8 = ((images.detach().float().cpu() + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)
    if u8.shape[1] == 1:
        u8 = u8.expand(-1, 3, -1, -1)
    return u8.permute(0, 2, 3, 1).contiguous().numpy()


@dataclass
class CleanFeatures:
    """clean-fid's ``clean`` mode features after a protocol transform (uint8 HWC -> uint8 HWC) of each image."""

    model: torch.nn.Module
    #: identifies the Inception weights (cache keys, provenance)
    name: str
    device: torch.device = torch.device("cpu")
    batch_size: int = 64

    def of_arrays(self, arrays, transform) -> np.ndarray:
        """In-memory uint8 images, each through ``transform`` then clean-fid's resizer, as its ResizeDataset does."""
        from cleanfid.fid import get_batch_features
        from cleanfid.resize import build_resizer

        resize = build_resizer("clean")
        out = []
        for i in range(0, len(arrays), self.batch_size):
            batch = [torch.from_numpy(np.asarray(resize(transform(a))).transpose(2, 0, 1).copy())
                     for a in arrays[i:i + self.batch_size]]
            out.append(get_batch_features(torch.stack(batch), self.model, self.device))
        return np.concatenate(out)

    def of_files(self, files: list[Path], transform, progress: bool = True, desc: str = "reference features"):
        """Image files through clean-fid's own get_files_features (its reader, ``transform``, its resizer)."""
        from cleanfid.fid import get_files_features

        out = [get_files_features([str(f) for f in files[i:i + FILES_CHUNK]], self.model, num_workers=0,
                                  batch_size=self.batch_size, device=self.device, mode="clean", verbose=False,
                                  custom_image_tranform=transform)
               for i in progress_bar(range(0, len(files), FILES_CHUNK), desc=desc, disable=not progress, leave=False)]
        return np.concatenate(out)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def reference_stats(source: str | os.PathLike, features: CleanFeatures, transform, transform_name: str,
                    cache_dir: str | os.PathLike | None = None, progress: bool = True) -> RefStats:
    """mu / sigma of ``source`` (an image folder, or an ``.npz`` of mu and sigma) after ``transform``; a folder's
    statistics are cached as ``<cache_dir>/coco_<hash>.npz`` keyed by the extractor, the transform and the files'
    content, and name the transform they were made with (``protocol``), which a reused ``.npz`` must match."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"eval.reference '{source}' does not exist; pass eval.reference=<folder of COCO val2014 "
                          "images or a statistics .npz>")
    if path.is_file():
        return _checked(path, transform_name)
    files = image_files(path)
    if len(files) < 2:
        raise ConfigError(f"eval.reference folder '{source}' holds {len(files)} images; it needs at least 2 (pass the "
                          "folder of COCO val2014 images)")
    key = hashlib.sha256(f"{features.name}|{transform_name}|{_files_digest(files, path)}".encode()).hexdigest()[:24]
    cached = Path(cache_dir) / f"coco_{key}.npz" if cache_dir else None
    if cached is not None and cached.exists():
        return load_stats(cached)
    mu, sigma = gaussian_stats(torch.from_numpy(features.of_files(files, transform, progress)))
    stats = RefStats(mu, sigma)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.name + ".tmp.npz")
        np.savez(tmp, mu=mu.numpy(), sigma=sigma.numpy(), protocol=np.array(transform_name))
        tmp.replace(cached)
    return stats


def _checked(path: Path, transform_name: str) -> RefStats:
    if path.suffix != ".npz":
        raise ConfigError(f"eval.reference '{path}' is a file but not an .npz of statistics (mu, sigma); pass the "
                          "folder of COCO val2014 images or an .npz")
    with np.load(path) as z:
        made_with = str(z["protocol"]) if "protocol" in z.files else None
    if made_with is not None and made_with != transform_name:
        raise ConfigError(f"eval.reference '{path}' holds statistics of '{made_with}' images, not '{transform_name}'; "
                          "pass the image folder or statistics made for this protocol")
    return load_stats(path)


class CaptionData:
    """The protocol's evaluation inputs: caption i for sample i, in file order, and fresh latent noise."""

    def __init__(self, captions: list[str], conditioner, latent_shape: tuple[int, ...], path: str):
        self.captions, self.cond, self.data_shape, self.path = captions, conditioner, tuple(latent_shape), path
        conditioner.cache.ensure(captions)

    def batch(self, n: int, device) -> Batch:
        if n > len(self.captions):
            raise ConfigError(f"{n} samples asked but eval.captions '{self.path}' holds {len(self.captions)} captions "
                              f"(one per sample); set eval.num_samples<={len(self.captions)} or pass a longer list")
        noise = torch.randn(n, *self.data_shape)
        return Batch(noise=noise.to(device), cond=self.cond(self.captions[:n]).to(device))


class CocoEvaluator(TextImageEvaluator):
    """The evaluator of the coco2014 protocols: FID (``fd``) at ``size`` px, optional patch FID (``patch_fd``) and
    CLIP score (raw cosine), streamed over decode batches; plots as the text-to-image evaluator does."""

    headline = "fd"
    #: samples per generation call (report.chunked): a batch of full-size SD / SDXL latents, not the default 2048
    sample_chunk = BATCH

    def __init__(self, protocol: str, codec, features: CleanFeatures, reference: RefStats, reference_name: str,
                 patch_reference: RefStats | None = None, scorer=None, captions: str = "", progress: bool = True):
        self.codec, self.protocol, self.size = codec, protocol, RESOLUTIONS[protocol]
        self.features, self.reference, self.patch_reference = features, reference, patch_reference
        self.scorer, self.progress = scorer, progress
        self.fixed = {"protocol": protocol, "fid_resolution": self.size, "reference": reference_name,
                      "inception": features.name, "captions": captions, "quantize": "truncate (DMD2)",
                      **(scorer.provenance() if scorer is not None else {})}
        parts = [f"{protocol}: FID at {self.size} px against {reference_name}"]
        if patch_reference is not None:
            parts.append("patch FID (299-px center crops at full resolution)")
        if scorer is not None:
            parts.append(f"CLIP score (raw cosine, {scorer.model_name}, {scorer.checkpoint}, prefix "
                         f"'{scorer.prefix}')")
        self.what = ", ".join(parts)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float().cpu() if self.codec is None else decoded(self.codec, latents)

    def metrics(self, x: torch.Tensor, cond) -> dict:
        from PIL import Image

        texts = list(cond.texts) if cond is not None and getattr(cond, "texts", None) is not None else None
        if self.scorer is not None and texts is None:
            raise ConfigError(f"eval.protocol={self.protocol}: the CLIP score needs the samples' captions")
        feats, patches, cosines, shape = [], [], [], None
        for i in progress_bar(range(0, x.shape[0], BATCH), desc=f"{self.protocol} features",
                              disable=not self.progress, leave=False):
            u8 = quantize(self.decode(x[i:i + BATCH]))
            shape = u8.shape[1:3]
            feats.append(self.features.of_arrays(u8, lambda a: crop_resize(a, self.size)))
            if self.patch_reference is not None:
                patches.append(self.features.of_arrays(u8, patch_crop))
            if self.scorer is not None:
                images = [Image.fromarray(crop_resize(a, CLIP_SIZE)) for a in u8]
                cosines.append(self.scorer.cosines(images, texts[i:i + BATCH]))
        out = {"fd": _fid(feats, self.reference)}
        if self.patch_reference is not None:
            out["patch_fd"] = _fid(patches, self.patch_reference)
        if self.scorer is not None:
            out["clip_score"] = float(torch.cat(cosines).mean())
        return {**out, "n": int(x.shape[0]), "resolution": f"{shape[0]}x{shape[1]}", **self.fixed}


def _fid(chunks: list[np.ndarray], ref: RefStats) -> float:
    mu, sigma = gaussian_stats(torch.from_numpy(np.concatenate(chunks)))
    return frechet_distance(mu, sigma, ref.mu, ref.sigma)


def coco_evaluator(protocol: str, cfg, setup, progress: bool = True) -> CocoEvaluator:
    """The builder behind PROTOCOLS['coco2014' / 'coco2014_512']: points ``setup.eval_data`` at the captions (so
    every caller's evaluation samples take caption i for sample i) and loads the Inception weights, the reference
    statistics (cached in ``eval.stats_cache``, default <out_root>/fid_stats) and the CLIP model."""
    ev = cfg.eval
    if setup.conditioner is None:
        raise ConfigError(f"eval.protocol={protocol} evaluates text-to-image students; teacher.kind "
                          f"'{cfg.teacher.kind}' takes no captions")
    captions = read_prompts(ev.captions, "eval.captions")
    setup.eval_data = CaptionData(captions, setup.conditioner, setup.teacher.data_shape, str(ev.captions))
    if not ev.reference:
        raise ConfigError(f"eval.protocol={protocol} needs eval.reference=<folder of COCO val2014 images or a "
                          "statistics .npz this protocol wrote>")
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.trainer.cpu else "cpu")
    model, name = load_inception(ev.inception_path, device)
    features = CleanFeatures(model, name, device)
    cache = ev.stats_cache or Path(cfg.out_root) / "fid_stats"
    size = RESOLUTIONS[protocol]
    reference = reference_stats(ev.reference, features, lambda a: crop_resize(a, size),
                                f"crop-long-edge-lanczos-{size}", cache, progress)
    patch_ref = None
    if ev.patch_fid:
        if Path(ev.reference).is_file():
            raise ConfigError("eval.patch_fid=true needs the reference images (eval.reference=<folder>): the patch "
                              "statistics come from 299-px crops of them")
        patch_ref = reference_stats(ev.reference, features, patch_crop, f"center-crop-{PATCH}", cache, progress)
    scorer = None
    if ev.clip.checkpoint:
        from onestep.eval.clip_score import make_scorer

        scorer = make_scorer(ev, device)
    return CocoEvaluator(protocol, setup.codec, features, reference, str(ev.reference), patch_ref, scorer,
                         str(ev.captions), progress)
