"""Every reference in the code and the docs must lead somewhere a fresh clone has.

A comment that says "see <some notes file>" or "as tracker item 7 asks" is useless to a reader who has only the
repository. The design, the method and the reasons behind the choices live in `docs/` (docs/method.md,
docs/architecture.md), so code and docs point there: a referenced `.md` file must exist (relative to the
referring file or to the repository root), and no text may point outside the clone or to tracker numbers.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("src", "tests", "benchmarks", "docs")
SCANNED_FILES = ("README.md", "DEVELOPERS.md", "Makefile", "pyproject.toml")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".html", ".js", ".css", ".cfg", ".ini", ".sh"}
SKIPPED_PARTS = {"__pycache__", ".pytest_cache", "node_modules"}

# This file holds examples of bad references for its own test, so the scan leaves it out.
THIS_FILE = Path(__file__).resolve()
OUTSIDE_PATTERNS = {
    "a path above the repository": re.compile(r"\.\./shared\b"),
    "a notes file outside the repository": re.compile(r"\b(?:demo[-]notes|landscape\.md|ARCHITECTURE\.md)"),
    "a numbered pitfall of a notes file": re.compile(r"\b[Pp]itfall [0-9]"),
    "an issue number": re.compile(r"\b[Ii]ssues? (?:[0-9]+|N)\b"),
}
MARKDOWN_REFERENCE = re.compile(r"(?<![\w./-])((?:\.\.?/)?[\w][\w./-]*\.md)\b")


def reference_problems(text: str, referring_file: Path, root: Path = ROOT) -> list[str]:
    """What in `text` points outside the repository: one line per problem, with its line number."""
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        for what, pattern in OUTSIDE_PATTERNS.items():
            for match in pattern.finditer(line):
                problems.append(f"line {number}: {what}: {match.group(0)!r}")
        for match in MARKDOWN_REFERENCE.finditer(line):
            target = match.group(1)
            if _is_quoted_path_part(line, match):
                continue  # code that builds a path (`root / "docs" / "x.md"`) names its folder separately
            problem = f"line {number}: {target!r} is not a file of the repository"
            if problem not in problems and not any((base / target).is_file() for base in (referring_file.parent, root)):
                problems.append(problem)
    return problems


def _is_quoted_path_part(line: str, match: re.Match) -> bool:
    before = line[match.start() - 1] if match.start() > 0 else ""
    after = line[match.end()] if match.end() < len(line) else ""
    return before in ("\"", "'") and after == before and "/" not in match.group(1)


def scanned_files(root: Path = ROOT) -> list[Path]:
    files = [root / name for name in SCANNED_FILES if (root / name).is_file()]
    for directory in SCANNED_DIRS:
        for path in sorted((root / directory).rglob("*")):
            parts = set(path.relative_to(root).parts)
            if parts & SKIPPED_PARTS or any(part.endswith(".egg-info") for part in parts):
                continue
            if path.resolve() == THIS_FILE:
                continue
            if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name == "Makefile"):
                files.append(path)
    return files


def test_no_file_refers_outside_the_repository():
    offenders = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{path.relative_to(ROOT)} {problem}" for problem in reference_problems(text, path)]
    assert not offenders, "references a clone cannot follow (point to docs/method.md or docs/architecture.md):\n" + "\n".join(offenders)


def test_the_scan_covers_code_docs_and_checklists():
    names = {path.relative_to(ROOT).as_posix() for path in scanned_files()}
    assert "README.md" in names
    assert "docs/method.md" in names
    assert "docs/architecture.md" in names
    assert any(name.startswith("src/magic_align/") and name.endswith(".py") for name in names)
    assert any(name.endswith(".yaml") for name in names)  # the checklist files' headers
    assert any(name.startswith("tests/") for name in names)


def test_the_checker_finds_each_kind_of_outside_reference(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "method.md").write_text("# method\n")
    source = tmp_path / "src" / "module.py"
    source.parent.mkdir()
    bad = [
        "# see ../" + "shared/reference/notes.md",
        "# as the demo" + "-notes say",
        "# (pit" + "fall 2 of the authors' code)",
        "# issue" + " 3, item 4",
        "# the architecture (ARCHITECTURE" + ".md)",
        "# method" + ".md section 4",  # the docs/ prefix is missing: no such file next to the source or at the root
    ]
    for line in bad:
        assert reference_problems(line, source, tmp_path), line
    good = [
        "# docs/method.md section 6: a tie gives no gradient",
        "# the issue is that ties give no gradient",
        "x = 3  # issues with 0 rows are skipped",
    ]
    for line in good:
        assert reference_problems(line, source, tmp_path) == [], line
    # Code that joins the folder and the file name itself is left to that code; a quoted path is checked.
    assert reference_problems('DOC = ROOT / "docs" / "configuration.md"', source, tmp_path) == []
    assert reference_problems('print("see docs/gone.md")', source, tmp_path) != []
    # From a page in docs/, a link relative to the page works.
    page = tmp_path / "docs" / "index.md"
    assert reference_problems("[the method](method.md#6-magic-dpo)", page, tmp_path) == []
    assert reference_problems("[gone](missing.md)", page, tmp_path) == ["line 1: 'missing.md' is not a file of the repository"]
