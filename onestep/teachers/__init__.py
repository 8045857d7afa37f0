"""Teacher families: one file per family, each registering one ``Family`` object (base.py) that holds everything
about it (presets, folder loading, adapter, text encoding, applicable config fields, data kinds, evaluation
protocol, export rules). experiment, help, validate, runs, eval and export ask the registry and name no family.

A third-party family is one module that calls ``register(MyFamily())`` when imported, named in the config's
``plugins=[my_module]`` (onestep/plugins.py), plus an experiment yaml.
"""

from __future__ import annotations

from onestep.errors import ConfigError
from onestep.teachers.base import Family, Parts, SingleFile

__all__ = ["Family", "Parts", "SingleFile", "register", "family", "families", "kinds", "reads"]

_BY_KIND: dict[str, Family] = {}


def register(fam: Family) -> Family:
    """Add a family (and its ``teacher=<preset>`` options to Hydra's config store)."""
    from onestep.config import TeacherConfig, store
    from onestep.denoisers.pipeline_folder import register_layout

    for kind in fam.kinds:
        other = _BY_KIND.get(kind)
        if other is not None and type(other) is not type(fam):
            raise ConfigError(f"teacher.kind '{kind}' is registered twice ({type(other).__name__} and "
                              f"{type(fam).__name__}); give the new family another kind name")
        _BY_KIND[kind] = fam
    for kind, layout in fam.layouts.items():
        register_layout(kind, layout)
    for name, values in fam.presets.items():
        store("teacher", name, TeacherConfig(**values))
    return fam


def kinds() -> list[str]:
    """Every registered teacher kind, in registration order."""
    return list(_BY_KIND)


def family(kind: str) -> Family:
    if kind not in _BY_KIND:
        raise ConfigError(f"teacher.kind '{kind}' is unknown; choose one of {sorted(_BY_KIND)} "
                          "(or a preset: teacher=gmm_ring, teacher=digits, teacher=sd15, ...)")
    return _BY_KIND[kind]


def families() -> list[Family]:
    return list(dict.fromkeys(_BY_KIND.values()))


def reads(kind: str, section: str, name: str) -> bool:
    """Whether a run with teacher ``kind`` reads ``section.name``: fields no family lists are read by every run;
    a field some family lists only by the runs of those families."""
    optional = any(f.reads(section, name) for f in families())
    return not optional or family(kind).reads(section, name)


def with_field(section: str, name: str) -> tuple[str, ...]:
    """The kinds whose family reads ``section.name``, in registration order."""
    return tuple(k for k, f in _BY_KIND.items() if f.reads(section, name))


# the built-in families (each file registers itself)
from onestep.teachers import gmm, digits, sd, sd3, flux, sana, wan  # noqa: E402,F401
