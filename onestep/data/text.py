"""Data sources of text-to-image runs: prompts (``data=prompts``) and captioned images (``data=image_text``).

Both yield ``Batch(noise, cond, real)``: noise in the teacher's latent shape, ``cond`` a Cond of cached text
embeddings (onestep.conditioning; its null row is the encoded ``teacher.negative_prompt``, as the diffusers
pipelines build their unconditional branch) and, for image_text, ``real`` = the images' VAE latents.

Caches (under ``data.cache``, default ``<out_root>/cache``) are content-addressed, so reruns, resumes and other
runs never re-encode:
    text/<encoder id>/<sha1(prompt)>.safetensors     one prompt's embedding fields
    latents/<vae id>/<sha1(image bytes)>_<size>.safetensors
where the encoder / VAE id hashes the model files themselves.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from onestep.core import Batch
from onestep.errors import ConfigError
from onestep.progress import bar as progress_bar

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ENCODE_BATCH = 32


def read_prompts(path, key: str = "data.path") -> list[str]:
    """One prompt per non-empty line of a text file (``key`` names the config key in errors)."""
    if not path:
        raise ConfigError(f"{key} is not set; pass {key}=<text file with one prompt per line>")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key} '{path}' is not a file; pass {key}=<text file with one prompt per line>")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{key} '{path}' holds no prompts; write one prompt per line")
    return prompts


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


class EmbeddingCache:
    """Text embeddings on disk, one file per (encoder, prompt); encodes only what is missing."""

    def __init__(self, text, root: Path, progress: bool = True):
        self.text, self.dir, self.progress = text, Path(root) / "text" / text.name, progress

    def path(self, prompt: str) -> Path:
        return self.dir / f"{_sha1(prompt.encode('utf-8'))}.safetensors"

    def ensure(self, prompts: list[str]) -> int:
        """Encode and store the prompts not cached yet; returns how many were encoded."""
        missing = list(dict.fromkeys(p for p in prompts if not self.path(p).is_file()))
        chunks = range(0, len(missing), ENCODE_BATCH)
        for i in progress_bar(chunks, desc="encode prompts", disable=not self.progress or len(chunks) < 2, leave=False):
            part = missing[i:i + ENCODE_BATCH]
            fields = self.text.encode(part)
            for j, prompt in enumerate(part):
                _atomic_save({k: v[j].cpu() for k, v in fields.items()}, self.path(prompt))
        return len(missing)

    def load(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        rows = [load_file(str(self.path(p))) for p in prompts]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class TextConditioner:
    """Prompts -> Cond through the embedding cache, with the run's negative prompt and image size."""

    def __init__(self, text, cache: EmbeddingCache, negative_prompt: str | None, image_size: int):
        self.text, self.cache, self.negative_prompt, self.size = text, cache, negative_prompt, image_size

    def __call__(self, prompts: list[str]):
        return self.text.assemble(prompts, self.cache.load(prompts), self.negative_prompt, self.size, self.size)


class PromptData:
    """``data=prompts``: uniformly drawn prompts and fresh latent noise (no real images)."""

    def __init__(self, prompts: list[str], conditioner: TextConditioner, latent_shape: tuple[int, ...]):
        self.prompts, self.cond, self.data_shape = prompts, conditioner, tuple(latent_shape)
        conditioner.cache.ensure(prompts)

    def batch(self, n: int, device) -> Batch:
        idx = torch.randint(0, len(self.prompts), (n,))
        noise = torch.randn(n, *self.data_shape)
        return Batch(noise=noise.to(device), cond=self.cond([self.prompts[i] for i in idx.tolist()]).to(device))


def _load_image(path: Path, size: int) -> torch.Tensor:
    """RGB, short side resized to ``size`` (bicubic) and center-cropped; (3, size, size) in [-1, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1


def find_image_text_pairs(folder, key: str = "data.path") -> list[tuple[Path, str]]:
    """(image, caption) for every image in ``folder`` with a caption file of the same stem (``a.png`` + ``a.txt``);
    ``key`` names the config key in errors."""
    fix = f"pass {key}=<folder of images, each with a caption file of the same name (.txt)>"
    if not folder:
        raise ConfigError(f"{key} is not set; {fix}")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{key} '{folder}' is not a folder; {fix}")
    pairs = []
    for img in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        cap = img.with_suffix(".txt")
        if cap.is_file() and cap.read_text(encoding="utf-8").strip():
            pairs.append((img, cap.read_text(encoding="utf-8").strip()))
    if not pairs:
        raise ConfigError(f"{key} '{folder}' has no image with a non-empty caption file; {fix}")
    return pairs


class ImageTextData:
    """Captioned images as latents, for objectives that use real data (consistency distillation, GAN heads).

    ``data=image_text`` builds it from a folder (``from_folder``: VAE-encoded once, cached); ``data=digits_text``
    from the digits train split (onestep.data.digits_text). Each image has one or more captions; a batch draws one
    of them per image."""

    def __init__(self, latents: torch.Tensor, captions: list[list[str]], conditioner: TextConditioner,
                 latent_shape: tuple[int, ...]):
        if len(captions) != len(latents) or not all(captions):
            raise ValueError(f"{len(latents)} latents need as many non-empty caption lists, got {len(captions)}")
        self.latents, self.captions = latents, captions
        self.cond, self.data_shape = conditioner, tuple(latent_shape)
        if tuple(latents.shape[1:]) != self.data_shape:
            raise ConfigError(f"the data's images encode to latents {tuple(latents.shape[1:])}, the teacher "
                              f"expects {self.data_shape}; set teacher.resolution to the training resolution")
        conditioner.cache.ensure(sorted({c for cs in captions for c in cs}))

    @classmethod
    def from_folder(cls, pairs: list[tuple[Path, str]], conditioner: TextConditioner, codec, image_size: int,
                    cache_root: Path, latent_shape: tuple[int, ...], progress: bool = True) -> "ImageTextData":
        """``pairs``: find_image_text_pairs(data.path)."""
        latents = cls._encode([p for p, _ in pairs], codec, image_size, Path(cache_root), progress)
        return cls(latents, [[c] for _, c in pairs], conditioner, latent_shape)

    @staticmethod
    @torch.no_grad()
    def _encode(paths, codec, size: int, root: Path, progress: bool) -> torch.Tensor:
        out = []
        vae_dir = root / "latents" / codec.name
        for p in progress_bar(paths, desc="encode images", disable=not progress or len(paths) < 8, leave=False):
            f = vae_dir / f"{_sha1(p.read_bytes())}_{size}.safetensors"
            if f.is_file():
                out.append(load_file(str(f))["latent"])
                continue
            z = codec.encode(_load_image(p, size)[None].to(codec.device, codec.dtype))[0].float().cpu()
            _atomic_save({"latent": z}, f)
            out.append(z)
        return torch.stack(out)

    def batch(self, n: int, device) -> Batch:
        idx = torch.randint(0, len(self.captions), (n,)).tolist()
        pick = torch.rand(n).tolist()
        noise = torch.randn(n, *self.data_shape)
        texts = [self.captions[i][int(u * len(self.captions[i]))] for i, u in zip(idx, pick)]
        return Batch(noise=noise.to(device), cond=self.cond(texts).to(device), real=self.latents[idx].to(device))
