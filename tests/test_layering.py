"""The project's import rules: ``pipeline`` may import ``workers`` and ``storage``,
``workers`` may import ``storage``, ``storage`` neither (docs/design.md §2); and no modules
import each other in a circle, counting the imports made inside functions (a lazy import
hides a circle from Python, not from the reader who has to follow it).

Read from the source with ``ast``: import-linter would say the same, but it is one more
dependency for two rules that fit in a page."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "workers", "storage")
MAY_IMPORT = {"pipeline": {"pipeline", "workers", "storage"}, "workers": {"workers", "storage"},
              "storage": {"storage"}}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in it (``from a.b import c`` counts as
    a.b, and as a.b.c when c is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_each_package_imports_only_the_layers_below_it():
    wrong = [f"{module} imports {target}" for module, targets in import_graph().items() for target in targets
             if target.split(".")[0] not in MAY_IMPORT[module.split(".")[0]]]
    assert wrong == []


def test_no_modules_import_each_other_in_a_circle():
    assert circles(import_graph()) == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set(), "c": {"b"}}, []),
])
def test_the_circle_finder_finds_circles(graph, expected):
    assert circles(graph) == expected
