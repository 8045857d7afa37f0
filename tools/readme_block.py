"""README.md's generated blocks: the text between ``<!-- BEGIN <results file> -->`` and ``<!-- END <results file> -->``
is that file's content, so README figures always come from results/ and cannot drift from them.

    python tools/readme_block.py            # refresh every block of README.md from its results file
    python tools/readme_block.py --check    # exit 1, listing the blocks that differ from their files

Tools call ``update_readme("results/x.md")`` after writing results/x.md. A block is added to README.md by hand once
(the two marker lines); results file paths are relative to the README's folder.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- (BEGIN|END) (\S+) -->")


def blocks(text: str) -> list[tuple[str, str]]:
    """(results file, body) of every block in order; unbalanced or nested markers raise ValueError."""
    out, open_name, start = [], None, 0
    for m in MARKER.finditer(text):
        kind, name = m.groups()
        if kind == "BEGIN":
            if open_name is not None:
                raise ValueError(f"block {open_name} is not closed before the block {name} begins")
            open_name, start = name, m.end()
        else:
            if name != open_name:
                raise ValueError(f"END {name} without BEGIN {name}")
            out.append((name, text[start:m.start()].strip("\n")))
            open_name = None
    if open_name is not None:
        raise ValueError(f"block {open_name} has no END marker")
    return out


def _content(results_file: str, readme: Path) -> str:
    return (readme.parent / results_file).read_text(encoding="utf-8").strip()


def update_readme(results_file: str, readme: Path = ROOT / "README.md") -> bool:
    """True when the block exists (and now holds the file's text); README blocks are added by hand once."""
    begin, end = f"<!-- BEGIN {results_file} -->", f"<!-- END {results_file} -->"
    text = readme.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        return False
    body = _content(results_file, readme)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{body}\n{end}{tail}", encoding="utf-8")
    return True


def stale(readme: Path = ROOT / "README.md") -> list[str]:
    """'<results file>: <why>' for every block whose body is not its results file's content."""
    out = []
    for name, body in blocks(readme.read_text(encoding="utf-8")):
        if not (readme.parent / name).is_file():
            out.append(f"{name}: no such results file")
        elif body != _content(name, readme):
            out.append(f"{name}: differs from the file (python tools/readme_block.py refreshes it)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="list blocks that differ from their files; exit 1 if any")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = ap.parse_args(argv)
    try:
        if args.check:
            bad = stale(args.readme)
            for line in bad:
                print(f"{args.readme.name}: block {line}")
            return 1 if bad else 0
        names = [n for n, _ in blocks(args.readme.read_text(encoding="utf-8"))]
        missing = [n for n in names if not (args.readme.parent / n).is_file()]
        if missing:
            print(f"{args.readme.name}: no results file for block(s) {', '.join(missing)}", file=sys.stderr)
            return 1
    except ValueError as e:
        print(f"{args.readme.name}: {e}", file=sys.stderr)
        return 1
    for name in names:
        update_readme(name, args.readme)
    print(f"{len(names)} blocks refreshed: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
