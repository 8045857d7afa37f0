"""Measured figures in README.md and docs/ are generated blocks: each ``<!-- BEGIN results/x.md -->`` ...
``<!-- END ... -->`` holds exactly results/x.md (tools/readme_block.py), so a figure cannot be edited by hand or drift
from its file; outside the blocks no page may type a measured-looking figure, cite a results file that does not exist,
or name an internal issue."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "readme_block.py"
sys.path.insert(0, str(ROOT / "tools"))
from readme_block import MARKER, blocks, pages  # noqa: E402

#: every table of measured numbers the pages show comes from one of these (a block removed by mistake fails too)
BLOCKS = {"results/digits_dmd2.md", "results/gmm_dmd2.md", "results/bench_gmm_dmd2.md", "results/bench_digits_dmd2.md",
          "results/objectives_gmm_summary.md", "results/recipes_gmm.md", "results/consistency_experiments.md",
          "results/soak.md", "results/digits_t2i.md", "results/sd_memory_cpu.md", "results/trainer_overhead.md",
          "results/jvp_attention_cpu.md", "results/jvp_transformer_cpu.md", "results/bench_digits_t2i.md"}
#: generated from the config dataclasses and checked by its own tool (tests/test_docs.py): defaults, not measurements
GENERATED_PAGES = {"docs/reference/config.md"}

#: a measured-looking figure: a decimal with 2+ places (not part of a dotted version such as 2.14.0), a time, a factor
FIGURE = re.compile(
    r"(?<![\w.])\d+\.\d{2,}(?!\.?\d)"
    r"|(?<![\w.])\d+(?:\.\d+)?\s?(?:ms|s|sec|seconds?|min|minutes?|h|hours?)\b"
    r"|(?<![\w.])\d+(?:\.\d+)?\s?[x×](?![\w×])")
#: constants that look like figures, each cited where it appears (keep this short)
ALLOWED = {
    "1.75",   # DMD2's SD1.5 CFG scale in the sd15_dmd2 recipe row (tianweiy/DMD2 laion6.25_sd_baseline_..._dfake10 .sh)
    "0.001",  # LCM-LoRA's Huber c in the sd15_lcm_lora recipe row (diffusers train_lcm_distill_lora_sd_wds.py)
}
#: not figures: arXiv identifiers (arXiv 2510.27684) and Python versions (Python 3.10)
NOT_FIGURES = re.compile(r"arXiv \d{4}\.\d{4,5}|Python \d+\.\d+")
#: an inline code span holding a command or a key=value override (its numbers are inputs, not measurements)
COMMAND_SPAN = re.compile(r"`[^`\n]*=[^`\n]*`")
#: a results file a page names
RESULTS_PATH = re.compile(r"results/[\w.-]+?\.(?:md|png|csv|json)\b")
INTERNAL_ISSUE = re.compile(r"\bissues? \d+|(?<![\w&/])#\d+\b", re.IGNORECASE)


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=60)


def outside_blocks(text: str) -> str:
    """The page with every generated block's body cut out (the marker lines stay)."""
    out, pos, inside = [], 0, False
    for m in MARKER.finditer(text):
        if not inside:
            out.append(text[pos:m.start()])
        inside = m.group(1) == "BEGIN"
        pos = m.end()
    return "".join(out) + text[pos:]


def prose(text: str) -> str:
    """What the figure check reads: the page outside its blocks, without NOT_FIGURES and command spans, and from
    ```bash fences only the comments (a command's numbers are its inputs; other fences are read in full)."""
    lines, fence = [], None
    for line in outside_blocks(text).splitlines():
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:].strip()
            continue
        if fence in ("bash", "sh", "console"):
            line = line.split(" #", 1)[1] if " #" in line else ("" if not line.lstrip().startswith("#") else line)
        lines.append(line)
    return COMMAND_SPAN.sub("``", NOT_FIGURES.sub("", "\n".join(lines)))


def figures(text: str) -> list[str]:
    return [m.group() for m in FIGURE.finditer(prose(text)) if m.group() not in ALLOWED]


def _checked_pages() -> list[Path]:
    return [p for p in pages() if p.relative_to(ROOT).as_posix() not in GENERATED_PAGES]


def test_blocks_equal_their_results_files():
    done = _tool("--check")
    assert done.returncode == 0, done.stdout + done.stderr
    shown = {name for page in pages() for name, _ in blocks(page.read_text(encoding="utf-8"))}
    assert BLOCKS <= shown, sorted(BLOCKS - shown)
    assert "results/digits_dmd2.md" in {n for n, _ in blocks((ROOT / "README.md").read_text(encoding="utf-8"))}


def test_no_figure_outside_a_generated_block():
    found = {p.relative_to(ROOT).as_posix(): figures(p.read_text(encoding="utf-8")) for p in _checked_pages()}
    assert not {k: v for k, v in found.items() if v}, "measured-looking figures outside a generated block: " \
        "move them into a results/ file and show it as a block, or cite the constant in ALLOWED"


