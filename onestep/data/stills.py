"""Still images for objectives that ask for a second data stream (``Objective.data_streams``): MCM's frame
discriminator learns "real" from a folder of captioned stills while the run's data are videos.

A stream is a folder read like ``data=image_text`` (images, each with a same-name .txt caption; find_image_text_pairs)
and encoded by the teacher's own codec: through a video codec each still is a 1-frame video (B, C, 1, H, W), so its
latent is what the codec makes of one frame alone (Wan's causal VAE encodes a first frame by itself), in the
teacher's latent layout with a frame axis of size 1. Latents and captions are cached like image_text's.
"""

from __future__ import annotations

from pathlib import Path

from onestep.data.setup import Setup
from onestep.data.text import ImageTextData, find_image_text_pairs
from onestep.errors import ConfigError

#: the cache folder suffix of stills encoded as 1-frame videos (apart from the same codec's image latents)
STILL_SUFFIX = "still"


class _StillCodec:
    """A video codec seen as an image codec: (B, C, H, W) images -> latents of 1-frame videos (B, C, 1, H, W)."""

    def __init__(self, codec):
        self.codec, self.name = codec, f"{codec.name}-{STILL_SUFFIX}"
        self.device, self.dtype = codec.device, codec.dtype

    def encode(self, images):
        return self.codec.encode(images[:, :, None])


def still_sources(streams: dict[str, str], setup: Setup, cache_root, progress: bool = True) -> dict[str, ImageTextData]:
    """One captioned-stills source per stream (objective config field -> folder), encoded by ``setup``'s codec."""
    out = {}
    for name, folder in streams.items():
        key = f"objective.{name}"
        if setup.codec is None or setup.conditioner is None:
            raise ConfigError(f"{key}='{folder}' needs a text-conditioned latent teacher (a VAE and a text encoder); "
                              f"this teacher has none: leave {key} unset")
        pairs = find_image_text_pairs(folder, key)
        video = len(setup.teacher.data_shape) == 4
        codec = _StillCodec(setup.codec) if video else setup.codec
        latents = ImageTextData._encode([p for p, _ in pairs], codec, setup.conditioner.size, Path(cache_root), progress)
        out[name] = ImageTextData(latents, [[c] for _, c in pairs], setup.conditioner, tuple(latents.shape[1:]))
    return out
