"""`onestep cache`: VAE latents and text embeddings computed once, across every process of a launch, so training
never runs the VAE encoder or the text encoder.

- Captioned images (``data=image_text`` folder or ``data=webdataset`` shards) become tar shards ``<out>/00000.tar ...``
  that ``data=webdataset`` reads: per sample ``<key>.latent.safetensors`` (the teacher codec's latent), ``<key>.txt``
  (the caption) and ``<key>.emb.safetensors`` (the text encoder's fields); each file's metadata names the codec / the
  encoder it came from, so a run with another teacher refuses the shards in one line instead of training on them.
  The input is cut in its own order into shards of ``shard_size`` samples; process r of W writes shards j with
  j % W == r. A shard is written to a temporary name and renamed when complete, so a rerun after a crash skips the
  shards that exist and redoes only the rest. Inputs that do not decode are skipped and counted.
- A prompt file (``data=prompts``) fills the run's text-embedding cache (``data.cache``), process r encoding prompts
  r, r + W, ...: the cache every later run on this teacher reads.

Process 0 writes ``<out>/cache.json`` (the shard pattern to pass as data.path, counts, the codec and encoder ids) after
every process has finished.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from onestep.data.shards import IMAGE_EXTS, _members, image_tensor
from onestep.errors import ConfigError
from onestep.progress import bar

ENCODE_BATCH = 32


@dataclass
class Item:
    key: str
    caption: str | None  # None: the input had no readable caption
    image: bytes | Path | None  # encoded image bytes (shards) or a file (folders); None: no image


def _folder_items(pairs) -> list[Item]:
    return [Item(p.stem, caption, p) for p, caption in pairs]


def _shard_items(paths: list[str]) -> list[Item]:
    items = []
    for path in paths:
        try:
            members = _members(path)
        except (tarfile.TarError, OSError):
            items.append(Item(f"{Path(path).name}/", None, None))  # a broken shard: one skipped item
            continue
        with tarfile.open(path, "r:") as tar:
            for key, files in members.items():
                ext = next((e for e in IMAGE_EXTS if e in files), None)
                caption = tar.extractfile(files["txt"]).read() if "txt" in files else None
                image = tar.extractfile(files[ext]).read() if ext else None
                items.append(Item(key.replace("/", "_"), None if caption is None else caption.decode("utf-8", "replace"),
                                  image))
    return items


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@torch.no_grad()
def _write_shard(path: Path, items: list[Item], setup) -> tuple[int, int]:
    """One output shard (atomically); returns (samples written, inputs skipped)."""
    from safetensors.torch import save

    codec, cond = setup.codec, setup.conditioner
    channels = int(getattr(codec.vae.config, "in_channels", 3))
    good, images = [], []
    for item in items:
        if not (item.caption or "").strip() or item.image is None:
            continue
        try:
            images.append(image_tensor(item.image, cond.size, channels))
            good.append(item)
        except (OSError, ValueError):  # PIL's errors for bytes that are not an image
            continue
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tarfile.open(tmp, "w") as tar:
        for i in range(0, len(good), ENCODE_BATCH):
            part = good[i:i + ENCODE_BATCH]
            x = torch.stack(images[i:i + ENCODE_BATCH]).to(codec.device, codec.dtype)
            latents = codec.encode(x).float().cpu()
            fields = cond.text.encode([it.caption.strip() for it in part])
            for j, it in enumerate(part):
                _add(tar, f"{it.key}.latent.safetensors",
                     save({"latent": latents[j].contiguous()}, metadata={"codec": codec.name}))
                _add(tar, f"{it.key}.txt", it.caption.strip().encode("utf-8"))
                _add(tar, f"{it.key}.emb.safetensors",
                     save({k: v[j].cpu().contiguous() for k, v in fields.items()},  # as the embedding cache
                          metadata={"text_encoder": cond.text.name}))
    tmp.replace(path)
    return len(good), len(items) - len(good)


def cache(cfg, out: str | Path | None, shard_size: int = 1000, progress: bool = True) -> dict:
    """Cache ``cfg``'s data for its teacher (see the module docstring); returns what ``cache.json`` holds."""
    from accelerate import PartialState

    from onestep.experiment import check_data_kind, load_teacher, read_data_files

    # under torchrun / accelerate launch: the process group (without CUDA only when told cpu=True, as the trainer)
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    check_data_kind(cfg)
    kind = cfg.data.kind
    if kind not in ("image_text", "webdataset", "prompts"):
        raise ConfigError(f"onestep cache reads data=image_text, data=webdataset or data=prompts, not data={kind}")
    if kind != "prompts" and not out:
        raise ConfigError("out is not set; pass out=<folder for the cached shards>")
    if shard_size < 1:
        raise ConfigError(f"shard_size={shard_size} must be at least 1 (samples per output shard)")
    files = read_data_files(cfg.data)
    out = Path(out) if out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    setup = load_teacher(cfg, out or Path(cfg.out_root), progress and rank == 0)
    if setup.conditioner is None or setup.codec is None:
        raise ConfigError(f"teacher={cfg.teacher.kind} has no text encoder and VAE to cache for")
    if kind == "prompts":
        mine = files[rank::world]
        encoded = setup.conditioner.cache.ensure(mine)
        state.wait_for_everyone()
        return {"prompts": len(files), "encoded_here": encoded, "cache": str(setup.conditioner.cache.dir)}
    items = _folder_items(files) if kind == "image_text" else _shard_items(files)
    if not items:
        raise ConfigError(f"data.path '{cfg.data.path}' holds no samples to cache")
    chunks = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    written = skipped = 0
    mine = [j for j in range(len(chunks)) if j % world == rank]
    for j in bar(mine, desc=f"cache (process {rank})", disable=not progress):
        path = out / f"{j:05d}.tar"
        if path.is_file():  # a rerun: this shard was completed before
            continue
        n, bad = _write_shard(path, chunks[j], setup)
        written, skipped = written + n, skipped + bad
    counts = torch.tensor([written, skipped], dtype=torch.int64)
    if world > 1:
        torch.distributed.all_reduce(counts)
    state.wait_for_everyone()
    info = {"pattern": str(out / (f"{{00000..{len(chunks) - 1:05d}}}.tar" if len(chunks) > 1 else "00000.tar")),
            "shards": len(chunks), "inputs": len(items), "written_now": int(counts[0]), "skipped_now": int(counts[1]),
            "codec": setup.codec.name, "text_encoder": setup.conditioner.text.name, "teacher": str(cfg.teacher.path)}
    if rank == 0:
        tmp = out / "cache.json.tmp"
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(out / "cache.json")
    return info
