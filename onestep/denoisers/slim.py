"""A generator whose architecture differs from the teacher's (``generator.arch``): a smaller student, as SlimFlow
(Zhu, Liu & Liu 2024, "SlimFlow: Training Smaller One-Step Diffusion Models with Rectified Flow", ECCV) trains.

``generator.arch`` is either
    a spec of changes to the teacher network's own construction arguments, ``key=value`` pairs joined by commas, each
        value read as YAML (``hidden=64,depth=2`` for the project's MLP; ``block_out_channels=[16,32]`` or
        ``mid_block_type=null`` for a diffusers UNet: its config keys), or
    the path of a diffusers config .json (what ``save_pretrained`` writes as config.json) of the teacher network's
        class: UNet2DModel, UNet2DConditionModel, SD3 / Flux transformers. The class must be the teacher's, because the
        student is exported into the teacher's pipeline-folder layout, whose model_index.json names that class.
The student starts from the teacher where shapes allow: every tensor (parameter or buffer) whose name and shape match
the teacher's is copied, the rest keep their fresh initialisation. Dropping blocks (fewer ``depth`` / ``layers_per_block``,
``mid_block_type=null``) therefore keeps a subset of the teacher's blocks with their weights, BK-SDM's block-removal
compression (Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion", Sec. 3.1: the
student keeps the teacher's remaining blocks and is initialised from them).

A network that can be rebuilt this way defines ``with_arch(changes, replace) -> Denoiser``: a fresh network of its own
kind, its construction arguments updated with ``changes`` (``replace``: ``changes`` is a whole diffusers config).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from onestep.denoisers.base import Denoiser
from onestep.errors import ConfigError

KEY = "generator.arch"


def parse_arch(arch: str) -> tuple[dict, bool]:
    """(changes, replace): a .json path's whole config (replace=True), or the ``key=value,...`` spec's changes."""
    if arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise ConfigError(f"{KEY}='{arch}' is no file; pass the path of a diffusers config .json or a spec like "
                              f"{KEY}='hidden=64,depth=2'")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{KEY}='{arch}' is not JSON ({e.msg} at line {e.lineno}); pass a diffusers config "
                              "as save_pretrained writes it") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{KEY}='{arch}' holds a JSON {type(config).__name__}, not a config object; pass a "
                              "diffusers config as save_pretrained writes it")
        return config, True
    changes: dict = {}
    for item in _split(arch):
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise ConfigError(f"{KEY}='{arch}': '{item}' is not key=value; pass {KEY}='hidden=64,depth=2' (on the "
                              "command line in quotes) or the path of a diffusers config .json")
        try:
            changes[name.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{KEY}='{arch}': the value of '{name.strip()}' is not YAML ('{value}')") from None
    return changes, False


def _split(spec: str) -> list[str]:
    """The spec's items: commas inside brackets (``block_out_channels=[16,32]``) belong to the value."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    items.append(spec[start:])
    return [s.strip() for s in items if s.strip()]


@torch.no_grad()
def copy_matching(source: torch.nn.Module, target: torch.nn.Module) -> tuple[int, int]:
    """Copy every tensor of ``source``'s state dict into ``target``'s where name and shape agree: (copied, fresh),
    counted over ``target``'s tensors."""
    have = source.state_dict()
    copied = fresh = 0
    for name, tensor in target.state_dict().items():
        src = have.get(name)
        if src is not None and src.shape == tensor.shape:
            tensor.copy_(src.to(tensor.dtype))
            copied += 1
        else:
            fresh += 1
    return copied, fresh


def student_of(init: Denoiser, arch: str) -> tuple[Denoiser, int, int]:
    """The network ``arch`` describes, initialised from ``init`` where shapes allow: (network, copied, fresh). It takes
    ``init``'s device and training mode; the caller seeds the fresh tensors."""
    if not hasattr(init, "with_arch"):
        raise ConfigError(f"{KEY}='{arch}': the teacher's {type(init).__name__} cannot be rebuilt with another "
                          "architecture (the project's MLP and diffusers UNets / SD3 / Flux transformers can); leave "
                          f"{KEY} empty")
    changes, replace = parse_arch(arch)
    net = init.with_arch(changes, replace)
    copied, fresh = copy_matching(init, net)
    device = next((p.device for p in init.parameters()), torch.device("cpu"))
    net.to(device).train(init.training).requires_grad_(any(p.requires_grad for p in init.parameters()))
    return net, copied, fresh


def rebuilt_diffusers(model, changes: dict, replace: bool):
    """A fresh diffusers model of ``model``'s class from its config updated with ``changes`` (or ``changes`` itself:
    ``replace``), in ``model``'s dtype; bad keys and configs are one-line ConfigErrors naming generator.arch."""
    cls = type(model)
    named = changes.get("_class_name", cls.__name__)
    if named != cls.__name__:
        raise ConfigError(f"{KEY}: a {named} config, but the teacher's network is a {cls.__name__}; the student is "
                          f"exported into the teacher's pipeline folder, which names {cls.__name__}: pass a "
                          f"{cls.__name__} config")
    if not replace:
        unknown = sorted(k for k in changes if k not in model.config)
        if unknown:
            raise ConfigError(f"{KEY}: {unknown} are not {cls.__name__} config keys (e.g. "
                              f"{sorted(k for k in model.config if not k.startswith('_'))[:6]})")
    # a model's config lists the keys it left at their defaults (_use_default_values), and from_config builds those
    # from the defaults again, whatever value the config holds: mid_block_type=null (BK-SDM's mid-block removal) would
    # come back as the default mid-block. Without the list every value is taken as given.
    config = {k: v for k, v in (changes if replace else {**dict(model.config), **changes}).items()
              if k != "_use_default_values"}
    try:
        net = cls.from_config(config)
        return net if net.dtype == model.dtype else net.to(model.dtype)
    except Exception as e:  # noqa: BLE001 - diffusers raises ValueError, TypeError, AssertionError, ... for bad configs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{KEY}: {cls.__name__} cannot be built from that config ({type(e).__name__}: "
                          f"{first[:200]})") from None
