"""``generator.attention``: which attention implementation a diffusers-model generator runs.

    default    the model's own processors (PyTorch SDPA). Objectives that take a JVP run it under
               SDPBackend.MATH, the only SDPA backend with a forward-mode rule: O(N^2) memory. The only choice
               for models with linear attention (Sana), which the kernels below would turn into softmax attention
    math       onestep.kernels' MATH attention (plain ops; JVP, backward and higher orders all work)
    jvp_flash  onestep.kernels' fused attention: Triton on GPU, blockwise PyTorch on CPU; O(N) memory for
               forward, backward and the forward-mode JVP that sCM / rCM need

Models without diffusers attention modules (the MLP of the GMM experiments) are left as they are.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from onestep.errors import ConfigError
from onestep.schedules import quiet_forward_ad

ATTENTION = ("default", "math", "jvp_flash")
_BACKEND = {"math": "math", "jvp_flash": "auto"}


def check_attention(option: str) -> None:
    if option not in ATTENTION:
        raise ConfigError(f"generator.attention '{option}' is unknown; choose one of {ATTENTION}")


def has_diffusers_attention(model: nn.Module) -> bool:
    return any(hasattr(m, "set_processor") and hasattr(m, "processor") for m in model.modules())


def set_attention(model: nn.Module, option: str) -> nn.Module:
    """Route ``model``'s diffusers attention through ``option`` (in place); returns the model."""
    check_attention(option)
    if option == "default" or not has_diffusers_attention(model):
        return model
    # the kernels compute softmax attention: swapping them in for a linear attention (Sana's self-attention) would
    # change the model, and a linear attention needs no kernel (it is O(N) and plain ops, forward-mode AD included)
    linear = next((name for name, m in model.named_modules()
                   if "LinearAttn" in type(getattr(m, "processor", None)).__name__), None)
    if linear is not None:
        raise ConfigError(f"generator.attention={option} would replace the linear attention of {linear} with softmax "
                          "attention; use generator.attention=default (linear attention needs no JVP kernel)")
    from onestep.kernels import set_jvp_attention

    # on a Denoiser that wraps diffusers models this sets the processor on every attention submodule
    return set_jvp_attention(model, backend=_BACKEND[option])


@contextmanager
def jvp_attention():
    """Context for a forward-mode JVP: SDPA restricted to its MATH backend (the fused CPU/GPU SDPA kernels
    have no forward-AD rule); models routed through onestep.kernels do not call SDPA and are unaffected."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    quiet_forward_ad()
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def use_memory_efficient_attention(model: nn.Module, device) -> str:
    """xformers' memory-efficient attention in every diffusers model inside ``model`` when xformers is installed
    and the model runs on a GPU (xformers has no CPU kernels); returns which attention the model now runs."""
    if not has_diffusers_attention(model):
        return "no attention layers"
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or built for another torch: SDPA it is
        return "PyTorch SDPA (xformers not installed: pip install -e .[xformers])"
    if torch.device(device).type != "cuda":
        return "PyTorch SDPA (xformers has no CPU kernels)"
    for m in model.modules():
        if hasattr(m, "enable_xformers_memory_efficient_attention") and hasattr(m, "config"):
            m.enable_xformers_memory_efficient_attention()
    return "xformers memory-efficient attention"
