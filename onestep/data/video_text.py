"""Captioned videos (``data=video_text``): the video counterpart of ``data=image_text``, for objectives that read real
data on a video teacher (rCM's sCM term, MCM's consistency distillation on data videos, GAN heads).

``data.path`` is a folder of clips, each with a caption file of the same stem (``a.gif`` + ``a.txt``):
    .gif / .webp               animated images (PIL)
    .mp4                       through imageio's ffmpeg plugin (pip install imageio[ffmpeg])
    .safetensors / .pt         one tensor (C, F, H, W), float in [-1, 1] or uint8 in [0, 255], C = 3 (or 1: grey)
Every frame is resized (short side, bicubic) and center-cropped to the teacher's square side, and a clip gives its
**first** ``F`` frames, F = the teacher's pixel frames (``teacher.num_frames``: 1 + (latent frames - 1) x the VAE's
temporal downsampling); a shorter clip is an error, never padded or looped. The frames are encoded by the teacher's
video codec (``encode``: (B, C, F, H, W) in [-1, 1]) once and cached, content-addressed like image_text's latents:
    latents/<vae id>/<sha1(file bytes)>_<size>x<F>f.safetensors
Batches are image_text's (``ImageTextData``): noise, the caption's Cond and ``real`` = the clips' latents.
"""

from __future__ import annotations

import importlib.util
import itertools
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from onestep.data.text import ImageTextData, TextConditioner, _atomic_save, _sha1, square_rgb
from onestep.errors import ConfigError
from onestep.progress import bar as progress_bar

ANIMATED_SUFFIXES = (".gif", ".webp")
TENSOR_SUFFIXES = (".safetensors", ".pt")
CLIP_SUFFIXES = (*ANIMATED_SUFFIXES, ".mp4", *TENSOR_SUFFIXES)


def find_video_text_pairs(folder, key: str = "data.path") -> list[tuple[Path, str]]:
    """(clip, caption) for every clip in ``folder``; a clip without a non-empty same-stem .txt is an error (a video
    folder is prepared on purpose, so a missing caption is a mistake, not an extra file)."""
    fix = (f"pass {key}=<folder of videos ({', '.join(CLIP_SUFFIXES)}), each with a caption file of the same "
           "name (.txt)>")
    if not folder:
        raise ConfigError(f"{key} is not set; {fix}")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{key} '{folder}' is not a folder; {fix}")
    pairs = []
    for clip in sorted(p for p in root.iterdir() if p.suffix.lower() in CLIP_SUFFIXES):
        cap = clip.with_suffix(".txt")
        text = cap.read_text(encoding="utf-8").strip() if cap.is_file() else ""
        if not text:
            raise ConfigError(f"{key}: '{clip}' has no caption; write it to '{cap}' (one line) or remove the video")
        pairs.append((clip, text))
    if not pairs:
        raise ConfigError(f"{key} '{folder}' holds no video; {fix}")
    return pairs


def _has_ffmpeg() -> bool:
    return importlib.util.find_spec("imageio") is not None and importlib.util.find_spec("imageio_ffmpeg") is not None


def _square_tensor(x: torch.Tensor, size: int) -> torch.Tensor:
    """(C, F, H, W) -> (C, F, size, size): short side resized (bicubic, antialiased), center-cropped; a no-op at
    ``size``, so preprocessed clips are used as written."""
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        s = size / min(h, w)
        x = torch.nn.functional.interpolate(x.transpose(0, 1), size=(max(size, round(h * s)), max(size, round(w * s))),
                                            mode="bicubic", antialias=True, align_corners=False).transpose(0, 1)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    return x


def _tensor_frames(path: Path, size: int) -> torch.Tensor:
    if path.suffix.lower() == ".pt":
        x = torch.load(path, map_location="cpu", weights_only=True)
    else:
        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise ConfigError(f"data.path: '{path}' holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); save "
                              "one video tensor (C, F, H, W) per file")
        (x,) = tensors.values()
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[0] not in (1, 3):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"data.path: '{path}' holds {got}; save a video tensor (C, F, H, W) with C = 3 (or 1)")
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1
    elif x.is_floating_point():
        x = x.float()
        if x.abs().max() > 1 + 1e-3:
            raise ConfigError(f"data.path: '{path}' has values up to {x.abs().max():.3g}; float videos are in "
                              "[-1, 1] (or save uint8 in [0, 255])")
    else:
        raise ConfigError(f"data.path: '{path}' is a {x.dtype} tensor; save float in [-1, 1] or uint8")
    return _square_tensor(x.expand(3, -1, -1, -1), size)


