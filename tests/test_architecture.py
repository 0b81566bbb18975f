"""The layout tells the architecture: budgets and import rules of the package, checked on its source.

* no module above 600 lines, no function body above 80 lines (its docstring not counted);
* no name starting with ``_`` imported from another cachelayers module;
* no import cycle between modules (a package importing its own submodules is not one);
* imports run downwards: backends never import engines or decorators, engines never import decorators, and
  the ground floor imports only the ground floor.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path
from typing import Final

import pytest

SRC: Final = Path(__file__).resolve().parent.parent / "src"
MAX_MODULE_LINES: Final = 600
MAX_FUNCTION_LINES: Final = 80
GROUND: Final = frozenset({"cachelayers.breaker", "cachelayers.codec", "cachelayers.durations", "cachelayers.errors",
                           "cachelayers.ignoring", "cachelayers.keys", "cachelayers.loops", "cachelayers.metrics",
                           "cachelayers.validation"})


def _ground(module: str) -> bool:
    return any(module == floor or module.startswith(floor + ".") for floor in GROUND)


def _name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, tuple[Path, ast.Module]]:
    """Every module of the package: its path and syntax tree, by dotted name."""
    return {_name(path): (path, ast.parse(path.read_text())) for path in sorted((SRC / "cachelayers").rglob("*.py"))}


@cache
def imports() -> dict[str, frozenset[str]]:
    """The cachelayers modules each module imports (at any depth of its code)."""
    known = modules()
    graph: dict[str, frozenset[str]] = {}
    for name, (_, tree) in known.items():
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in known:
                found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                             for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in known)
        # A submodule's import of its own package (for its __init__) is not an edge back.
        graph[name] = frozenset(dep for dep in found if dep != name and not name.startswith(dep + "."))
    return graph


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        body = body[1:]
    if not body:
        return 0
    return (body[-1].end_lineno or body[-1].lineno) - body[0].lineno + 1


def test_the_package_is_found() -> None:
    """The checks below look at the real source tree (a vacuous pass would hide everything)."""
    assert {"cachelayers", "cachelayers.settings", "cachelayers.engines", "cachelayers.backends"} <= set(modules())
    assert len(modules()) > 30


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_and_function_sizes(name: str) -> None:
    """A module holds one job: at most 600 lines, no function body above 80 lines."""
    path, tree = modules()[name]
    assert path.read_text().count("\n") <= MAX_MODULE_LINES
    long = [(node.name, _body_lines(node)) for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _body_lines(node) > MAX_FUNCTION_LINES]
    assert long == []


def test_no_private_name_crosses_a_module() -> None:
    """Modules talk through public names: nothing starting with ``_`` is imported from another module."""
    crossing = [(name, node.module, alias.name) for name, (_, tree) in modules().items() for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cachelayers")
                for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert crossing == []


def test_no_import_cycle() -> None:
    """No module reaches itself through the imports of others (lazy imports inside functions count)."""
    graph = imports()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert cycles == []


def test_imports_run_downwards() -> None:
    """Backends never import engines or decorators; engines never import decorators; the ground floor
    imports only the ground floor."""
    upward = []
    for name, deps in imports().items():
        for dep in sorted(deps):
            if name.startswith("cachelayers.backends") and dep.startswith(("cachelayers.engines",
                                                                           "cachelayers.decorators")):
                upward.append((name, dep))
            if name.startswith("cachelayers.engines") and dep.startswith("cachelayers.decorators"):
                upward.append((name, dep))
            if _ground(name) and not _ground(dep):
                upward.append((name, dep))
    assert upward == []
