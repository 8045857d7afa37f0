"""A third-party objective for tests/test_objectives.py: a module outside onestep.objectives that registers an
objective of its own when ``plugins=[plugin_objective]`` imports it. Its loss pulls generator samples onto the data
samples of the same batch (a toy, written only against the objective interface)."""

from __future__ import annotations

from dataclasses import dataclass

from onestep.errors import ConfigError
from onestep.objectives.base import Objective, ObjectiveConfig, register_objective


@dataclass
class PluginPullConfig(ObjectiveConfig):
    name: str = "plugin_pull"
    #: the loss's scale
    weight: float = 1.0


@register_objective
class PluginPull(Objective):
    name = "plugin_pull"
    Config = PluginPullConfig
    networks = ("generator",)

    def generator_loss(self, nets, batch, step):
        if batch.real is None:
            raise ConfigError("objective=plugin_pull needs data with samples (data=gmm)")
        x = self.generate(nets, batch)
        gap = (x - batch.real.to(x)).pow(2).flatten(1).mean(1).mean()
        return {"loss": self.cfg.weight * gap, "plugin_gap": gap.detach()}
