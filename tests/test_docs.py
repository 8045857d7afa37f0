"""The docs site builds with `mkdocs build --strict` (a broken link, a missing page or a missing heading fails it), and
its config reference page is what tools/config_reference.py generates from the config dataclasses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _build(root: Path, site: Path) -> subprocess.CompletedProcess:
    # no -q: mkdocs 1.6 counts strict-mode warnings through its log handler, and -q silences them into exit status 0
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_site_builds_strict(tmp_path):
    done = _build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()
    assert (tmp_path / "site" / "results" / "objectives_gmm_seeds.png").is_file()  # published by the hook


def test_a_broken_link_fails_the_build(tmp_path):
    for folder in ("docs", "results"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "readme_block.py", tmp_path / "tools")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    page = tmp_path / "docs" / "training.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [the old page](no-such-page.md).\n", encoding="utf-8")
    done = _build(tmp_path, tmp_path / "site")
    assert done.returncode == 1 and "no-such-page.md" in done.stdout + done.stderr


def test_config_reference_is_generated_from_the_schemas(tmp_path, capsys):
    # a fresh interpreter: objectives or families that other tests register in this process are not the package's
    tool = ROOT / "tools" / "config_reference.py"
    done = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    sys.path.insert(0, str(tool.parent))
    import config_reference

    page = config_reference.PAGE.read_text(encoding="utf-8")
    assert "| `trainer.max_bad_steps` |" in page and "### `objective=dmd2`" in page
    stale = tmp_path / "config.md"
    stale.write_text(page.replace("| `trainer.max_bad_steps` | `10` |", "| `trainer.max_bad_steps` | `11` |"),
                     encoding="utf-8")
    assert config_reference.main(["--check", f"--out={stale}"]) == 1
    assert "python tools/config_reference.py" in capsys.readouterr().out
