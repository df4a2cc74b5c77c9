"""docs/architecture.md matches the tree: it names every folder and top-level module of the package, and every
path it names exists."""

from __future__ import annotations

import re

from conftest import REPO

DOC = REPO / "docs" / "architecture.md"


def test_every_folder_and_top_level_module_has_its_line():
    text = DOC.read_text()
    package = REPO / "distrain"
    folders = sorted(p.parent.relative_to(REPO).as_posix() + "/" for p in package.rglob("__init__.py")
                     if p.parent != package and "__pycache__" not in p.parts)
    modules = sorted(p.relative_to(REPO).as_posix() for p in package.glob("*.py"))
    missing = [name for name in folders + modules if f"| `{name}` |" not in text]
    assert not missing, f"docs/architecture.md has no line for {missing}"


def test_every_path_it_names_exists():
    named = set(re.findall(r"`((?:distrain|benchmarks|configs|examples|launch|docker|tests|docs)/[\w./-]*)`",
                           DOC.read_text()))
    assert named, "the page names no paths"
    gone = sorted(p for p in named if not (REPO / p.rstrip("/")).exists())
    assert not gone, f"docs/architecture.md names paths that do not exist: {gone}"
