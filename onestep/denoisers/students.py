"""Several students behind one router: the generator of multi-student distillation (MSD; Song et al. 2024,
"Multi-student Diffusion Distillation for Better One-step Generators", Sec. 3).

The conditions (class labels) are split into K disjoint groups; student k is its own network, responsible for the
classes of group k only, and the router sends each row to the student of its class:
    G(z, c) = G_{r(c)}(z, c),   r: classes -> {0..K-1}.
Rows of one student never touch another's weights, so an objective applied to the routed batch trains every student
on its own partition of the conditions (MSD's per-student distillation), and a class-conditional critic built the same
way is one fake score per student. Sampling, evaluation and ``onestep sample`` run the router as part of the network.
The null label (``num_classes``: unconditional rows, as condition dropout makes) goes to student 0.

Partitions (``partition_classes``): ``contiguous`` = K blocks of consecutive class ids, sizes differing by at most one
(MSD partitions ImageNet's classes by id); ``interleaved`` = class c to student c mod K.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from onestep.conditioning import labels_of
from onestep.denoisers.base import Denoiser
from onestep.errors import ConfigError

PARTITIONS = ("contiguous", "interleaved")


def partition_classes(num_classes: int, students: int, partition: str = "contiguous") -> torch.Tensor:
    """(num_classes,) long: the student of each class."""
    if partition not in PARTITIONS:
        raise ConfigError(f"generator.partition='{partition}' is unknown; choose one of {PARTITIONS}")
    if not 1 <= students <= num_classes:
        raise ConfigError(f"generator.students={students} must be in [1, {num_classes}] (the teacher's classes: each "
                          "student needs at least one)")
    c = torch.arange(num_classes)
    return c % students if partition == "interleaved" else c * students // num_classes


def run_routed(nets: nn.ModuleList, route: torch.Tensor, method: str, x_t: torch.Tensor, t: torch.Tensor, cond):
    """Each row through the network ``route`` names (``method``: forward | features | ...), put back in row order; a
    network with no rows is not called (the routers of MultiStudent and PhaseExperts)."""
    out = None
    for k, net in enumerate(nets):
        rows = (route == k).nonzero().flatten()
        if rows.numel() == 0:
            continue
        fn = net if method == "forward" else getattr(net, method)
        y = fn(x_t[rows], t[rows], None if cond is None else cond[rows])
        if out is None:
            out = y.new_zeros((x_t.shape[0], *y.shape[1:]))
        out = out.index_copy(0, rows, y)
    return out


class MultiStudent(Denoiser):
    """K copies of a class-conditional network and the class -> student router (``assignment``, a buffer)."""

    def __init__(self, net: Denoiser, students: int, partition: str = "contiguous"):
        super().__init__()
        if not net.num_classes:
            raise ConfigError(f"generator.students={students} splits the classes between students and needs a "
                              "class-conditional teacher (e.g. teacher=gmm_classes or teacher=digits)")
        self.students = nn.ModuleList(copy.deepcopy(net) for _ in range(students))
        self.register_buffer("assignment", partition_classes(net.num_classes, students, partition))
        self.schedule, self.prediction = net.schedule, net.prediction
        self.data_shape, self.num_classes = net.data_shape, net.num_classes
        self.num_students = students
        if hasattr(net, "feature_dim"):
            self.feature_dim = net.feature_dim

    def route(self, cond) -> torch.Tensor:
        """(B,) the student of each row; the null label goes to student 0."""
        labels = labels_of(cond)
        if labels is None:
            raise ConfigError("a multi-student generator routes by class label and got no labels; use class-"
                              "conditional data (data=gmm with teacher=gmm_classes, data=digits)")
        labels = labels.long().to(self.assignment.device)
        table = torch.cat([self.assignment, self.assignment.new_zeros(1)])  # the null label -> student 0
        return table[labels]

    def _routed(self, method: str, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        t = self._time(t, x_t)
        route = self.route(cond).to(x_t.device)
        return run_routed(self.students, route, method, x_t, t, cond)

    def forward(self, x_t, t, cond=None):
        return self._routed("forward", x_t, t, cond)

    def features(self, x_t, t, cond=None):
        """The routed students' last hidden layers (discriminator heads of DMD2 / MSD's adversarial stage)."""
        return self._routed("features", x_t, t, cond)
