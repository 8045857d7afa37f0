"""``data=webdataset``: captioned images streamed from tar shards, in the WebDataset layout (members that share a
key before the first dot form one sample: ``000123.jpg`` + ``000123.txt``; ``onestep cache`` writes
``000123.latent.safetensors`` (the VAE latent, ``latent``) and ``000123.emb.safetensors`` (the caption's text-encoder
fields) instead of the image, so that training runs neither encoder; their metadata names the codec / encoder, and
a run with another teacher is refused in one line).

``data.path`` takes one or more brace-expanded patterns (``shards/{00000..01023}.tar``, several separated by
``::`` as webdataset writes them). The order of an epoch is a function of ``seed`` and the epoch alone: the shard
list is permuted per epoch, process ``rank`` of ``world`` takes every ``world``-th shard of that permutation, and the
samples of a shard are read in a permuted order of its keys (tar members are read by offset, so nothing but the tar
index is held in memory). The position -- (epoch, shard, sample) of this process's stream -- is part of the
trainer's checkpoint (``state_dict`` / ``load_state_dict``), so after a kill the rerun reads exactly the samples the
checkpointed run had not yet trained on: none skipped, none repeated.

A sample that does not decode (a broken image, a missing or empty caption, a latent of the wrong shape) or a shard
that is not a readable tar is skipped and counted (``skipped``, in the trainer's stats), never fatal -- unless a
whole epoch yields nothing, which is a one-line error.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch

from safetensors.torch import load_file

from onestep.core import Batch
from onestep.errors import ConfigError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
LATENT_EXT = "latent.safetensors"
EMB_EXT = "emb.safetensors"  # the text encoder's fields of the caption (onestep cache writes them)


def expand(spec, key: str = "data.path") -> list[str]:
    """The shard paths of ``spec`` (a pattern with ``{a..b}`` / ``{x,y}`` ranges, ``::``-separated patterns, or a
    list of them), each checked to exist."""
    from braceexpand import braceexpand

    if not spec:
        raise ConfigError(f"{key} is not set; pass \"{key}='shards/{{00000..00099}}.tar'\" (tar shards of image + "
                          ".txt caption members; the quotes keep Hydra off the braces)")
    patterns = [p for s in ([spec] if isinstance(spec, str) else list(spec)) for p in str(s).split("::") if p]
    paths = [str(Path(p).expanduser()) for pattern in patterns for p in braceexpand(pattern)]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"{key}: {len(missing)} of {len(paths)} shards do not exist (first: '{missing[0]}'); "
                          "check the pattern and its {a..b} range")
    return paths


def image_tensor(src, size: int, channels: int) -> torch.Tensor:
    """An image file (path or bytes) center-cropped to ``size`` in [-1, 1], averaged to grey for a 1-channel VAE."""
    from PIL import Image

    from onestep.data.text import square_rgb

    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
        im.load()
        x = square_rgb(im, size)
    return x.mean(0, keepdim=True) if channels == 1 else x


def _members(path: str) -> dict[str, dict[str, tarfile.TarInfo]]:
    """key -> {extension: member} of one tar, in the order the keys first appear."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(path, "r:") as tar:
        for m in tar.getmembers():
            if not m.isfile():
                continue
            name = m.name.rsplit("/", 1)[-1]
            stem, dot, ext = name.partition(".")
            if dot:
                samples.setdefault(m.name[: len(m.name) - len(name)] + stem, {})[ext.lower()] = m
    return samples


class ShardStream:
    """This process's endless, resumable stream of raw samples ``(key, {extension: bytes})``."""

    def __init__(self, paths: list[str], seed: int, rank: int = 0, world: int = 1):
        if len(paths) < world:
            raise ConfigError(f"data.path: {len(paths)} shards cannot be split over {world} processes; write at least "
                              f"as many shards as processes (better: many per process)")
        self.paths, self.seed, self.rank, self.world = paths, int(seed), rank, world
        self.epoch = self.shard = self.sample = 0  # the position: the next sample to read
        self.skipped = 0
        self._open: tuple | None = None  # (epoch, shard, path, key order, members) of the shard being read

    def _rng(self, *salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, *salt)) & 0x7FFF_FFFF_FFFF_FFFF)

    def shards(self, epoch: int) -> list[str]:
        order = torch.randperm(len(self.paths), generator=self._rng(epoch)).tolist()
        return [self.paths[i] for i in order[self.rank::self.world]]

    def _index(self) -> tuple[str, list[str], dict]:
        """The shard at the position: its path, its keys in this epoch's order, and its members."""
        if self._open is None or self._open[:2] != (self.epoch, self.shard):
            path = self.shards(self.epoch)[self.shard]
            try:
                members = _members(path)
            except (tarfile.TarError, OSError):
                members = {}
                self.skipped += 1  # an unreadable shard counts once, as one skipped item
            keys = list(members)
            perm = torch.randperm(len(keys), generator=self._rng(self.epoch, self.paths.index(path))).tolist()
            self._open = (self.epoch, self.shard, path, [keys[i] for i in perm], members)
        return self._open[2:]

    def __next__(self) -> tuple[str, dict[str, bytes]]:
        per_epoch, passed = len(self.paths[self.rank::self.world]), 0
        while True:
            path, keys, members = self._index()
            if self.sample < len(keys):
                key = keys[self.sample]
                self.sample += 1
                with tarfile.open(path, "r:") as tar:
                    return key, {ext: tar.extractfile(m).read() for ext, m in members[key].items()}
            self.shard, self.sample, passed = self.shard + 1, 0, passed + 1
            if self.shard == per_epoch:
                self.epoch, self.shard = self.epoch + 1, 0
            if passed > 2 * per_epoch:  # a whole epoch of this process's shards went by without a sample
                raise ConfigError(f"data.path: the {per_epoch} shards of process {self.rank} hold no readable "
                                  "sample (image or latent + .txt caption members); check them with `tar tf <shard>`")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "sample": self.sample, "skipped": self.skipped,
                "rank": self.rank, "world": self.world, "num_shards": len(self.paths)}

    def load_state_dict(self, state: dict) -> None:
        if (state["world"], state["num_shards"]) != (self.world, len(self.paths)):
            raise ConfigError(f"data.path: the checkpoint's stream position is for {state['num_shards']} shards over "
                              f"{state['world']} processes, this run has {len(self.paths)} over {self.world}; resume "
                              "with the same shards and process count")
        self.epoch, self.shard, self.sample, self.skipped = (state[k] for k in ("epoch", "shard", "sample", "skipped"))


