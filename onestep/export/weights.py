"""The trained student's network, as plain diffusers weights: found behind the run's generator view, LoRA merged
into the base weights (or kept as adapter weights in diffusers' LoRA format)."""

from __future__ import annotations

import torch
from torch import nn

from onestep.errors import ConfigError


def student_model(generator) -> tuple[nn.Module, str | None]:
    """(the diffusers model inside the run's generator view, the LoRA adapter name or None for a full copy)."""
    from diffusers import ModelMixin

    net = getattr(generator, "net", generator)
    models = [m for m in net.modules() if isinstance(m, ModelMixin)]
    if not models:
        raise ConfigError(f"the run's generator ({type(net).__name__}) holds no diffusers model, so there is nothing "
                          "diffusers could load; export works for diffusers teachers (digits, sd15, sdxl)")
    return models[0], getattr(generator, "adapter", None)


def _tuners(model: nn.Module, adapter: str) -> dict[str, nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {})}


def merged_state_dict(model: nn.Module, adapter: str | None) -> dict[str, torch.Tensor]:
    """fp32 weights of ``model`` with the named adapter merged in (W + scale B A) and every LoRA tensor dropped,
    keyed as the plain diffusers model class expects."""
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value.detach().float().cpu().clone()
    if adapter is not None:
        for name, layer in _tuners(model, adapter).items():
            delta = layer.get_delta_weight(adapter).detach().float().cpu()
            out[f"{name}.weight"] = out[f"{name}.weight"] + delta
    return out


def plain_model(model: nn.Module, adapter: str | None) -> nn.Module:
    """A fresh instance of the model's own diffusers class holding the merged weights (strictly loaded)."""
    fresh = type(model).from_config(model.config)
    fresh.load_state_dict(merged_state_dict(model, adapter), strict=True)
    return fresh.float().eval()


def lora_state_dict(model: nn.Module, adapter: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter's weights in peft's key format (``<module>.lora_A.weight``) and its LoraConfig fields (rank,
    alpha, target modules): what diffusers' ``save_lora_weights`` / ``load_lora_weights`` exchange."""
    tuners = _tuners(model, adapter)
    if not tuners:
        raise ConfigError(f"the generator has no LoRA adapter '{adapter}'; lora_only=true needs a LoRA student "
                          "(generator.lora.rank)")
    weights, ranks, alphas = {}, set(), set()
    for name, layer in tuners.items():
        weights[f"{name}.lora_A.weight"] = layer.lora_A[adapter].weight.detach().float().cpu().clone()
        weights[f"{name}.lora_B.weight"] = layer.lora_B[adapter].weight.detach().float().cpu().clone()
        ranks.add(int(layer.r[adapter]))
        alphas.add(float(layer.lora_alpha[adapter]))
    if len(ranks) != 1 or len(alphas) != 1:
        raise ConfigError(f"the adapter '{adapter}' mixes ranks {sorted(ranks)} / alphas {sorted(alphas)}; "
                          "diffusers' LoRA format holds one")
    config = {"r": ranks.pop(), "lora_alpha": alphas.pop(), "target_modules": sorted(tuners), "init_lora_weights": False}
    return weights, config
