"""What reward-tuning objectives share (Flash-DMD's joint RL term, PSO's ranking): ``reward=``'s reward of generator
samples, and the distilled student such a run starts from.

``SampleReward``: r(x, c) = reward(decode(x), texts(c)), one value per sample, differentiable in x through the teacher's
VAE decoder (latent teachers) or on the samples themselves (pixel teachers). The reward is the one the experiment built
(``Setup.reward``: reward=digits_class, clip, imagereward, hpsv2 or reward.name=<module>:<factory>), read in
``build_modules``; it is frozen and not checkpointed.

``StudentStart``: ``objective.student=<run folder | checkpoint folder | .safetensors>`` names a distilled generator
(``run_weights``), copied into the generator and into the objective's frozen copies of it in ``prepare``.
"""

from __future__ import annotations

import torch
from torch import nn

from onestep.errors import ConfigError
from onestep.objectives.base import load_generator_weights

#: the reward of a captioned-digits run, the example every "pass reward=..." error names
EXAMPLE_REWARD = "reward=digits_class"


class SampleReward:
    """``r(x, cond)`` -> (N,) rewards of generator samples ``x`` (latents or pixels) for their prompts."""

    def __init__(self, objective: str):
        self.objective = objective
        self.reward: nn.Module | None = None
        self.codec = None

    def bind(self, setup) -> None:
        if setup.reward is None:
            raise ConfigError(f"objective={self.objective} tunes the generator toward a reward: pass {EXAMPLE_REWARD} "
                              "(captioned digits), reward=clip / imagereward / hpsv2 with reward.weights, or your own "
                              "reward.name=<module>:<factory>")
        if setup.conditioner is None:
            raise ConfigError(f"objective={self.objective} scores samples with their prompts; the teacher is not a "
                              "text-to-image teacher: pick a text-to-image teacher (e.g. experiment=digits_t2i_dmd2)")
        self.reward, self.codec = setup.reward, setup.codec

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples as the reward reads them: decoded images in [-1, 1] (with gradient)."""
        return self.codec.decode(x) if self.codec is not None else x

    def __call__(self, x: torch.Tensor, cond) -> torch.Tensor:
        if self.reward is None:
            raise ConfigError(f"objective={self.objective} reads its reward in build_modules(setup), which did not run")
        r = self.reward(self.images(x), list(cond.texts))
        return r.to(torch.promote_types(r.dtype, torch.float32))  # (a mixed-precision reward's output, in fp32 at least)


class StudentStart:
    """The distilled student a run starts from (``objective.student``), loaded into the generator and ``frozen``."""

    def __init__(self, path: str, objective: str):
        self.path, self.objective = path, objective

    def run_weights(self) -> dict[str, str]:
        return {"student": self.path} if self.path else {}

    def load(self, weights, *nets: nn.Module) -> None:
        if not self.path:
            return
        if not weights or "student" not in weights:
            raise ConfigError(f"objective.student='{self.path}' was not read: the caller of prepare passes the weights "
                              "run_weights() names (onestep.checkpoint.read_run_weights)")
        for net in nets:  # (a resumed run's checkpoint then overwrites them)
            load_generator_weights(net, weights["student"], "objective.student", self.path,
                                   f"pass the run folder of a distilled student of the same teacher and generator "
                                   f"(objective={self.objective} tunes it)")
