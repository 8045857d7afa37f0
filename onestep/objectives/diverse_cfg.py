"""Diversity-rewarded CFG distillation (Cideron et al. 2024, "Diversity-Rewarded CFG Distillation", arXiv 2410.06084,
ICLR 2025), for one-step students.

The paper fine-tunes a model on two objectives at once, its quality-diversity objective:
    QD(theta) = Q(theta) + beta D(theta),
    Q: CFG distillation, the model alone (one pass, no unconditional branch) imitates the CFG-guided teacher,
    D(theta) = E_c E_{y1, y2 ~ pi_theta(. | c)} [ r_D(y1, y2) ],   r_D(y1, y2) = 1 - cos(E(y1), E(y2)),
an RL objective whose reward is the dissimilarity of two generations of the same prompt c in an embedding E.
Here:
  Q   the one-step CFG distillation DMD2 does (dmd2.py, distribution_matching.dmd_loss): the distribution matching
      gradient with the *guided* teacher (teacher.guidance) as real score and a critic as fake score, so the student
      alone reproduces the CFG teacher's distribution (MusicLM's per-token KL to the CFG logits has no one-step
      counterpart; DMD's reverse KL to the guided distribution is this framework's).
  D   ``objective.group`` = k generations per prompt (the paper's two): each prompt of the batch's first B / k rows is
      repeated k times with fresh noise, and the reward (``objective.reward``, a ``reward=`` registry name; default
      digits_diversity: each sample's mean cosine distance to the other samples of its prompt in the digits features)
      is averaged. The mean over a group of its per-sample rewards is 2 / (k (k - 1)) sum_{i<j} r_D(y_i, y_j), an
      unbiased estimate of D.
  The paper's tokens are discrete, so it estimates grad D with REINFORCE. A one-step generator y = G_theta(z, c) is a
  reparameterised policy: D(theta) = E_z[r_D(G_theta(z1, c), G_theta(z2, c))] and its gradient is the expectation
  of the reward's gradient through G (pathwise, unbiased, no baseline needed): ``diversity_term`` below.
  The generator minimises  L = L_DMD - beta * mean_i r_i  (beta = ``objective.diversity_weight``).
Model merging (the paper's LERP): theta_LERP = (1 - lambda) theta_q + lambda theta_d between a quality run (beta = 0) and a
diversity run (beta > 0) of the same init: ``onestep.export.merge`` (tools/merge_students.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from onestep.config import RewardConfig
from onestep.core import sample_t
from onestep.errors import ConfigError
from onestep.objectives.adversarial import GANConfig
from onestep.objectives.base import (Batch, CriticWeighting, Nets, ObjectiveConfig, TimeDraw, check_t_dist,
                                     check_t_range, every_step, frozen, register_objective)
from onestep.objectives.critic import CriticObjective
from onestep.objectives.distribution_matching import dmd_loss
from onestep.rewards.registry import build_reward


@dataclass
class DiverseCFGConfig(ObjectiveConfig, GANConfig, TimeDraw, CriticWeighting):
    name: str = "diverse_cfg"
    ttur: int = 5
    #: beta of QD = Q + beta D (Cideron et al. Sec. 3): the diversity reward's weight; 0 = the quality end (plain
    #: one-step CFG distillation), the other end of a merge (onestep.export.merge)
    diversity_weight: float = 1.0
    #: generations per prompt k the diversity reward compares (the paper's two); trainer.batch_size must be a multiple
    group: int = 2
    #: the per-sample diversity reward, a reward= registry name (onestep/rewards/registry.py): each sample's
    #: dissimilarity to the other samples of its prompt; digits_diversity (digits features) | clip_diversity (CLIP
    #: image embedding, the counterpart of the paper's embedding E for real teachers)
    reward: str = "digits_diversity"
    #: that reward's local weights (digits_diversity: a digits feature network folder, None = the shipped one;
    #: clip_diversity: an open_clip checkpoint)
    reward_weights: Optional[str] = None
    #: clip_diversity: the open_clip architecture of reward_weights (a name or a model-config .json)
    reward_model: Optional[str] = None


def grouped(batch: Batch, k: int) -> Batch:
    """The batch with its first B / k conditions each repeated k times (rows i, i + B/k, ...), noise unchanged."""
    n = batch.noise.shape[0]
    if n % k:
        raise ConfigError(f"objective=diverse_cfg compares objective.group={k} samples per prompt, and a batch of {n} "
                          f"rows does not split into groups of {k}; pass a trainer.batch_size that is a multiple of {k}")
    if batch.cond is None:
        raise ConfigError("objective=diverse_cfg rewards the diversity of several samples of one prompt and needs a "
                          "conditional teacher and data (e.g. experiment=digits_t2i_diverse_cfg)")
    rows = torch.arange(n // k).repeat(k)
    return Batch(noise=batch.noise, cond=batch.cond.select(rows), real=batch.real)


def group_names(cond, k: int) -> list[str]:
    """What the reward groups samples by: the prompts, or (class labels, no texts) the group of each row."""
    texts = getattr(cond, "texts", None)
    if texts is not None:
        return list(texts)
    n = len(cond)
    return [f"group {i % (n // k)}" for i in range(n)]


def diversity_term(reward, images: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The estimate mean_i r_i of D(theta), differentiable in the images (the pathwise policy gradient)."""
    return reward(images, names).mean()