class WebData:
    """Batches ``Batch(noise, cond, real)`` of this process's rows from a ShardStream: ``real`` = the samples'
    latents (the precomputed member when present, else the image through the teacher's VAE), ``cond`` = the
    captions through the text conditioner. ``per_rank``: the trainer asks each process for its own rows."""

    per_rank = True

    def __init__(self, stream: ShardStream, conditioner, codec, image_size: int, latent_shape: tuple[int, ...]):
        self.stream, self.cond, self.codec, self.size = stream, conditioner, codec, image_size
        self.data_shape = tuple(latent_shape)
        self.channels = int(getattr(codec.vae.config, "in_channels", 3))  # 1: a greyscale VAE (the digits teacher)
        self.delivered: list[str] | None = None  # keys handed out, when a caller asks for the record (tests, audits)

    def _decode(self, files: dict[str, bytes]) -> tuple[torch.Tensor | None, torch.Tensor | None, str, dict | None]:
        """(image or None, latent or None, caption, text-encoder fields or None) of one sample."""
        caption = files.get("txt", b"").decode("utf-8", errors="strict").strip()
        if not caption:
            raise ValueError("no caption")
        fields = self._cached(files, EMB_EXT, "text_encoder", self.cond.text.name) if EMB_EXT in files else None
        if LATENT_EXT in files:
            z = self._cached(files, LATENT_EXT, "codec", self.codec.name)["latent"].float()
            if tuple(z.shape) != self.data_shape:
                raise ValueError(f"latent of shape {tuple(z.shape)}")
            return None, z, caption, fields
        ext = next((e for e in IMAGE_EXTS if e in files), None)
        if ext is None:
            raise ValueError("no image")
        return image_tensor(files[ext], self.size, self.channels), None, caption, fields

    @staticmethod
    def _cached(files: dict[str, bytes], ext: str, what: str, expected: str) -> dict[str, torch.Tensor]:
        """A member onestep cache wrote, refused in one line when another codec / encoder made it."""
        from safetensors.torch import load

        data = files[ext]
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # the safetensors layout
        made_by = header.get("__metadata__", {}).get(what)
        if made_by is not None and made_by != expected:
            raise ConfigError(f"data.path: a .{ext} member was cached with {what} {made_by[:12]}..., this run's "
                              f"teacher has {expected[:12]}...; rerun onestep cache with this teacher")
        return load(files[ext])

    def samples(self, n: int) -> list[tuple[str, torch.Tensor | None, torch.Tensor | None, str]]:
        out = []
        while len(out) < n:
            key, files = next(self.stream)
            try:
                out.append((key, *self._decode(files)))
            except ConfigError:  # shards made for another teacher: not a corrupt sample
                raise
            except (ValueError, OSError, UnicodeDecodeError, KeyError):  # PIL raises OSError subclasses
                self.stream.skipped += 1
        return out

    @torch.no_grad()
    def batch(self, n: int, device) -> Batch:
        rows = self.samples(n)  # (key, image, latent, caption, fields)
        if self.delivered is not None:
            self.delivered += [r[0] for r in rows]
        latents: list[torch.Tensor | None] = [r[2] for r in rows]
        todo = [i for i, r in enumerate(rows) if r[2] is None]
        if todo:
            images = torch.stack([rows[i][1] for i in todo]).to(self.codec.device, self.codec.dtype)
            for i, z in zip(todo, self.codec.encode(images).float().cpu()):
                latents[i] = z
        texts = [r[3] for r in rows]
        self.cond.cache.ensure([t for t, r in zip(texts, rows) if r[4] is None])  # captions without cached fields
        per_row = [r[4] if r[4] is not None else load_file(str(self.cond.cache.path(r[3]))) for r in rows]
        fields = {k: torch.stack([row[k] for row in per_row]) for k in per_row[0]}
        cond = self.cond.text.assemble(texts, fields, self.cond.negative_prompt, self.size, self.size)
        noise = torch.randn(n, *self.data_shape)
        return Batch(noise=noise.to(device), cond=cond.to(device), real=torch.stack(latents).to(device))

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def stats(self) -> dict[str, float]:
        return {"data/skipped": float(self.stream.skipped)}
