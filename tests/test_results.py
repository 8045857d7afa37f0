"""Every results table's NFE column agrees with the row it is on: the sampler's evaluations for its step count
(onestep.sampling.nfe) where the table has sampler and steps columns, else the step count in the row's name
("teacher 4 steps", "cd_2step", "dmd2_4step_hybrid1": the teacher's steps count in the student's t-list; a bare
objective name is a 1-step student). A stale row copied from another
step count (issue 18: cd_2step showing the 1-step figures with NFE 1) fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from onestep.sampling import nfe

RESULTS = Path(__file__).resolve().parents[1] / "results"


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
