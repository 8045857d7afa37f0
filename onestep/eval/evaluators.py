"""The evaluator of a run, built by eval from the experiment's setup: ``make_evaluator(cfg, setup)``. The
teacher family names its default protocol (``Family.evaluation``), ``eval.protocol`` picks another; the protocol's builder reads what the setup holds
(the exact mixture, the codec) and the eval section. experiment knows nothing of evaluators.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from onestep import teachers
from onestep.errors import ConfigError
from onestep.data.setup import Setup


class Evaluator(Protocol):
    #: the metric that ranks models (lower is better), e.g. "sliced_w2" or "fd"
    headline: str

    def metrics(self, x: torch.Tensor, cond: torch.Tensor | None) -> dict: ...

    def plot(self, path: Path, panels: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None: ...


def _mixture(cfg, setup):
    from onestep.eval.gmm_eval import GMMEvaluator

    return GMMEvaluator(setup.distribution)


def _digit_images(cfg, setup):
    """FD in the shipped digits feature space against every digit at the teacher's size."""
    from onestep.data.digits import load_digits_tensors
    from onestep.eval.digits_eval import DigitsEvaluator

    return DigitsEvaluator(load_digits_tensors("all", setup.teacher.data_shape[-1])[0], setup.num_classes)


def _text_images(cfg, setup):
    if cfg.eval.features == "digits":  # the shipped text-to-image digits teacher
        from onestep.eval.digits_eval import DigitsTextEvaluator

        return DigitsTextEvaluator(setup.codec, diversity=cfg.eval.rewards.diversity)
    from onestep.eval.t2i_eval import TextImageEvaluator

    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.trainer.cpu else "cpu")
    return TextImageEvaluator(setup.codec, cfg.eval, cfg.out_root, device)


def _text_videos(cfg, setup):
    if cfg.eval.features == "moving_digits":  # the shipped text-to-video moving-digits teacher
        from onestep.eval.moving_digits_eval import MovingDigitsEvaluator

        return MovingDigitsEvaluator(setup.codec)
    from onestep.eval.video_eval import TextVideoEvaluator

    return TextVideoEvaluator(setup.codec)


def _coco(protocol: str):
    """Zero-shot COCO 2014 (onestep/eval/coco.py); the builder also points setup.eval_data at eval.captions."""
    def build(cfg, setup):
        from onestep.eval.coco import coco_evaluator

        return coco_evaluator(protocol, cfg, setup)
    return build


def _edm_fid(cfg, setup):
    """Class-conditional FID against EDM-format statistics (onestep/eval/edm_fid.py)."""
    from onestep.eval.edm_fid import edm_evaluator

    return edm_evaluator(cfg, setup)


#: protocol name (Family.evaluation or eval.protocol) -> its evaluator's builder (cfg, setup) -> Evaluator. A
#: builder may set ``setup.eval_data`` (the protocol's own prompts), so build the evaluator before drawing inputs
PROTOCOLS = {"mixture": _mixture, "digit_images": _digit_images, "text_images": _text_images,
             "text_videos": _text_videos, "coco2014": _coco("coco2014"), "coco2014_512": _coco("coco2014_512"),
             "edm_fid": _edm_fid}


def make_evaluator(cfg, setup: Setup) -> Evaluator:
    protocol = getattr(cfg.eval, "protocol", None) or teachers.family(cfg.teacher.kind).evaluation
    if getattr(cfg.eval, "protocol", None) and protocol not in PROTOCOLS:
        raise ConfigError(f"eval.protocol='{protocol}' is not a protocol; pick one of {sorted(PROTOCOLS)}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"teacher.kind '{cfg.teacher.kind}' asks for evaluation '{protocol}', which eval does not "
                          f"have; its family must name one of {sorted(PROTOCOLS)}")
    reward_cfg = getattr(cfg, "reward", None)
    rewarded = reward_cfg is not None and reward_cfg.name not in (None, "none")
    if rewarded and setup.conditioner is None:
        raise ConfigError(f"reward={reward_cfg.name} scores samples with their prompts; teacher={cfg.teacher.kind} "
                          "is not a text-to-image teacher (pass reward=none)")
    evaluator = PROTOCOLS[protocol](cfg, setup)
    if rewarded:
        from onestep.rewards.registry import build_reward

        reward = setup.reward if setup.reward is not None else build_reward(reward_cfg)  # (a training setup has it)
        evaluator = RewardColumn(evaluator, reward, setup.codec, reward_cfg.name)
    return evaluator


class RewardColumn:
    """A protocol's evaluator that also reports the mean of ``reward=``'s reward over the decoded samples and their
    prompts (``reward``; ``reward_name`` says which): the quantity reward-tuning objectives raise."""

    #: rewards score this many decoded samples a call
    BATCH = 16

    def __init__(self, inner: Evaluator, reward: torch.nn.Module, codec, name: str):
        self.inner, self.reward, self.codec, self.name = inner, reward, codec, name
        self.headline = inner.headline

    def __getattr__(self, key):  # everything else (plot, decode, what, ...) is the protocol's
        return getattr(self.inner, key)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, cond=None) -> dict:
        from onestep.eval.t2i_eval import decoded

        out = self.inner.metrics(x, cond)
        images = decoded(self.codec, x) if self.codec is not None else x
        texts = list(cond.texts)
        scores = torch.cat([self.reward(images[i:i + self.BATCH], texts[i:i + self.BATCH]).float().cpu()
                            for i in range(0, len(texts), self.BATCH)])
        return {**out, "reward": float(scores.mean()), "reward_name": self.name}


@dataclass
class Evaluated(Setup):
    """A setup with its evaluator (what the trainer and the bench measure with)."""

    evaluator: Evaluator | None = None


def evaluated(cfg, setup: Setup) -> Evaluated:
    evaluator = make_evaluator(cfg, setup)  # first: a protocol's builder may set setup.eval_data
    return Evaluated(**vars(setup), evaluator=evaluator)
