"""Write DMD's regression pairs (noise -> teacher ODE sample, DMD eq. (9)) for an experiment to a file.

    python tools/make_dmd_pairs.py out=pairs/ring.safetensors experiment=gmm_dmd [count=2048] [steps=32] \
        [hydra overrides]
    onestep train experiment=gmm_dmd objective.pairs_file=pairs/ring.safetensors

The pairs use the guided teacher exactly as training does (teacher.guidance), the pool size and ODE steps of
the objective config unless count=/steps= are given. Training with a pairs_file that does not exist yet builds
the same pool at first use and writes it there.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch
from hydra import compose, initialize_config_module

import onestep.config  # noqa: F401
import onestep.objectives  # noqa: F401
from onestep import experiment
from onestep.denoisers.base import guided
from onestep.errors import ConfigError
from onestep.objectives.regression import make_pairs, save_pairs

OWN_KEYS = ("out", "count", "steps")


def main(argv: list[str]) -> int:
    own = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in OWN_KEYS}
    overrides = [a for a in argv if a.split("=", 1)[0] not in OWN_KEYS]
    if "out" not in own:
        print("usage: python tools/make_dmd_pairs.py out=<file.safetensors> [count=N] [steps=N] [overrides]",
              file=sys.stderr)
        return 2
    try:
        with initialize_config_module("onestep.configs", version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        oc = cfg.objective
        count = int(own.get("count", getattr(oc, "regression_pairs", 2048)))
        steps = int(own.get("steps", getattr(oc, "regression_steps", 32)))
        with tempfile.TemporaryDirectory() as tmp:
            setup = experiment.build(cfg, cfg.run_dir or tmp, progress=False)
        teacher = guided(setup.teacher, cfg.teacher.guidance).requires_grad_(False)
        t0 = time.perf_counter()
        pairs = make_pairs(teacher, count, steps, device=torch.device("cpu"))
        save_pairs(pairs, own["out"])
    except ConfigError as e:
        print(f"make_dmd_pairs: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} pairs ({steps} teacher DDIM steps, {time.perf_counter() - t0:.1f} s) to {own['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
