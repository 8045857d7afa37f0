"""README.md's measured figures are generated blocks: each ``<!-- BEGIN results/x.md -->`` ... ``<!-- END ... -->``
holds exactly results/x.md (tools/readme_block.py), so a figure cannot be edited by hand or drift from its file."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "readme_block.py"
#: every table of measured numbers README shows comes from one of these (a block removed by mistake fails too)
BLOCKS = {"results/digits_dmd2.md", "results/gmm_dmd2.md", "results/bench_gmm_dmd2.md", "results/bench_digits_dmd2.md",
          "results/objectives_gmm_summary.md", "results/consistency_gmm.md", "results/consistency_experiments.md",
          "results/soak.md", "results/digits_t2i.md", "results/sd_memory_cpu.md", "results/jvp_attention_cpu.md",
          "results/jvp_transformer_cpu.md"}


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=60)


def _names(readme: Path) -> set[str]:
    return set(re.findall(r"<!-- BEGIN (\S+) -->", readme.read_text(encoding="utf-8")))


def test_readme_blocks_equal_their_results_files():
    done = _tool("--check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert BLOCKS <= _names(ROOT / "README.md")


def test_check_catches_one_edited_number_and_refresh_restores_it(tmp_path):
    """`--check` exits 1 naming the block whose number was edited by hand; no arguments writes the file back."""
    shutil.copytree(ROOT / "results", tmp_path / "results")
    readme = tmp_path / "README.md"
    original = (ROOT / "README.md").read_text(encoding="utf-8")
    begin = original.index("<!-- BEGIN results/gmm_dmd2.md -->")
    digit = re.compile(r"\d").search(original, original.index("| student |", begin))
    edited = original[:digit.start()] + str((int(digit.group()) + 1) % 10) + original[digit.end():]
    readme.write_text(edited, encoding="utf-8")

    done = _tool("--check", f"--readme={readme}")
    assert done.returncode == 1
    assert done.stdout.splitlines() == ["README.md: block results/gmm_dmd2.md: differs from the file "
                                        "(python tools/readme_block.py refreshes it)"]
    assert _tool(f"--readme={readme}").returncode == 0
    assert readme.read_text(encoding="utf-8") == original
    assert _tool("--check", f"--readme={readme}").returncode == 0

    readme.write_text(original.replace("<!-- END results/soak.md -->", ""), encoding="utf-8")
    done = _tool("--check", f"--readme={readme}")
    assert done.returncode == 1 and "results/soak.md" in done.stderr
