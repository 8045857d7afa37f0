"""Every file a config yaml's comments cite exists, and no comment names an internal issue number.

The experiment yamls' comments are what a user reads next to `onestep --help`; sixteen of them once pointed at
notes files that had been deleted. A cited path counts as local when it starts with one of the repository's own
top-level folders (``results/objectives_gmm.md``, ``onestep/objectives/rcm.py:40``) and must then exist (with
that many lines when a line number is given). An upstream citation names its repository first, as
``NVlabs/FastGen configs/methods/config_scm.py`` or ``tianweiy/DMD2 main/edm/edm_guidance.py:82-92``, and is
not a local path even when its first folder has a local namesake."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_TOPS = ("notes", "results", "tools", "onestep", "configs", "kernels", "tests", "docs", ".ci")
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./*{},-]*[\w*}])(?::(\d+)(?:-(\d+))?)?" % "|".join(map(re.escape, LOCAL_TOPS)))
# An "owner/repo " token right before a path: the path is a file of that upstream repository.
UPSTREAM_REPO = re.compile(r"(?<![\w./-])([\w.-]+)/[\w.-]+\s+$")
ISSUE = re.compile(r"\bissues?\s*#?\d+|(?<![\w&])#\d+\b", re.IGNORECASE)
YAMLS = sorted(p for p in (ROOT / "configs").rglob("*") if p.suffix in (".yaml", ".yml"))


def comments(path: Path) -> list[tuple[int, str]]:
    """(line number, comment text) of every comment: a '#' at the start of a line or after whitespace."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = re.search(r"(?:^|\s)#(.*)$", line)
        if m:
            out.append((n, m.group(1)))
    return out


def expand(pattern: str) -> list[Path]:
    """A cited path, with ``{a,b}`` alternatives and ``*`` globs resolved against the repository."""
    m = re.search(r"\{([^}]*)\}", pattern)
    if m:
        return [p for alt in m.group(1).split(",") for p in expand(pattern[:m.start()] + alt + pattern[m.end():])]
    return sorted(ROOT.glob(pattern)) if "*" in pattern else [ROOT / pattern]


def citations(path: Path):
    """(line number, cited path, last cited line or None) of every local path the file's comments name."""
    previous = ""
    for n, text in comments(path):
        for m in PATH.finditer(text):
            before = previous + " " + text[:m.start()]
            repo = UPSTREAM_REPO.search(before)
            if repo and repo.group(1) not in LOCAL_TOPS:
                continue
            yield n, m.group(1).rstrip("."), int(m.group(3) or m.group(2) or 0) or None
        previous = text


def broken(path: Path) -> list[str]:
    out = []
    for n, cited, last_line in citations(path):
        files = expand(cited)
        if not files or not all(f.exists() for f in files):
            out.append(f"{path.relative_to(ROOT)}:{n} cites {cited}, which does not exist")
        elif last_line and len(files[0].read_text().splitlines()) < last_line:
            out.append(f"{path.relative_to(ROOT)}:{n} cites line {last_line} of {cited}, which is shorter")
    return out


def test_there_are_yamls_and_citations():
    assert len(YAMLS) > 40
    cited = {c for p in YAMLS for _, c, _ in citations(p)}
    assert {"tools/bench_objectives.py", "onestep/objectives/rcm.py"} <= cited


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(ROOT)) for p in YAMLS])
def test_yaml_comments_cite_existing_files(path):
    assert not broken(path), "\n".join(broken(path)) + "\n(cite the paper, the upstream file as owner/repo " \
        "path, or a results/ file instead)"


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(ROOT)) for p in YAMLS])
def test_yaml_comments_name_no_internal_issue(path):
    found = [f"{path.relative_to(ROOT)}:{n}: {text.strip()}" for n, text in comments(path) if ISSUE.search(text)]
    assert not found, "an internal issue number in a user-facing comment:\n" + "\n".join(found)


def test_the_check_tells_local_paths_from_upstream_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "x.py").write_text("a\nb\n")
    yaml = tmp_path / "e.yaml"
    yaml.write_text("# see tools/x.py:2 and tools/{x,y}.py; NVlabs/FastGen\n"
                    "# configs/methods/config_scm.py:24 and tianweiy/DMD2 main/edm/edm_guidance.py:82-92\n"
                    "key: 1  # figures: results/gone.md. Also tools/x.py:3\n")
    assert broken(yaml) == ["e.yaml:1 cites tools/{x,y}.py, which does not exist",
                            "e.yaml:3 cites results/gone.md, which does not exist",
                            "e.yaml:3 cites line 3 of tools/x.py, which is shorter"]
    assert ISSUE.search(" the stale row (issue 18)") and ISSUE.search("see #12") and not ISSUE.search("8x8, 3/4")
