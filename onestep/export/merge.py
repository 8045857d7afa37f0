"""Weight interpolation between two students of one init (Cideron et al. 2024, "Diversity-Rewarded CFG
Distillation", arXiv 2410.06084: model merging by linear interpolation, LERP):

    theta_LERP = (1 - lambda) theta_q + lambda theta_d,

theta_q the quality end (objective=diverse_cfg with objective.diversity_weight=0), theta_d the diversity end (beta > 0),
both fine-tuned from the same teacher init (the paper's condition for the interpolation to stay a good model). lambda
picks the quality-diversity trade-off at deployment; lambda outside [0, 1] extrapolates. ``merge_runs`` writes a run
folder (the diversity run's config, one checkpoint whose generator and generator_ema are the merged weights), which
``onestep eval``, ``onestep sample`` and ``onestep export`` read like any run: tools/merge_students.py is its command.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from onestep import checkpoint
from onestep.errors import ConfigError

#: the roles of a run folder the merged checkpoint holds: the trained generator and the one evaluation reads
ROLES = ("generator", "generator_ema")


def lerp(quality: dict[str, torch.Tensor], diversity: dict[str, torch.Tensor], weight: float,
         key: str = "merge") -> dict[str, torch.Tensor]:
    """(1 - weight) quality + weight diversity, tensor by tensor, in float64 then cast back to each tensor's dtype;
    integer tensors (counters) must agree and are kept."""
    if not math.isfinite(weight):
        raise ConfigError(f"{key}.weight={weight} must be a finite number (0 = the quality end, 1 = the diversity end)")
    if set(quality) != set(diversity):
        only = sorted(set(quality) ^ set(diversity))[:3]
        raise ConfigError(f"{key}: the two students have different weights (e.g. {only}); merge two runs of the same "
                          "experiment and generator config")
    if any("lora_" in k for k in quality):
        raise ConfigError(f"{key}: LoRA students hold adapter factors, whose interpolation is not the LERP of the "
                          "weights; merge full students (generator.lora.rank=null)")
    out = {}
    for k, q in quality.items():
        d = diversity[k]
        if q.shape != d.shape:
            raise ConfigError(f"{key}: '{k}' has shape {tuple(q.shape)} in the quality run and {tuple(d.shape)} in the "
                              "diversity run; merge two runs of the same generator config")
        if not q.is_floating_point():
            if not torch.equal(q, d):
                raise ConfigError(f"{key}: the integer tensor '{k}' differs between the runs; they cannot be merged")
            out[k] = q.clone()
            continue
        out[k] = ((1 - weight) * q.double() + weight * d.double()).to(q.dtype)
    return out


def merge_runs(quality: str, diversity: str, weight: float, out: str) -> Path:
    """Writes the run folder ``out`` holding theta_LERP of the two runs' newest generator_ema; returns its checkpoint."""
    for name, path in (("quality", quality), ("diversity", diversity)):
        if not (Path(path) / "config.yaml").is_file():
            raise ConfigError(f"merge.{name} '{path}' is not a onestep run folder (no config.yaml); pass the folder of "
                              "a finished objective=diverse_cfg run")
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"merge.out '{out}' exists and is not empty; pass a new folder")
    q = checkpoint.read_generator_weights(quality, "merge.quality")
    d = checkpoint.read_generator_weights(diversity, "merge.diversity")
    merged = lerp(q, d, weight)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.load(Path(diversity) / "config.yaml")
    cfg.run_dir = str(folder)
    OmegaConf.save(cfg, folder / "config.yaml")
    step = checkpoint.step_of(checkpoint.list_checkpoints(Path(diversity))[-1])
    (folder / "merge.txt").write_text(f"theta = (1 - {weight}) * {quality} + {weight} * {diversity}\n")
    return checkpoint.save_weights(folder, step, {role: merged for role in ROLES}, {"step": step})