def test_the_figure_check_catches_figures_and_spares_commands():
    for planted in ("sliced-W2 0.085 at one step", "178 s wall", "about 25 min", "took 3 h", "2.4x the teacher",
                    "2.4× faster", "twice (2x)"):
        assert figures(f"Some prose: {planted}.\n"), planted
    clean = ("8×8 images, 32×32 mid-block, arXiv 2510.27684, torch 2.14.0, `trainer.ema_decay=0.999`, step 37,\n"
             "```bash\nonestep train objective.gan_weight=0.01   # a GAN on\n```\n"
             "<!-- BEGIN results/x.md -->\n0.1234 in 12 s, 3.5x\n<!-- END results/x.md -->\n")
    assert figures(clean) == []
    assert figures("```bash\nonestep train   # about 25 min\n```\n") == ["25 min"]
    assert figures("```python\nx = 0.085\n```\n") == ["0.085"]


def test_results_files_the_pages_name_exist():
    named = {(p.relative_to(ROOT).as_posix(), m) for p in pages()
             for m in RESULTS_PATH.findall(p.read_text(encoding="utf-8"))}
    assert named and not {(page, f) for page, f in named if not (ROOT / f).is_file()}


def test_no_internal_issue_numbers():
    found = {p.relative_to(ROOT).as_posix(): INTERNAL_ISSUE.findall(outside_blocks(p.read_text(encoding="utf-8")))
             for p in pages()}
    assert not {k: v for k, v in found.items() if v}


def test_readme_links_resolve():
    """README is read on the forge, outside the docs build: its relative links must name files that exist."""
    text = outside_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    targets = {m.partition("#")[0] for m in re.findall(r"\]\((?![a-z]+:)([^)\s]+)\)", text)}
    assert targets and not {t for t in targets if not (ROOT / t).exists()}


def test_readme_fits_a_first_day():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    assert "python -m pytest -q -n 2 --dist loadgroup" in text  # .ci/run greps README for it
    assert "pip install -c constraints.txt -e . && onestep train" in text


def test_check_catches_one_edited_number_and_refresh_restores_it(tmp_path):
    """`--check` exits 1 naming the block whose number was edited by hand; no arguments writes the file back."""
    shutil.copytree(ROOT / "results", tmp_path / "results")
    readme = tmp_path / "README.md"
    original = (ROOT / "README.md").read_text(encoding="utf-8")
    begin = original.index("<!-- BEGIN results/digits_dmd2.md -->")
    digit = re.compile(r"\d").search(original, original.index("| student |", begin))
    edited = original[:digit.start()] + str((int(digit.group()) + 1) % 10) + original[digit.end():]
    readme.write_text(edited, encoding="utf-8")

    done = _tool("--check", f"--readme={readme}")
    assert done.returncode == 1
    assert done.stdout.splitlines() == ["README.md: block results/digits_dmd2.md: differs from the file "
                                        "(python tools/readme_block.py refreshes it)"]
    assert _tool(f"--readme={readme}").returncode == 0
    assert readme.read_text(encoding="utf-8") == original
    assert _tool("--check", f"--readme={readme}").returncode == 0

    readme.write_text(original.replace("<!-- END results/digits_dmd2.md -->", ""), encoding="utf-8")
    done = _tool("--check", f"--readme={readme}")
    assert done.returncode == 1 and "results/digits_dmd2.md" in done.stderr


def test_docs_pages_get_blocks_with_links_relative_to_the_page(tmp_path):
    """A block on a docs page: its results file named from the repository root, its links rewritten for the page
    (``soak.png`` next to the results file, ``docs/x.png`` under the site root), caught by --check when edited."""
    (tmp_path / "results").mkdir()
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "results" / "r.md").write_text("| a |\n|---|\n| 0.5 |\n\n![p](p.png) ![g](docs/g.png) [w](https://x.org/a)\n")
    for f in ("results/p.png", "docs/g.png"):
        (tmp_path / f).write_bytes(b"")
    page = tmp_path / "docs" / "sub" / "page.md"
    page.write_text("# t\n\n<!-- BEGIN results/r.md -->\n<!-- END results/r.md -->\n")
    (tmp_path / "README.md").write_text("<!-- BEGIN results/r.md -->\n<!-- END results/r.md -->\n")

    assert _tool("--check", f"--root={tmp_path}").returncode == 1
    assert _tool(f"--root={tmp_path}").returncode == 0
    assert "![p](../results/p.png) ![g](../g.png) [w](https://x.org/a)" in page.read_text()
    assert "![p](results/p.png) ![g](docs/g.png)" in (tmp_path / "README.md").read_text()
    assert _tool("--check", f"--root={tmp_path}").returncode == 0
    page.write_text(page.read_text().replace("| 0.5 |", "| 0.6 |"))
    done = _tool("--check", f"--root={tmp_path}")
    assert done.returncode == 1 and done.stdout.startswith("docs/sub/page.md: block results/r.md: differs")
