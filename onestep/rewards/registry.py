"""``reward=<name>``: a differentiable reward of decoded images and their prompts, ``reward(images, prompts) -> (N,)``
(higher is better), from local weights only. What objectives that tune toward a reward and the evaluation's
``reward`` column call; one file per reward, registered here by name.

    none              no reward
    digits_class      the shipped digits classifier's log-probability of the prompted digit (digits.py)
    digits_diversity  per-sample diversity among the samples of each prompt, digits features (digits.py)
    clip              CLIP score: open_clip cosine of image and prompt (clip.py; reward.weights, reward.model)
    clip_diversity    per-sample diversity among the samples of each prompt, CLIP image embedding (diversity.py)
    imagereward       ImageReward (imagereward.py; reward.weights = ImageReward.pt, reward.tokenizer)
    hpsv2             HPSv2 (hpsv2.py; reward.weights = HPS_v2*.pt, reward.model, default ViT-H-14)
    pkg.module:attr   your own reward: ``reward.name=my_pkg.my_rewards:make_reward`` imports ``my_pkg.my_rewards``
                      and calls ``make_reward(rc)`` (rc: this reward section, so reward.weights / model / tokenizer
                      reach it), which returns an nn.Module with ``forward(images, prompts) -> (N,)``
"""

from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from onestep.errors import ConfigError


def _digits_class(rc) -> nn.Module:
    from onestep.rewards.digits import DigitsClass

    return DigitsClass(rc.weights)


def _digits_diversity(rc) -> nn.Module:
    from onestep.rewards.digits import DigitsDiversity

    return DigitsDiversity(rc.weights)


def _clip(rc) -> nn.Module:
    from onestep.rewards.clip import ClipScore

    if not rc.model:
        raise ConfigError("reward=clip needs reward.model=<open_clip architecture or model-config .json> beside "
                          "reward.weights=<its local checkpoint>")
    return ClipScore(rc.model, rc.weights)


def _clip_diversity(rc) -> nn.Module:
    from onestep.rewards.diversity import ClipDiversity

    if not rc.model:
        raise ConfigError("reward=clip_diversity needs reward.model=<open_clip architecture or model-config .json> "
                          "beside reward.weights=<its local checkpoint>")
    return ClipDiversity(rc.model, rc.weights)


def _imagereward(rc) -> nn.Module:
    from onestep.rewards.imagereward import ImageReward

    return ImageReward.load(rc.weights, rc.tokenizer, key="reward.weights")


def _hpsv2(rc) -> nn.Module:
    from onestep.rewards.hpsv2 import MODEL, HPSv2

    return HPSv2(rc.weights, rc.model or MODEL, key="reward.weights")


REWARDS: dict[str, Callable[..., nn.Module]] = {"digits_class": _digits_class, "digits_diversity": _digits_diversity,
                                                "clip": _clip, "clip_diversity": _clip_diversity,
                                                "imagereward": _imagereward, "hpsv2": _hpsv2}


#: what separates a user reward's module from its factory in reward.name (``my_pkg.my_rewards:make_reward``)
IMPORT_SEP = ":"


def imported_reward(rc) -> nn.Module:
    """``reward.name=module:factory``: the module imported (from PYTHONPATH or an installed package), the factory called
    with the reward section; what it returns must be an nn.Module (its forward maps (images, prompts) to (N,))."""
    module, _, attr = rc.name.partition(IMPORT_SEP)
    try:
        factory = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ConfigError(f"reward.name={rc.name}: cannot import '{module}' ({e}); put its folder on PYTHONPATH or pip "
                          "install it") from None
    except AttributeError:
        raise ConfigError(f"reward.name={rc.name}: module '{module}' has no '{attr}'; pass reward.name=<module>:<the "
                          "factory it defines>") from None
    reward = factory(rc)
    if not isinstance(reward, nn.Module):
        raise ConfigError(f"reward.name={rc.name} returned a {type(reward).__name__}, not a torch nn.Module; the factory "
                          "must return a module whose forward(images, prompts) gives one reward per image")
    return reward


def build_reward(rc) -> nn.Module | None:
    """The reward ``rc`` (the config's reward section) names, in eval mode with frozen weights; None for none."""
    if rc.name in (None, "none"):
        return None
    if IMPORT_SEP in rc.name:
        return imported_reward(rc).eval().requires_grad_(False)
    if rc.name not in REWARDS:
        raise ConfigError(f"reward={rc.name!r} is not a reward; pick one of none, {', '.join(sorted(REWARDS))}, or "
                          f"your own as reward.name=<module>{IMPORT_SEP}<factory>")
    return REWARDS[rc.name](rc).eval().requires_grad_(False)
