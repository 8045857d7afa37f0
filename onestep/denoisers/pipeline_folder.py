"""Local diffusers pipeline folders (what ``<Pipeline>.save_pretrained`` writes), shared by the SD-family and
flow-transformer adapters (denoisers/sd.py, denoisers/flow.py): the layout each teacher kind needs, the checks that
turn a wrong ``teacher.path`` into a one-line error naming the fix, offline component loading, and the content hash
that names caches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from onestep.conditioning import Cond

from onestep.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    #: sub-folders the adapter loads, in the pipeline's order
    subfolders: tuple[str, ...]
    #: ``_class_name`` values of model_index.json that write this layout
    pipelines: tuple[str, ...]
    #: how a hint names such a folder ("an SDXL folder? use teacher=sdxl")
    label: str


#: teacher kind -> its folder layout, registered by the teacher families (onestep.teachers: each family file
#: declares its layouts; this module only checks folders against them)
LAYOUTS: dict[str, Layout] = {}


def register_layout(kind: str, layout: Layout) -> None:
    LAYOUTS[kind] = layout


def layout_of(kind: str) -> Layout:
    if kind not in LAYOUTS:
        raise ConfigError(f"teacher '{kind}' has no pipeline-folder layout registered (known: {sorted(LAYOUTS)}); "
                          "import onestep.teachers, or register the family that reads such folders")
    return LAYOUTS[kind]


def layout_text(kind: str) -> str:
    return "model_index.json, " + ", ".join(f"{f}/" for f in layout_of(kind).subfolders)


def _pipeline_class(folder: Path) -> str | None:
    try:
        return json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def check_pipeline_folder(path, kind: str, by_class: bool = False) -> Path:
    """``path`` as a folder holding what teacher=``kind`` loads (``kind`` a registered layout); a folder that lacks
    some of it is named as another kind's when its sub-folders fit that kind. ``by_class`` also refuses a folder whose
    model_index.json names another kind's pipeline, for layouts that another kind's folder contains whole (an SD3
    folder has every sub-folder Flux needs)."""
    layout = layout_of(kind)
    fix = f"pass teacher.path=<local diffusers pipeline folder ({layout_text(kind)})>"
    if path is None or str(path) == "":
        raise ConfigError(f"teacher.path is not set; {fix}")
    folder = Path(path)
    if not folder.exists():
        raise ConfigError(f"teacher.path '{folder}' does not exist; {fix}")
    if not folder.is_dir():
        raise ConfigError(f"teacher.path '{folder}' is not a folder; {fix}")
    if not (folder / "model_index.json").is_file():
        raise ConfigError(f"teacher.path '{folder}' is not a diffusers pipeline folder (no model_index.json); {fix}")
    written_by = _pipeline_class(folder)
    missing = [f"{f}/" for f in layout.subfolders if not (folder / f).is_dir()]
    if missing:
        fits = [k for k, lay in LAYOUTS.items() if k != kind and all((folder / f).is_dir() for f in lay.subfolders)]
        fits.sort(key=lambda k: written_by not in LAYOUTS[k].pipelines)  # the kind whose pipeline wrote it first
        hint = f" ({LAYOUTS[fits[0]].label} folder? use teacher={fits[0]})" if fits else ""
        raise ConfigError(f"teacher.path '{folder}' has no {', '.join(missing)} needed by teacher={kind}{hint}; "
                          f"expected a diffusers {kind} pipeline folder ({layout_text(kind)})")
    if by_class and written_by not in layout.pipelines:
        other = next((k for k, lay in LAYOUTS.items() if written_by in lay.pipelines), None)
        if other is not None:  # a pipeline class onestep does not know (a custom or derived one) is given the benefit
            raise ConfigError(f"teacher.path '{folder}' holds a {written_by} (model_index.json), not a {kind} "
                              f"pipeline; use teacher={other}")
    return folder


def load_component(folder: Path, sub: str, kind: str, cls, **kwargs):
    """``cls.from_pretrained(folder, subfolder=sub)`` offline, without transformers' per-file progress bar; any
    failure is a one-line ConfigError."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(str(folder), subfolder=sub, local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - diffusers, transformers, safetensors and json each raise their own
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"teacher.path '{folder}': cannot load {sub} ({type(e).__name__}: {first}); "
                          f"expected a diffusers {kind} pipeline folder") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def frozen(module: torch.nn.Module, device) -> torch.nn.Module:
    return module.to(device).eval().requires_grad_(False)


