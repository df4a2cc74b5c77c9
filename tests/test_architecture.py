"""The shape of the code: docs/architecture.md matches the tree, and the import graph read from the syntax.

docs/architecture.md names every folder and top-level module of the package, and every path it names exists.
For the import graph every import counts, at module top or inside a function, except those under
``if TYPE_CHECKING:`` (never executed: annotations only). A "folder" is a package under distrain/ (strategies,
training, ...); a module at the top (dist.py, errors.py, ...) is a folder of its own, and so is
distrain/__init__.py (the public facade).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest
from conftest import REPO

DOC = REPO / "docs" / "architecture.md"
ROOT = REPO / "distrain"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 450
# What an import inside a function must say about itself (on its line or just above its group of imports).
WHY_LAZY = re.compile(r"#.*\b(lazy|start-up|optional)\b", re.IGNORECASE)
OVER_450 = re.compile(r"Over 450 lines because \w")


def _modules() -> Dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _type_checking_nodes(tree: ast.Module) -> Set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            out.update(id(n) for child in node.body for n in ast.walk(child))
    return out


def _imports(module: str) -> Iterator[Tuple[ast.AST, str, bool]]:
    """(node, imported distrain module, inside a function) for every executed import of a distrain module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip = _type_checking_nodes(tree)
    for node, in_function in _walk(tree, False):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        known = [n for n in names if n in MODULES]
        if known:
            yield node, max(known, key=len), in_function
        elif names and names[0].split(".")[0] != "distrain":
            yield node, "", in_function  # a third-party or standard-library import


def _walk(node: ast.AST, in_function: bool) -> Iterator[Tuple[ast.AST, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        yield from _walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def _edges() -> Dict[str, Set[str]]:
    edges: Dict[str, Set[str]] = defaultdict(set)
    for module in MODULES:
        for _, target, _ in _imports(module):
            if target and target != module:
                edges[module].add(target)
    return edges


def _folder(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "distrain/__init__.py"
    if len(parts) == 2 and MODULES[module].name != "__init__.py":
        return f"{parts[1]}.py"
    return parts[1]


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


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


def test_the_analysis_sees_imports_at_top_inside_functions_and_not_under_type_checking():
    edges = _edges()
    assert "distrain.errors" in edges["distrain.config.validation"]  # at module top
    assert "distrain.training.trainer" in edges["distrain"]  # inside distrain.__getattr__
    assert "distrain.strategies.base" not in edges.get("distrain.checkpoint.checkpointer", ())  # TYPE_CHECKING only
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles_between_modules():
    assert _cycles(_edges()) == []


def test_no_two_folders_import_each_other():
    folders: Dict[str, Dict[str, List[str]]] = defaultdict(lambda: defaultdict(list))
    for module, targets in _edges().items():
        for target in targets:
            if _folder(module) != _folder(target):
                folders[_folder(module)][_folder(target)].append(f"{module} -> {target}")
    pairs = [(a, b, folders[a][b] + folders[b][a]) for a in sorted(folders) for b in sorted(folders[a])
             if a < b and a in folders[b]]
    assert pairs == []


def test_every_import_inside_a_function_says_why():
    unexplained = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for node, _, in_function in _imports(module):
            if in_function and not _explained(lines, node):
                unexplained.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert unexplained == [], "imports inside functions belong at module top unless start-up time needs them:\n" + \
        "\n".join(unexplained)


def _explained(lines: List[str], node: ast.AST) -> bool:
    """A comment on the import's own lines, or on the line above the group of imports it belongs to."""
    if any(WHY_LAZY.search(line) for line in lines[node.lineno - 1:node.end_lineno]):
        return True
    row = node.lineno - 2
    while row >= 0 and re.match(r"\s*(from \S+ )?import |\s*$|\s+\S+,|\s*\)", lines[row]) \
            and not WHY_LAZY.search(lines[row]):
        row -= 1
    return row >= 0 and bool(WHY_LAZY.search(lines[row]))


def test_a_module_over_450_lines_says_why_at_its_top():
    unexplained = [f"{path.relative_to(ROOT.parent)}: {n} lines" for path in MODULES.values()
                   if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
                   and not OVER_450.search("\n".join(path.read_text().splitlines()[:30]))]
    assert unexplained == []


def test_the_trainer_stays_a_loop_you_can_read():
    """The loop module is kept under 400 lines: what is not the loop lives in the module that owns that concern."""
    lines = len((ROOT / "training" / "trainer.py").read_text().splitlines())
    assert lines < 400, f"distrain/training/trainer.py has {lines} lines"


def test_no_function_over_60_lines():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {length} lines")
    assert long == []


def test_no_engine_internals_outside_strategies():
    """DeepSpeed's and DTensor's parameter attributes are read through Strategy (local_tensor, param_shape,
    scalar) only. models/meta_init.py writes a built model's initial values into the shards a strategy made."""
    internals = re.compile(r"\b(ds_tensor|ds_shape|to_local|full_tensor)\b")
    allowed = {ROOT / "models" / "meta_init.py"}
    found = [f"{path.relative_to(ROOT.parent)}:{n}" for path in MODULES.values()
             if path.parent.name != "strategies" and path not in allowed
             for n, line in enumerate(path.read_text().splitlines(), 1) if internals.search(line.split("#")[0])]
    assert found == []
