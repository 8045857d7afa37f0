"""DMD's regression loss on teacher noise -> ODE-sample pairs, shared by DMD and (optionally) DMD2.

DMD (Yin et al. 2024a) eq. (9): L_reg = E_{(z, y)} d(G(z), y), y = ODE_teacher(z), with d the squared L2
here (the paper uses LPIPS on images). The pairs are fixed: built once with the teacher's deterministic
sampler (DDIM, ``steps`` evaluations) and either kept in memory or cached to a safetensors file, which
``tools/make_dmd_pairs.py`` can also write ahead of training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from onestep.conditioning import Cond
from onestep.denoisers.base import Denoiser
from onestep.errors import ConfigError
from onestep.core import Batch, Nets
from onestep.sampling import sample

PAIR_SEED = 1234


@torch.no_grad()
def make_pairs(teacher: Denoiser, count: int, steps: int, seed: int = PAIR_SEED,
               device=None) -> dict[str, torch.Tensor]:
    """{"noise", "sample"[, "cond"]}: ``count`` teacher ODE solutions from fixed noise (and uniform labels)."""
    if teacher.conditional and not teacher.num_classes:
        raise ConfigError("objective.regression_weight > 0 builds noise -> teacher-sample pairs for unconditional or "
                          "class-conditional teachers only; set objective.regression_weight=0 for text-to-image teachers")
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(count, *teacher.data_shape, generator=g)
    out = {"noise": z}
    cond = None
    if teacher.num_classes:
        cond = torch.randint(0, teacher.num_classes, (count,), generator=g)
        out["cond"] = cond
    ts = teacher.schedule.default_ts(steps)
    labels = Cond.of_classes(cond, teacher.num_classes, device)
    out["sample"] = sample(teacher, z.to(device), ts, labels, method="ddim").cpu()
    return out


def save_pairs(pairs: dict[str, torch.Tensor], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in pairs.items()}, str(tmp))
    tmp.replace(path)


class TeacherPairs:
    """The fixed pair pool: loaded from ``path`` if it exists, else built at first use (and written to
    ``path`` when one is given)."""

    def __init__(self, count: int, steps: int, path: str | None = None):
        if count < 1 or steps < 1:
            raise ConfigError(f"objective.regression_pairs={count} and objective.regression_steps={steps} must be >= 1 "
                              "(teacher pairs, and ODE steps per pair)")
        self.count, self.steps, self.path = count, steps, path
        self.pairs: dict[str, torch.Tensor] | None = None

    def get(self, teacher: Denoiser, device) -> dict[str, torch.Tensor]:
        if self.pairs is None:
            if self.path and Path(self.path).exists():
                try:
                    pairs = load_file(self.path)
                except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                    raise ConfigError(f"objective.pairs_file '{self.path}' is not a readable safetensors file "
                                      f"({type(e).__name__}); delete it (it is rebuilt) or point pairs_file elsewhere"
                                      ) from None
                if not {"noise", "sample"} <= pairs.keys():
                    raise ConfigError(f"objective.pairs_file '{self.path}' holds {sorted(pairs)}, not the tensors "
                                      "noise and sample; delete it (it is rebuilt) or point pairs_file elsewhere")
                if tuple(pairs["noise"].shape[1:]) != tuple(teacher.data_shape):
                    raise ConfigError(f"objective.pairs_file '{self.path}' holds pairs of shape "
                                      f"{tuple(pairs['noise'].shape[1:])}, not the teacher's "
                                      f"{tuple(teacher.data_shape)}; "
                                      "delete it or point pairs_file elsewhere")
            else:
                pairs = make_pairs(teacher, self.count, self.steps, device=device)
                if self.path:
                    save_pairs(pairs, self.path)
                    print(f"regression pairs: {self.count} teacher ODE solutions ({self.steps} DDIM steps) -> "
                          f"{self.path}", flush=True)
            self.pairs = {k: v.to(device) for k, v in pairs.items()}
        return self.pairs

    def loss(self, nets: Nets, batch: Batch, generate) -> torch.Tensor:
        """DMD eq. (9) on a random minibatch of the pool (same size as the training batch)."""
        p = self.get(nets.teacher, batch.noise.device)
        idx = torch.randint(0, p["noise"].shape[0], (batch.noise.shape[0],), device=batch.noise.device)
        cond = Cond.of_classes(p["cond"][idx] if "cond" in p else None, nets.teacher.num_classes)
        pair_batch = Batch(noise=p["noise"][idx].to(batch.noise.dtype), cond=cond)
        y = p["sample"][idx].to(batch.noise.dtype)
        return torch.nn.functional.mse_loss(generate(nets, pair_batch), y)
