"""The wheel carries what a user's install needs: every module, every config yaml, every shipped asset.

CI installs with ``pip install -e``, which reads the source tree directly, so a package left out of the packaging
(``onestep.export`` once was: no ``onestep export`` from ``pip install .``) passes every other test. Here the
wheel is built the way a user's ``pip install .`` builds it and its file list is compared with the source tree.
The build runs offline from the setuptools installed in the venv, on a copy of the tree, so no stale build/ folder
from an earlier build can supply a file the packaging would miss."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> where its files sit inside the installed package.
INSTALLED_AS = {"onestep": "onestep", "configs": "onestep/configs"}
BUILD_FILES = ("pyproject.toml", "setup.py", "README.md")
JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def shipped(path: Path) -> bool:
    """What the wheel must carry from the source folders: modules, yaml, and everything under onestep/assets/."""
    rel = path.relative_to(ROOT)
    return (path.suffix in (".py", ".yaml", ".yml") or rel.parts[:2] == ("onestep", "assets")) and \
        "__pycache__" not in rel.parts


def expected_files() -> set[str]:
    out = set()
    for folder, installed in INSTALLED_AS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and shipped(path):
                out.add(f"{installed}/{path.relative_to(ROOT / folder).as_posix()}")
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for folder in INSTALLED_AS:
        shutil.copytree(ROOT / folder, src / folder, ignore=JUNK)
    for name in BUILD_FILES:
        if (ROOT / name).exists():
                shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-v", "-w", str(out), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Data folders that are no package lose their files in some setuptools versions; -v shows the warning.
    assert "would be ignored" not in proc.stdout + proc.stderr, "setuptools: a data folder is no package"
    (path,) = out.glob("onestep-*.whl")
    return path


@pytest.fixture(scope="module")
def wheel_names(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_wheel_carries_every_module_yaml_and_asset(wheel_names):
    missing = sorted(expected_files() - wheel_names)
    assert not missing, f"{len(missing)} source files are not in the wheel, e.g. {missing[:10]}"


def test_wheel_installs_the_onestep_package_and_command(wheel, wheel_names):
    tops = {name.split("/")[0] for name in wheel_names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"onestep"}, "configs/ installed at the top"
    (entry_points,) = [n for n in wheel_names if n.endswith(".dist-info/entry_points.txt")]
    with zipfile.ZipFile(wheel) as zf:
        assert "onestep = onestep.cli:main" in zf.read(entry_points).decode()


def test_expected_files_cover_the_pieces_a_user_runs():
    files = expected_files()
    for piece in ("onestep/export/__init__.py", "onestep/export/class_pipeline.py", "onestep/kernels/__init__.py",
                  "onestep/configs/config.yaml", "onestep/configs/experiment/digits_dmd2.yaml",
                  "onestep/assets/digits_t2i/unet/config.json"):
        assert piece in files, piece
