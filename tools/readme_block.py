"""Generated blocks in README.md and in every docs/**/*.md page: the text between ``<!-- BEGIN <results file> -->``
and ``<!-- END <results file> -->`` is that file's content, so every measured figure shown comes from results/ and
cannot drift from it.

    python tools/readme_block.py            # refresh every block of every page from its results file
    python tools/readme_block.py --check    # exit 1, listing the blocks that differ from their files

The results file in a marker is a path relative to the repository root (``results/soak.md``) on every page, README.md
and docs/ alike. A block is added to a page by hand once (the two marker lines); tools call
``update_readme("results/x.md")`` after writing results/x.md, which refreshes that block on every page holding it.

Relative links and images inside a results file point at a path relative to the repository root, or failing that to
the results file's own folder; in a block they are rewritten relative to the page. The MkDocs site sees docs/ as its
root, so on a docs page ``docs/x`` becomes ``x`` and ``results/x`` stays ``results/x``: mkdocs.yml names this file
as a hook, and ``on_files`` publishes results/'s images and data files there.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- (BEGIN|END) (\S+) -->")
#: ](target) of a markdown link or image whose target is relative (no scheme, no anchor-only, no absolute path)
LINK = re.compile(r"(\]\()(?![a-z][a-z0-9+.-]*:|#|/)([^)\s]+)(\))")
#: what the site publishes from results/ (its .md files are pasted into pages as blocks, not pages of their own)
PUBLISHED = (".png", ".csv", ".json")


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every markdown page of the docs site, in a fixed order."""
    return [p for p in [root / "README.md", *sorted((root / "docs").rglob("*.md"))] if p.is_file()]


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


def _site_path(repo_path: PurePosixPath, page: Path, root: Path) -> PurePosixPath:
    """Where a repository path is seen from the page: README at the repository root, docs pages inside the site."""
    if page.parent == root:
        return repo_path
    if repo_path.parts[:1] == ("docs",):
        return PurePosixPath(*repo_path.parts[1:])
    return repo_path


def _relink(text: str, results_file: str, page: Path, root: Path) -> str:
    """The results file's relative link targets, made relative to the page."""
    here = _site_path(PurePosixPath(page.relative_to(root).as_posix()), page, root).parent
    results_dir = PurePosixPath(results_file).parent

    def fix(m: re.Match) -> str:
        target, _, anchor = m.group(2).partition("#")
        repo_path = PurePosixPath(target)
        if not (root / repo_path).exists() and (root / results_dir / repo_path).exists():
            repo_path = results_dir / repo_path
        rel = os.path.relpath(_site_path(repo_path, page, root).as_posix(), here.as_posix() or ".")
        return f"{m.group(1)}{PurePosixPath(rel)}{'#' + anchor if anchor else ''}{m.group(3)}"

    return LINK.sub(fix, text)


def content(results_file: str, page: Path, root: Path = ROOT) -> str:
    """The body a block of ``results_file`` holds on ``page``."""
    return _relink((root / results_file).read_text(encoding="utf-8").strip(), results_file, page, root)


def refresh(page: Path, results_file: str, root: Path = ROOT) -> bool:
    """True when the page holds the block (which now holds the file's text)."""
    begin, end = f"<!-- BEGIN {results_file} -->", f"<!-- END {results_file} -->"
    text = page.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        return False
    body = content(results_file, page, root)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{begin}\n{body}\n{end}{tail}"
    if new != text:
        page.write_text(new, encoding="utf-8")
    return True


def rerender(rendered) -> bool:
    """A results tool's ``render`` command: when the command line is just ``render``, rewrite every markdown file the
    tool's ``rendered(folder)`` gives from results/'s data, running nothing, and return True."""
    if sys.argv[1:] != ["render"]:
        return False
    for name, text in rendered(ROOT / "results").items():
        (ROOT / "results" / name).write_text(text, encoding="utf-8")
    return True


def only(ap, arg: str | None, choices, what: str) -> list[str]:
    """A results tool's ``--only a,b``: those names (all of ``choices`` when unset); an unknown one is an argparse
    error naming the choices."""
    names = arg.split(",") if arg else list(choices)
    unknown = sorted(set(names) - set(choices))
    if unknown:
        ap.error(f"--only: unknown {what}(s) {unknown}; choose from {', '.join(choices)}")
    return names


def update_readme(results_file: str, readme: Path | None = None) -> bool:
    """Refresh the block of ``results_file`` on every page (or on ``readme`` alone); True when some page holds it."""
    targets = [readme] if readme is not None else pages()
    root = readme.parent if readme is not None else ROOT
    held = [refresh(page, results_file, root) for page in targets]  # every page, not up to the first that holds it
    return any(held)


def stale(page: Path, root: Path = ROOT) -> list[str]:
    """'<results file>: <why>' for every block of the page whose body is not its results file's content."""
    out = []
    for name, body in blocks(page.read_text(encoding="utf-8")):
        if not (root / name).is_file():
            out.append(f"{name}: no such results file")
        elif body != content(name, page, root):
            out.append(f"{name}: differs from the file (python tools/readme_block.py refreshes it)")
    return out


def on_files(files, config):
    """MkDocs hook: publish results/'s images and data files at the site's results/, where blocks link them."""
    from mkdocs.structure.files import File

    for path in sorted((ROOT / "results").iterdir()):
        if path.suffix in PUBLISHED:
            files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="list blocks that differ from their files; exit 1 if any")
    ap.add_argument("--root", type=Path, default=None, help="the repository root (default: this checkout)")
    ap.add_argument("--readme", type=Path, default=None,
                    help="one page only (its folder is the root unless --root is given); default: README.md and docs/")
    args = ap.parse_args(argv)
    root = (args.root or (args.readme.parent if args.readme else ROOT)).resolve()
    targets = [args.readme.resolve()] if args.readme else pages(root)
    bad, names = [], {}
    for page in targets:
        label = page.relative_to(root).as_posix()
        try:
            found = [n for n, _ in blocks(page.read_text(encoding="utf-8"))]
        except ValueError as e:
            print(f"{label}: {e}", file=sys.stderr)
            return 1
        missing = [n for n in found if not (root / n).is_file()]
        if missing:
            print(f"{label}: no results file for block(s) {', '.join(missing)}", file=sys.stderr)
            return 1
        names[page] = found
        if args.check:
            bad += [f"{label}: block {line}" for line in stale(page, root)]
    if args.check:
        for line in bad:
            print(line)
        return 1 if bad else 0
    for page, found in names.items():
        for name in found:
            refresh(page, name, root)
    total = sum(len(v) for v in names.values())
    print(f"{total} blocks refreshed on {len(names)} page(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
