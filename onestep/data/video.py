"""Videos as files: a batch of videos (n, C, F, H, W) in [-1, 1] as one animated grid, written as GIF (PIL) or MP4
(imageio with its ffmpeg plugin, when installed). It sits below eval (training-time sample panels) and export
(`onestep sample`), which both write videos and may not import each other.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from onestep.errors import ConfigError

#: frames per second of written videos (Wan's 16 fps)
FPS = 16
#: the writers by file suffix
VIDEO_SUFFIXES = (".gif", ".mp4")


def video_grid(videos: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """(n, C, F, H, W) in [-1, 1] -> (F, H', W', 3) uint8: each frame of the n videos tiled as torchvision's
    make_grid tiles images (white padding, grey -> RGB)."""
    from torchvision.utils import make_grid

    if videos.ndim != 5:
        raise ValueError(f"videos must be (n, C, F, H, W), got shape {tuple(videos.shape)}")
    x = ((videos.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1, -1)
    frames = [make_grid(x[:, :, f], nrow=nrow, padding=padding, pad_value=255) for f in range(x.shape[2])]
    return torch.stack(frames).permute(0, 2, 3, 1).contiguous()


def write_gif(path, frames: torch.Tensor, fps: int = FPS) -> Path:
    """(F, H, W, 3) uint8 -> an animated GIF that loops."""
    from PIL import Image

    images = [Image.fromarray(f.numpy()) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return Path(path)


def write_mp4(path, frames: torch.Tensor, fps: int = FPS) -> Path:
    """(F, H, W, 3) uint8 -> an H.264 MP4 through imageio's ffmpeg plugin (an optional dependency)."""
    if importlib.util.find_spec("imageio") is None or importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ConfigError(f"out='{path}': writing MP4 needs imageio with ffmpeg (pip install imageio[ffmpeg]); or "
                          "pass out=<file>.gif or out=<file>.safetensors")
    import imageio

    # ffmpeg's H.264 wants even sides: pad the grid by one white row / column where needed
    h, w = frames.shape[1:3]
    frames = torch.nn.functional.pad(frames.permute(0, 3, 1, 2), (0, w % 2, 0, h % 2), value=255).permute(0, 2, 3, 1)
    imageio.mimwrite(str(path), list(frames.numpy()), fps=fps, macro_block_size=1)
    return Path(path)


def write_video(path, videos: torch.Tensor, nrow: int = 8, fps: int = FPS) -> Path:
    """The videos as one animated grid, in the format of ``path``'s suffix (.gif or .mp4)."""
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ConfigError(f"out='{path}': videos are written as {' or '.join(VIDEO_SUFFIXES)} (or .safetensors)")
    frames = video_grid(videos, nrow)
    return write_gif(path, frames, fps) if suffix == ".gif" else write_mp4(path, frames, fps)