@register_objective
class DiverseCFG(CriticObjective):
    name = "diverse_cfg"
    Config = DiverseCFGConfig

    def __init__(self, cfg, generate):
        super().__init__(cfg, generate)
        check_t_range(cfg)
        check_t_dist(cfg)
        if cfg.group < 2:
            raise ConfigError(f"objective.group={cfg.group} must be >= 2: diversity compares samples of one prompt")
        if cfg.diversity_weight < 0:
            raise ConfigError(f"objective.diversity_weight={cfg.diversity_weight} must be >= 0 (beta of QD = Q + beta D)")
        if cfg.reward in (None, "none"):
            raise ConfigError("objective.reward=none: diverse_cfg needs a per-sample diversity reward; pass "
                              "objective.reward=digits_diversity or clip_diversity (the quality end keeps it, logged, "
                              "with objective.diversity_weight=0)")
        self.reward, self.codec = None, None

    def accumulation_refusal(self):
        return (f"objective.group={self.cfg.group} repeats the first B / {self.cfg.group} prompts of each batch "
                f"{self.cfg.group} times and rewards each row's distance to the other rows of its prompt")

    def set_run(self, modules, images_per_step: int, logged=every_step) -> None:
        super().set_run(modules, images_per_step, logged)
        if images_per_step % self.cfg.group:  # (each micro-batch is checked again as it is grouped)
            raise ConfigError(f"objective=diverse_cfg compares objective.group={self.cfg.group} samples per prompt, and "
                              f"a batch of {images_per_step} rows does not split into groups of {self.cfg.group}; pass "
                              f"a trainer.batch_size that is a multiple of {self.cfg.group}")

    def build_modules(self, setup):
        """Keeps the teacher's codec (the reward scores decoded images) and builds the frozen reward."""
        self.codec = setup.codec
        c = self.cfg
        self.reward = build_reward(RewardConfig(name=c.reward, weights=c.reward_weights, model=c.reward_model))
        return super().build_modules(setup)

    def decoded(self, x: torch.Tensor) -> torch.Tensor:
        if self.codec is None:
            return x
        with frozen(self.codec.vae):
            return self.codec.decode(x.to(self.codec.device, self.codec.dtype)).to(x.dtype)

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        k = self.cfg.group
        batch = grouped(batch, k)
        x = self.generate(nets, batch)
        t = sample_t(nets.teacher.schedule, x.shape[0], self.cfg.t_lo, self.cfg.t_hi, like=x, dist=self.cfg.t_dist)
        loss, logs = dmd_loss(nets.teacher, nets.critic, x, batch.cond, t=t)  # Q: one-step CFG distillation
        out = {"dm": loss, **logs}
        if self.reward is None:
            raise ConfigError("objective=diverse_cfg builds its reward in build_modules(setup); call it before the "
                              "first loss")
        d = diversity_term(self.reward, self.decoded(x), group_names(batch.cond, k))
        out["diversity"] = d.detach()
        if self.cfg.diversity_weight > 0:
            loss = loss - self.cfg.diversity_weight * d.to(loss.dtype)  # QD = Q + beta D, as a loss
        return self.with_gan(loss, out, nets, x, batch.cond)