def sha1_files(folder: Path, subs, salt: str = "") -> str:
    """sha1 of every file's relative path and bytes under the sub-folders ``subs`` (cache identities)."""
    h = hashlib.sha1(salt.encode())
    for sub in subs:
        for f in sorted(p for p in (folder / sub).rglob("*") if p.is_file()):
            h.update(f.relative_to(folder).as_posix().encode() + b"\0")
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


class VAECodec:
    """What the VAE codecs share (sd.LatentCodec, wan.WanCodec, cogvideox.VideoCodec): the frozen ``vae``'s device and
    dtype, and ``name``, the identity that latent caches are filed under. A subclass sets ``vae``, ``prefix`` and
    ``normalisation`` (the constants that turn the VAE's output into diffusion data, part of the identity)."""

    vae: torch.nn.Module
    prefix: str = "vae"

    @property
    def normalisation(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} must say which constants normalise its latents")

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @cached_property
    def name(self) -> str:
        """sha1 of the normalisation and every weight's bytes."""
        h = hashlib.sha1(self.normalisation.encode())
        for key, w in self.vae.state_dict().items():
            h.update(key.encode() + b"\0")
            h.update(w.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return f"{self.prefix}-{h.hexdigest()[:16]}"


class PromptEncoder:
    """What the pipelines' text encoders share (sd.TextEncoder, flow.FlowTextEncoder, sana.SanaTextEncoder): a
    subclass defines ``encode(prompts) -> fields`` and may override ``null_row`` (the unconditional branch's
    fields) and ``assemble`` (extra per-image fields such as SDXL's size ids)."""

    _null: dict

    def null_row(self, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        """The encoded negative prompt ("" when none), one row: most pipelines encode it as a prompt."""
        return self.encode([negative_prompt or ""])

    def null_fields(self, negative_prompt: str | None = None) -> dict[str, torch.Tensor]:
        if negative_prompt not in self._null:
            self._null[negative_prompt] = self.null_row(negative_prompt)
        return dict(self._null[negative_prompt])

    def cond(self, prompts, negative_prompt: str | None = None, height: int | None = None,
             width: int | None = None) -> Cond:
        prompts = list(prompts)
        return self.assemble(prompts, self.encode(prompts), negative_prompt, height, width)

    def assemble(self, prompts: list[str], fields: dict[str, torch.Tensor], negative_prompt: str | None = None,
                 height: int | None = None, width: int | None = None) -> Cond:
        """The Cond of encoded ``fields`` (fresh from ``encode`` or from a cache) with the null row of
        ``negative_prompt``."""
        return Cond(dict(fields), null=self.null_fields(negative_prompt), texts=list(prompts),
                    null_text=negative_prompt or "")


def require_prompts(cond, encoder: str, kind: str, fields: tuple[str, ...] = ("prompt_embeds",)) -> None:
    """A text-to-image network's conditioning must be a Cond with the prompt fields its text encoder makes."""
    if not isinstance(cond, Cond) or any(f not in cond for f in fields):
        from onestep.errors import ConfigError

        raise ConfigError(f"a text-to-image teacher needs prompt conditioning (a Cond from {encoder}.cond), got "
                          f"{cond!r}; pass data with prompts (teacher={kind})")


def read_scheduler_config(folder, expected: str = "a diffusers pipeline folder") -> tuple[dict, str]:
    """(scheduler/scheduler_config.json as a dict, the phrase naming it for error messages); an unreadable file is a
    one-line ConfigError."""
    import json

    from onestep.errors import ConfigError

    where = f"teacher.path '{folder}': scheduler/scheduler_config.json"
    try:
        return json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text()), where
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where} cannot be read ({type(e).__name__}); expected {expected}") from None
