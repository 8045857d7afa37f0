"""Third-party teacher families and objectives, from modules the ``plugins`` config key names:

    PYTHONPATH=my_code onestep train plugins=[my_family] experiment=my_experiment

A plugin module registers what it brings when it is imported (a teacher family in ``onestep.teachers``'s
registry, an objective and its Hydra config node), so the CLI imports the modules named on the command line before
Hydra composes the config, and the run loader imports the ones a run's config.yaml names before it rebuilds the
run (sample, export and bench of that run then need no extra argument). A plugin that ships experiment yamls
calls ``add_config_dir(folder)`` (the folder holds ``experiment/<name>.yaml``); the CLI adds such folders to
Hydra's search path.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from onestep.errors import ConfigError

KEY = "plugins"
_CONFIG_DIRS: list[Path] = []


def add_config_dir(folder: str | Path) -> None:
    """A folder of Hydra config groups (e.g. ``experiment/``) that the CLI searches after onestep's own."""
    path = Path(folder).resolve()
    if not path.is_dir():
        raise ConfigError(f"plugin config folder '{path}' does not exist; pass add_config_dir an existing folder")
    if path not in _CONFIG_DIRS:
        _CONFIG_DIRS.append(path)


def searchpath_overrides() -> list[str]:
    """The Hydra override that adds the plugins' config folders to the search path (none without any)."""
    if not _CONFIG_DIRS:
        return []
    return ["hydra.searchpath=[" + ",".join(f"'file://{p}'" for p in _CONFIG_DIRS) + "]"]


def names_in_overrides(args: list[str]) -> list[str]:
    """The modules a ``plugins=[a,b]`` (or ``plugins=a``) command-line override names."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for a in args:
        if a.split("=", 1)[0] != KEY:
            continue
        value = OverridesParser.create().parse_overrides([a])[0].value()
        return [str(v) for v in (value if isinstance(value, list) else [value])]
    return []


def load(names) -> None:
    """Import each named module (once: Python caches them)."""
    for name in names or ():
        try:
            importlib.import_module(str(name))
        except ImportError as e:
            raise ConfigError(f"{KEY}: cannot import '{name}' ({e}); put its folder on PYTHONPATH or pip install "
                              f"it, or remove it from {KEY}=[...]") from None
