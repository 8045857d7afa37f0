"""One expert per sampling step: the mixture-of-experts generator of Phased DMD (Fan et al. 2025, "Phased DMD: Few-step
Distribution Matching Distillation via Score Matching within Subintervals", arXiv 2510.27684, Sec. 3).

A k-step student on the t-list t_0 > t_1 > ... > t_{k-1} gets k copies of its network; expert i serves the SNR
sub-interval [t_i, t_{i-1}) (expert 0 everything from t_0 up, expert k-1 everything below t_{k-1}):
    G(x_t, t) = G_{r(t)}(x_t, t),   r(t) = #{j : t_j > t}  (clamped to k-1),
so the student's step i (evaluated at t_i) runs expert i. Rows of one expert never touch another's weights, so a loss on
the output of step i trains expert i only (Phased DMD's phase i). A critic built the same way (``generator.experts``
shapes every copy of the student init) is one fake-score network per sub-interval: phase i first samples
[t_{i+1}, t_i), expert i+1's range, which is then still the teacher (the paper re-initializes the fake score from the
teacher at the start of each phase); only the last phase's new range, below t_{k-1}, shares expert k-1 with the phase
before it. The route compares t with the t-list in t's own dtype, so t_i as the sampler passes it (cast
to the batch's dtype) always lands on expert i.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from onestep.denoisers.base import Denoiser
from onestep.denoisers.students import run_routed
from onestep.errors import ConfigError


class PhaseExperts(Denoiser):
    """k copies of a network and the t -> expert router. ``phase_ts``: the student's t-list (floats, decreasing);
    ``phase_method``: its sampler between steps (renoise | ddim), which Phased DMD's phases reproduce."""

    def __init__(self, net: Denoiser, ts, method: str = "ddim"):
        super().__init__()
        ts = [float(t) for t in ts]
        if len(ts) < 2:
            raise ConfigError(f"generator.experts gives one expert per student step and needs generator.steps >= 2 "
                              f"(got a {len(ts)}-step t-list); use generator.experts=1 for a one-step student")
        if any(b >= a for a, b in zip(ts, ts[1:])):
            raise ConfigError(f"the experts' t-list {ts} must be strictly decreasing")
        self.experts = nn.ModuleList(copy.deepcopy(net) for _ in ts)
        self.phase_ts, self.phase_method, self.num_experts = tuple(ts), method, len(ts)
        self.schedule, self.prediction = net.schedule, net.prediction
        self.data_shape, self.num_classes = net.data_shape, net.num_classes
        self.embedded_guidance = net.embedded_guidance
        if hasattr(net, "feature_dim"):
            self.feature_dim = net.feature_dim

    def route(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) the expert of each row: the number of t-list entries above t, at most k - 1."""
        ts = torch.tensor(self.phase_ts, dtype=t.dtype, device=t.device)
        return (ts[None, :] > t[:, None]).sum(1).clamp(max=self.num_experts - 1)

    def _routed(self, method: str, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        t = self._time(t, x_t)
        route = self.route(t)
        return run_routed(self.experts, route, method, x_t, t, cond)

    def forward(self, x_t, t, cond=None):
        return self._routed("forward", x_t, t, cond)

    def features(self, x_t, t, cond=None):
        return self._routed("features", x_t, t, cond)
