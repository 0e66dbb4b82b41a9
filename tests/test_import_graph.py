"""The package's import graph, read from the source (function-level imports included), has no
cycle: a module that imports another one imports nothing that comes back to it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import twisted_novnc

#: module -> {imported module of the package: line of the first such import}
Graph = dict[str, dict[str, int]]


def modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under ``root``, by dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join([package, *parts])] = path
    return found


def _targets(node: ast.Import | ast.ImportFrom, name: str, is_package: bool) -> Iterator[str]:
    """The modules one import statement names: ``from a import b`` is ``a`` and, when ``b``
    is a module, ``a.b``; relative imports are resolved against ``name``."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    base = node.module or ""
    if node.level:
        here = name.split(".") if is_package else name.split(".")[:-1]
        here = here[: len(here) - (node.level - 1)]
        base = ".".join(here + ([base] if base else []))
    yield base
    for alias in node.names:
        yield f"{base}.{alias.name}"


def import_graph(root: Path, package: str) -> Graph:
    """Who imports whom inside the package, from every import statement anywhere in a module
    (in functions too: a lazy import is still a dependency).  Importing ``a.b.c`` also runs
    the packages ``a.b`` and ``a``, so those count as imported as well."""
    known = modules(root, package)
    graph: Graph = {}
    for name, path in known.items():
        edges: dict[str, int] = {}
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _targets(node, name, is_package):
                parts = target.split(".")
                for end in range(len(parts), 0, -1):
                    imported = ".".join(parts[:end])
                    if imported in known and imported != name:
                        edges.setdefault(imported, node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan), as a path that
    starts and ends at the same module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, {})):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: Graph, group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target not in group:
                    continue
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle in {group}")  # a strongly connected group always has one


def describe(graph: Graph, cycle: list[str]) -> str:
    """``a (line 3) -> b (line 40) -> a``: each arrow is the import on that line."""
    steps = [f"{a} (line {graph[a][b]})" for a, b in pairwise(cycle)]
    return " -> ".join([*steps, cycle[-1]])


def package_graph() -> Graph:
    return import_graph(Path(twisted_novnc.__file__).parent, "twisted_novnc")


def test_the_package_has_no_import_cycle():
    """No module of twisted_novnc reaches itself through imports, lazy ones included."""
    graph = package_graph()
    assert "twisted_novnc.processes.service" in graph  # the walk found the package
    found = [describe(graph, cycle) for cycle in cycles(graph)]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_the_worker_main_is_imported_only_by_its_command():
    """The worker's main depends on the service tree, never the other way round: only the
    ``worker`` command of ``python -m twisted_novnc`` imports it."""
    graph = package_graph()
    importers = {name for name, edges in graph.items() if "twisted_novnc.processes.worker" in edges}
    assert importers == {"twisted_novnc.__main__"}
    assert "twisted_novnc.processes.service" in graph["twisted_novnc.processes.worker"]


def test_a_lazy_import_cycle_is_found_and_named(tmp_path):
    """The cycle workers.py and service.py had (one side importing the other inside a
    function), relative imports and ``from package import module`` are all seen."""
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "service.py").write_text("from pkg.sub.workers import Launcher\n")
    (root / "sub" / "workers.py").write_text(
        "class Launcher:\n    pass\n\n\ndef run():\n    from . import service\n"
    )
    (root / "main.py").write_text("from pkg.sub import workers\n")
    graph = import_graph(root, "pkg")
    assert graph["pkg.main"] == {"pkg.sub.workers": 1, "pkg.sub": 1, "pkg": 1}
    (cycle,) = cycles(graph)
    assert describe(graph, cycle) == "pkg.sub.service (line 1) -> pkg.sub.workers (line 6) -> " \
        "pkg.sub.service"
