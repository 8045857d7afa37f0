"""MSD: multi-student distillation (Song et al. 2024, "Multi-student Diffusion Distillation for Better One-step
Generators", ICML 2025).

The teacher's conditions are split into K disjoint groups and one single-step student is distilled per group
(Sec. 3; each student only has to cover its group, so the same capacity gives a better generator, or a smaller one the
same quality); at sampling time a router picks the student of the requested condition. Here the K students and the
class router are one network, ``generator.students=K`` (denoisers/students.py; ``generator.partition`` contiguous |
interleaved), so sampling, evaluation and checkpoints see one generator; export refuses it (no diffusers pipeline holds
K routed networks).

Per-student objective: MSD's distribution matching (DM) training is DMD2's loss (distribution_matching.py,
DMD eq. (7)-(8)) on each student's own samples; on the routed batch each row's gradient reaches only the student of
its class, so one DMD2 step trains all K students on their partitions at once. The critic is shaped like the
generator (one fake-score copy per student, trained by DSM on that student's rows: the per-student fake score), and
the GAN block (``discriminator=critic``) gives its adversarial (ADM) training on the routed features.
Not covered: smaller students and their teacher-score-matching (TSM) initialisation: the students here are
copies of the teacher-initialized student network.
"""

from __future__ import annotations

from dataclasses import dataclass

from onestep.denoisers.students import MultiStudent
from onestep.errors import ConfigError
from onestep.objectives.base import Batch, Nets, register_objective
from onestep.objectives.dmd2 import DMD2Config, DistributionMatching


@dataclass
class MSDConfig(DMD2Config):
    name: str = "msd"


@register_objective
class MSD(DistributionMatching):
    name = "msd"
    Config = MSDConfig
    generator_keys = ("students", "partition")

    @classmethod
    def shape_generator(cls, gc, net):
        if gc.students == 1:
            return net  # (generator_loss names the key to set)
        if gc.lora.rank is not None:
            raise ConfigError(f"generator.students={gc.students} trains K full copies; generator.lora is not "
                              "supported with it (unset generator.lora.rank or use generator.students=1)")
        return MultiStudent(net, gc.students, gc.partition)  # (copies the init K times)

    @classmethod
    def export_refusal(cls, gc):
        if gc.students > 1:
            return (f"generator.students={gc.students}: a multi-student (MSD) generator routes each class to its own "
                    "network")
        return None

    def generator_loss(self, nets: Nets, batch: Batch, step: int):
        if getattr(nets.generator, "num_students", 1) < 2:
            raise ConfigError("objective=msd distills several students; pass generator.students=K (K >= 2, e.g. "
                              "experiment=gmm_msd), or use objective=dmd2 for one generator")
        return super().generator_loss(nets, batch, step)