def _first(images, size: int, frames: int) -> list[torch.Tensor]:
    """The first ``frames`` PIL images of an iterator, squared; later frames are never decoded."""
    return [square_rgb(im, size) for im in itertools.islice(images, frames)]


def _pil_frames(path: Path, size: int, frames: int) -> list[torch.Tensor]:
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        return _first(ImageSequence.Iterator(im), size, frames)


def _mp4_frames(path: Path, size: int, frames: int) -> list[torch.Tensor]:
    if not _has_ffmpeg():
        raise ConfigError(f"data.path: reading '{path}' needs imageio with ffmpeg (pip install imageio[ffmpeg]); or "
                          "convert the videos to .gif / .webp / .safetensors")
    import imageio
    from PIL import Image

    with imageio.get_reader(str(path), "ffmpeg") as reader:
        return _first((Image.fromarray(f) for f in reader), size, frames)


def load_clip(path, size: int, frames: int) -> torch.Tensor:
    """The first ``frames`` frames of a clip file, square at ``size``: (3, frames, size, size) in [-1, 1]."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in TENSOR_SUFFIXES:
            x = _tensor_frames(path, size)[:, :frames]
        else:
            read = _mp4_frames if suffix == ".mp4" else _pil_frames
            got = read(path, size, frames)
            x = torch.stack(got, dim=1) if got else torch.empty(3, 0, size, size)
    except ConfigError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError, EOFError, pickle.UnpicklingError) as e:
        # PIL, imageio, safetensors and torch.load each raise their own error for a broken file
        raise ConfigError(f"data.path: '{path}' is not a readable video ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'no detail'}); replace or remove it") from None
    if x.shape[1] < frames:
        raise ConfigError(f"data.path: '{path}' has {x.shape[1]} frames; the teacher takes its first "
                          f"teacher.num_frames={frames}: use longer clips or a smaller teacher.num_frames")
    return x


def teacher_frames(teacher, codec) -> int:
    """Pixel frames of the teacher's videos: 1 + (latent frames - 1) x the codec's temporal downsampling (the
    causal video VAEs' rule, Wan's and CogVideoX's)."""
    if teacher.frame_axis is None:
        raise ConfigError(f"data=video_text: the teacher's {type(teacher).__name__} declares no frame_axis (its "
                          "family must set it), so its number of frames is unknown")
    return (teacher.data_shape[teacher.frame_axis] - 1) * codec.temporal_downsample + 1


@torch.no_grad()
def encode_clips(paths, codec, size: int, frames: int, root: Path, progress: bool = True) -> torch.Tensor:
    """Latents of the clips (cached under ``root``/latents/<codec.name>/), stacked."""
    out = []
    vae_dir = Path(root) / "latents" / codec.name
    for p in progress_bar(paths, desc="encode videos", disable=not progress or len(paths) < 8, leave=False):
        f = vae_dir / f"{_sha1(p.read_bytes())}_{size}x{frames}f.safetensors"
        if f.is_file():
            out.append(load_file(str(f))["latent"])
            continue
        z = codec.encode(load_clip(p, size, frames)[None].to(codec.device, codec.dtype))[0].float().cpu()
        _atomic_save({"latent": z}, f)
        out.append(z)
    return torch.stack(out)


def video_text_data(pairs: list[tuple[Path, str]], teacher, codec, conditioner: TextConditioner, cache_root,
                    progress: bool = True) -> ImageTextData:
    """``data=video_text``: ``pairs`` = find_video_text_pairs(data.path), encoded for ``teacher``."""
    if codec is None or conditioner is None or len(teacher.data_shape) != 4:
        raise ConfigError("data=video_text needs a text-to-video teacher (a video VAE and a text encoder); use "
                          "data=image_text for an image teacher")
    frames = teacher_frames(teacher, codec)
    latents = encode_clips([p for p, _ in pairs], codec, conditioner.size, frames, Path(cache_root), progress)
    return ImageTextData(latents, [[c] for _, c in pairs], conditioner, tuple(teacher.data_shape))
