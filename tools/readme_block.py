"""Replace a generated block of README.md with a results file's text.

A block is delimited by ``<!-- BEGIN <results file> -->`` and ``<!-- END <results file> -->``; tools call
``update_readme("results/x.md")`` after writing results/x.md, so README figures always come from results/.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def update_readme(results_file: str, readme: Path = ROOT / "README.md") -> bool:
    """True when the block exists (and now holds the file's text); README blocks are added by hand once."""
    begin, end = f"<!-- BEGIN {results_file} -->", f"<!-- END {results_file} -->"
    text = readme.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        return False
    body = (ROOT / results_file).read_text(encoding="utf-8").strip()
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{body}\n{end}{tail}", encoding="utf-8")
    return True
