"""`onestep <command> [hydra overrides...]`.

    onestep train                                  # the embedded default experiment
    onestep train experiment=gmm_dmd2 trainer.steps=3000 objective.ttur=5
    onestep train -m objective.ttur=1,5            # Hydra multirun
    onestep train --cfg job                        # print the composed config

Errors in user input (ConfigError) print one line and exit with status 2.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import onestep.config  # noqa: F401  (registers the schemas)
import onestep.objectives  # noqa: F401  (registers the objectives)
from onestep.errors import ConfigError

CONFIG_PATH = "pkg://onestep.configs"
COMMANDS = ("train",)
USAGE = f"usage: onestep {{{'|'.join(COMMANDS)}}} [key=value ...]   (see README.md)"


def _fail(msg: str) -> None:
    print(f"onestep: error: {msg}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
def _train(cfg: DictConfig) -> None:
    from onestep.train.trainer import NonFiniteLoss, train

    run_dir = cfg.run_dir or HydraConfig.get().runtime.output_dir
    try:
        train(cfg, run_dir)
    except (ConfigError, NonFiniteLoss) as e:
        _fail(str(e))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(USAGE)
            return
        _fail(f"unknown command {argv[0]!r}; {USAGE}" if argv else USAGE)
    command, rest = argv[0], argv[1:]
    sys.argv = [f"onestep {command}", *rest]
    {"train": _train}[command]()


if __name__ == "__main__":
    main()
