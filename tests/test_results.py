"""The results files are what their tools write, and their tables are consistent.

- Every results/*.md names the command that wrote it in its first lines, and is byte for byte what that tool
  renders from its data files (JSON; a bench's rows from its CSV) — the tool's ``rendered(folder)``. A number
  typed into a .md by hand, or data that no longer matches its table, fails here.
- Every table's NFE column agrees with the row it is on: the sampler's evaluations for its step count
  (onestep.sampling.nfe) where the table has sampler and steps columns, else the step count in the row's name
  ("teacher 4 steps", "cd_2step", "dmd2_4step_hybrid1": the teacher's steps count in the student's t-list; a bare
  objective name is a 1-step student). A stale row copied from another step count (cd_2step once showed the 1-step
  figures with NFE 1) fails here."""

from __future__ import annotations

import functools
import importlib
import re
import sys
from pathlib import Path

import pytest

from onestep.sampling import nfe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
#: the tools that write results/*.md; each has ``rendered(folder) -> {file name: markdown}``, reading only data files
RENDERERS = ("report_runs", "report_digits_t2i", "report_moving_digits", "report_slimflow", "report_full_recipes",
             "report_tuning", "bench_digits_t2i", "bench_objectives", "bench_recipes", "bench_memory", "bench_trainer",
             "soak", "bench_kernels", "bench_coco_protocol")
MARKDOWN = sorted(RESULTS.glob("*.md"))
COMMAND = re.compile(r"`(?:[A-Z_]+=\S+ )*(?:python|onestep) [^`]*`")


@functools.lru_cache(maxsize=None)
def rendered() -> dict[str, tuple[str, str]]:
    """file name -> (tool, what the tool renders for it from results/'s data files)."""
    sys.path.insert(0, str(ROOT / "tools"))
    out = {}
    for tool in RENDERERS:
        for name, text in importlib.import_module(tool).rendered(RESULTS).items():
            assert name not in out, f"{name} rendered by both {out[name][0]} and {tool}"
            out[name] = (tool, text)
    return out


def test_every_results_file_has_its_renderer():
    names = {p.name for p in MARKDOWN}
    assert set(rendered()) == names


@pytest.mark.parametrize("path", MARKDOWN, ids=[p.name for p in MARKDOWN])
def test_results_file_names_the_command_that_wrote_it(path):
    head = "\n".join(path.read_text().splitlines()[:5])
    assert COMMAND.search(head), f"{path.name}: no `python ...` / `onestep ...` command in its first lines"
    if path.name in rendered():
        tool = rendered()[path.name][0]
        assert f"tools/{tool}.py" in head, f"{path.name}: its first lines do not name tools/{tool}.py, which writes it"


@pytest.mark.parametrize("path", MARKDOWN, ids=[p.name for p in MARKDOWN])
def test_results_file_is_what_its_tool_renders_from_its_data(path):
    tool, text = rendered()[path.name]
    assert path.read_text() == text, (f"results/{path.name} differs from what tools/{tool}.py renders from its data; "
                                      f"`python tools/{tool}.py render` (or its command) rewrites it")


def tables(text: str):
    """(header, rows) of every markdown table in ``text``; cells stripped."""
    lines = text.splitlines()
    for i in range(len(lines) - 1):
        if lines[i].startswith("|") and re.match(r"^\|(\s*-+\s*\|)+\s*$", lines[i + 1]):
            header = [c.strip() for c in lines[i].strip("|").split("|")]
            rows = []
            for ln in lines[i + 2:]:
                if not ln.startswith("|"):
                    break
                rows.append([c.strip() for c in ln.strip("|").split("|")])
            yield header, rows


def expected_nfe(header: list[str], row: list[str]) -> int:
    cell = dict(zip(header, row))
    if "sampler" in cell and "steps" in cell:
        return nfe(cell["sampler"], int(cell["steps"]))
    name = row[0]
    m = re.search(r"(\d+) steps?$", name) or re.search(r"_(\d+)step(?:_hybrid\d+)?$", name)
    return int(m.group(1)) if m else 1


FILES = sorted(p for p in RESULTS.glob("*.md") if "| NFE |" in p.read_text())


def test_there_are_tables_to_check():
    assert {"objectives_gmm.md", "bench_gmm_dmd2.md", "digits_t2i.md"} <= {p.name for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_nfe_matches_each_rows_step_count(path):
    checked = 0
    for header, rows in tables(path.read_text()):
        if "NFE" not in header:
            continue
        for row in rows:
            got = int(row[header.index("NFE")])
            assert got == expected_nfe(header, row), f"{path.name}: row {row[:4]}"
            checked += 1
    assert checked
