"""The layering of DESIGN.md ("Layers, and the arrows that must never exist"), read from the source: every import
statement under onestep/ (module level and inside functions, parsed with ast, relative imports
resolved) becomes an arrow between modules, and each rule below lists the arrows that break it.

Units: ``onestep.<name>``, a module or a subpackage with everything in it (``onestep.kernels`` is the unit
``kernels``). A unit imports freely inside itself and from units of a lower tier; same-tier arrows are allowed
unless a named rule forbids them (eval -> train, experiment <-> eval, data/experiment -> objectives).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: DESIGN.md's layer order, bottom up; plugins and progress are stdlib-level helpers of the layers above, pretrain
#: is the teachers' DSM pretraining (over core), validate and help read the config and every layer below it; rewards
#: (image scorers on torch / open_clip / transformers) sit low so that eval and objectives can both use them
TIERS: list[set[str]] = [
    {"config", "errors", "plugins", "progress"},
    {"schedules", "param", "conditioning", "rewards"},
    {"denoisers", "kernels"},
    {"teachers"},
    {"core"},
    {"sampling", "generator", "pretrain"},
    {"objectives"},
    {"networks", "checkpoint", "fsdp"},
    {"data", "experiment"},
    {"runs", "validate", "help"},
    {"train", "eval"},
    {"export"},
    {"cli"},
]
TIER = {unit: i for i, units in enumerate(TIERS) for unit in units}
#: the modules a kernel may import besides its own package and the standard library
KERNEL_DEPENDENCIES = {"torch", "triton", "diffusers"}
#: the modules a reward scorer may import besides its own package, config/errors/progress and the standard library
REWARD_DEPENDENCIES = {"torch", "open_clip", "transformers", "safetensors"}
#: what the trainer may import from objectives/: the package interface and the registry, no specific objective
OBJECTIVE_INTERFACE = {"onestep.objectives", "onestep.objectives.base"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted((ROOT / "onestep").rglob("*.py"))


def is_module(name: str) -> bool:
    """``name`` is a module or package of this repository (not a name defined inside one)."""
    parts = name.split(".")
    if parts[0] != "onestep":
        return False
    rel = parts
    base = ROOT.joinpath(*rel)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, relative ones resolved; ``from m import x`` gives
    ``m.x`` where that is a module of the repository, else ``m``."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for a in node.names:
                sub = f"{module}.{a.name}"
                found.append((node.lineno, sub if is_module(sub) else module))
    return found


def unit(module: str) -> str | None:
    """The layer unit of a module of onestep (None for anything outside it)."""
    parts = module.split(".")
    if parts[0] != "onestep" or len(parts) == 1:
        return None
    return parts[1]


def arrows() -> list[tuple[str, str, str, str]]:
    """(importing module, imported module, their units as 'a -> b', 'file:line') over the whole source."""
    out = []
    for path in source_files():
        src = module_name(path)
        for line, target in imports(path):
            a, b = unit(src), unit(target)
            if b is not None and a != b:
                out.append((src, target, f"{a} -> {b}", f"{path.relative_to(ROOT)}:{line}"))
    return out


def forbidden(sources: set[str], targets: set[str]) -> list[str]:
    return [f"{where} {src} imports {target}" for src, target, pair, where in arrows()
            if unit(src) in sources and unit(target) in targets]


def test_every_unit_has_a_tier():
    """A new module or subpackage of onestep is placed in DESIGN.md's layer order here before it can be checked."""
    units = {unit(module_name(p)) for p in source_files()} - {None}
    assert units <= set(TIER), f"place {sorted(units - set(TIER))} in TIERS (tests/test_layers.py) and in DESIGN.md"


def test_imports_point_down_the_layers():
    bad = [f"{where} {src} imports {target} ({pair}: tier {TIER[unit(src)]} -> {TIER[unit(target)]})"
           for src, target, pair, where in arrows()
           if unit(src) in TIER and unit(target) in TIER and TIER[unit(target)] > TIER[unit(src)]]
    assert not bad, "imports pointing up the layers:\n" + "\n".join(bad)


def test_kernels_import_only_torch_triton_diffusers_and_the_standard_library():
    bad = []
    for path in (ROOT / "onestep" / "kernels").rglob("*.py"):
        for line, target in imports(path):
            top = target.split(".")[0]
            own = target == "onestep.kernels" or target.startswith("onestep.kernels.")
            if not own and top not in KERNEL_DEPENDENCIES and top not in sys.stdlib_module_names | {"__future__"}:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "kernels/ is leaf code:\n" + "\n".join(bad)


def test_rewards_import_only_torch_open_clip_transformers_and_the_lowest_tier():
    own = {f"onestep.{u}" for u in ("rewards", *TIERS[0])}
    bad = []
    for path in (ROOT / "onestep" / "rewards").rglob("*.py"):
        for line, target in imports(path):
            top = target.split(".")[0]
            if top == "onestep":
                if not any(target == m or target.startswith(m + ".") for m in own):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
            elif top not in REWARD_DEPENDENCIES and top not in sys.stdlib_module_names | {"__future__"}:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "rewards/ scores images with torch, open_clip and transformers (weights through safetensors) only:\n" + "\n".join(bad)


ABOVE = {name for name, tier in TIER.items() if tier > TIER["denoisers"]}

RULES = {
    "objectives know no trainer, checkpoint, networks, data, experiment, run, eval, export or cli": (
        {"objectives"}, {"train", "checkpoint", "networks", "fsdp", "data", "experiment", "runs", "eval", "export",
                         "cli"}),
    "denoisers know no objective nor anything above them": ({"denoisers"}, ABOVE),
    "teachers know nothing above them": ({"teachers"}, {n for n, t in TIER.items() if t > TIER["teachers"]}),
    "generator, data and experiment use core, not objectives": ({"generator", "data", "experiment"}, {"objectives"}),
    "networks, checkpoints and sharding know no objective (objectives ask them for views)": (
        {"networks", "checkpoint", "fsdp"}, {"objectives"}),
    "experiment does not import eval": ({"experiment"}, {"eval"}),
    "eval imports neither train nor experiment": ({"eval"}, {"train", "experiment"}),
    "export imports neither train nor eval": ({"export"}, {"train", "eval"}),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_forbidden_arrows(rule):
    sources, targets = RULES[rule]
    bad = forbidden(sources, targets)
    assert not bad, f"{rule}:\n" + "\n".join(bad)


def test_the_trainer_sees_only_the_objective_interface():
    """train/ reaches objectives through the package's registry and base.py, never a specific objective."""
    bad = [f"{where} {src} imports {target}" for src, target, pair, where in arrows()
           if pair == "train -> objectives" and target not in OBJECTIVE_INTERFACE]
    assert not bad, "\n".join(bad)
