"""Teacher families as plug-ins (onestep/teachers/): the registry, no family named above it, no import arrow
between experiment and eval, and a family defined in the tests folder (tests/plugins/toy_family.py) that runs
train -> sample -> export through the CLI with nothing else edited."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from onestep import teachers
from onestep.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "onestep"
#: the layers allowed to name families: the families themselves and the generic adapters they call
EXEMPT = ("teachers", "denoisers")


def _is_teacher_kind(node: ast.AST) -> bool:
    """An expression that holds the teacher's kind: spelled with ``teacher`` (cfg.teacher.kind, tc_teacher...) or
    a bare ``kind`` / ``tc.kind`` (data kinds share some names: data.kind / dc.kind are not teacher kinds)."""
    text = ast.unparse(node)
    return "teacher" in text or text in ("kind", "tc.kind", "self.kind")


def _names(node: ast.AST, kinds: set[str]) -> list[str]:
    """The family names a literal holds: a string, or a tuple / list / set of them."""
    if isinstance(node, ast.Constant) and node.value in kinds:
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in kinds]
    return []


def family_names_in(source: str, kinds: set[str]) -> list[tuple[int, str]]:
    """(line, what) for each place the source names a family: a comparison of the teacher kind with a family
    name (``kind == "sdxl"``, ``tc.kind in ("sd3", "flux")``), or a family name in a tuple / list / set literal
    or as a dict key (tables keyed by family)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for i, op in enumerate(operands):
                names = _names(op, kinds)
                if names and any(_is_teacher_kind(o) for j, o in enumerate(operands) if j != i):
                    found.append((node.lineno, f"compares the teacher kind with {names}"))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and _names(node, kinds):
            found.append((node.lineno, f"lists families {_names(node, kinds)}"))
        elif isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in kinds]
            if keys:
                found.append((node.lineno, f"keys a table by families {keys}"))
    return found


def test_the_scan_finds_each_way_of_naming_a_family():
    kinds = set(teachers.kinds())
    planted = ('if cfg.teacher.kind == "sdxl": pass\n'
               'if kind in ("sd3", "flux"): pass\n'
               'NASA = ("sd15", "sdxl")\n'
               'PIPELINES = {"sana": "SanaPipeline"}\n'
               'if tc.kind not in ["digits"]: pass\n')
    assert sorted(line for line, _ in family_names_in(planted, kinds)) == [1, 2, 2, 3, 4, 5, 5]
    # the data kinds gmm / digits are not teacher kinds; feature spaces neither
    assert family_names_in('if dc.kind == "gmm": pass\nif features == "digits": pass\n', kinds) == []


def test_no_layer_above_teachers_names_a_family():
    kinds = set(teachers.kinds())
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in EXEMPT:
            continue
        offences += [f"onestep/{rel}:{line}: {what}" for line, what in family_names_in(path.read_text(), kinds)]
    assert not offences, "ask the family object (onestep.teachers.family(kind)) instead:\n" + "\n".join(offences)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _arrows(sources: list[Path], targets: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(ROOT)} imports {m}" for p in sources for m in sorted(_imports(p))
            if any(m == t or m.startswith(t + ".") for t in targets)]


def test_experiment_and_eval_do_not_import_each_other_and_export_imports_neither_eval_nor_train():
    eval_files = sorted((PACKAGE / "eval").rglob("*.py"))
    assert _arrows(eval_files, ("onestep.experiment",)) == []
    assert _arrows([PACKAGE / "experiment.py"], ("onestep.eval",)) == []
    assert _arrows(sorted((PACKAGE / "export").rglob("*.py")), ("onestep.eval", "onestep.train")) == []


def test_registry_names_the_known_kinds():
    assert {"gmm", "gmm_learned", "digits", "sd15", "sdxl", "sd3", "flux", "sana"} <= set(teachers.kinds())
    assert teachers.family("sdxl") is teachers.family("sd15")
    with pytest.raises(ConfigError, match=r"teacher.kind 'nope' is unknown; choose one of \[.*'sana'"):
        teachers.family("nope")
    assert teachers.with_field("teacher", "max_sequence_length")[:3] == ("sd3", "flux", "wan")
    assert teachers.reads("gmm", "teacher", "mixture") and not teachers.reads("digits", "teacher", "mixture")
    assert teachers.reads("digits", "teacher", "guidance")  # a field no family lists: every family reads it


def test_a_kind_cannot_be_registered_by_two_families():
    class Other(teachers.Family):
        kinds = ("digits",)

    with pytest.raises(ConfigError, match="registered twice"):
        teachers.register(Other())


def _onestep(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "plugins"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "onestep.cli", *args], capture_output=True, text=True, env=env,
                         cwd=cwd, timeout=300)
    assert out.returncode == 0, f"onestep {args[0]}: {out.stderr[-2000:]}"
    return out


def test_a_family_from_the_tests_folder_trains_samples_and_exports(tmp_path):
    """tests/plugins/toy_family.py + tests/plugins/configs/experiment/toy_dmd2.yaml, nothing else: `onestep train`
    with plugins=[toy_family], then `onestep sample` and `onestep export` of the run (which import the run's plugins
    themselves), and the export sampled through plain diffusers gives the run's images."""
    from safetensors.torch import load_file

    run, export = tmp_path / "run", tmp_path / "export"
    _onestep(["train", "plugins=[toy_family]", "experiment=toy_dmd2", f"run_dir={run}", f"out_root={tmp_path}"],
             tmp_path)
    assert "toy_digits" in (run / "config.yaml").read_text() and (run / "results.md").is_file()
    _onestep(["sample", f"run_dir={run}", "num=6", "seed=3", f"out={tmp_path / 'run.safetensors'}"], tmp_path)
    _onestep(["export", f"run_dir={run}", f"out={export}"], tmp_path)
    assert json.loads((export / "onestep_export.json").read_text())["pipeline_class"] == "FewStepClassPipeline"
    _onestep(["sample", f"run_dir={export}", "num=6", "seed=3", f"out={tmp_path / 'export.safetensors'}"], tmp_path)
    want, got = (load_file(str(tmp_path / f"{n}.safetensors"))["images"] for n in ("run", "export"))
    assert want.shape == got.shape == (6, 1, 8, 8)
    assert (want - got).abs().max() <= 1e-4


def test_every_family_names_what_the_layers_above_have():
    """The registry's strings point at something: an evaluation protocol eval builds, an export scheduler export
    knows, a diffusers pipeline class, data kinds the experiment builds."""
    import diffusers

    from onestep.eval.evaluators import PROTOCOLS
    from onestep.export.pipelines import SCHEDULERS

    for kind in teachers.kinds():
        fam = teachers.family(kind)
        assert fam.evaluation in PROTOCOLS, kind
        assert fam.export_scheduler in (None, "class", *SCHEDULERS), kind
        if fam.export_scheduler in SCHEDULERS:
            assert hasattr(diffusers, fam.pipeline(kind)) and fam.network in ("unet", "transformer"), kind
        assert fam.data_kinds and set(fam.data_kinds) <= {"gmm", "digits", "prompts", "image_text", "digits_text",
                                                         "video_text", "moving_digits_text", "webdataset"}
