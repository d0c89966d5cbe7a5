"""No module of tvm_patdnn imports one that imports it back, at module or function level.

A cycle means two modules can only be understood (and changed) together, and a function-level
import that closes one only hides it from Python, not from the reader. The graph is read from
the source with ``ast``: every ``import`` anywhere in a module is an edge. Importing
``tvm_patdnn.x.y`` runs package ``tvm_patdnn.x``'s ``__init__`` too, so it is also an edge to
that ``__init__`` (unless the importer is inside that package: Python runs a package's
``__init__`` before its submodules anyway); not to the root ``tvm_patdnn/__init__.py``, whose
lazy ``__getattr__`` is the public facade over everything.
"""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent / "tvm_patdnn"
PACKAGE = ROOT.name


def _modules() -> dict[str, Path]:
    """Dotted module name -> file (a package is named by its ``__init__.py``)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The tvm_patdnn modules ``name`` imports, with the packages whose ``__init__`` that runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            submodules = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in modules]
            targets.update(submodules)
            if len(submodules) < len(node.names):  # names defined in the module itself
                targets.add(module)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    edges = set()
    for target in targets:
        while target.startswith(PACKAGE + ".") and not (name + ".").startswith(target + "."):
            if target in modules:  # the module, then every package above it but the importer's own
                edges.add(target)
            target = target.rpartition(".")[0]
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that ends where it starts) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(_cycle_through(sorted(component), graph))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _cycle_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start, members = component[0], set(component)
    paths = {target: [start, target] for target in graph[start] if target in members}
    while start not in paths:
        paths = {target: path + [target] for path in paths.values() for target in sorted(graph[path[-1]])
                 if target in members and target not in path[1:]} | paths
    return paths[start]


def test_the_checker_sees_a_cycle_through_a_package_init() -> None:
    graph = {"tvm_patdnn.a": {"tvm_patdnn.b"}, "tvm_patdnn.b": {"tvm_patdnn.a"}, "tvm_patdnn.c": set()}
    assert cycles(graph) == [["tvm_patdnn.a", "tvm_patdnn.b", "tvm_patdnn.a"]]
    modules = _modules()
    edges = _imported("tvm_patdnn.tuning.measure", modules["tvm_patdnn.tuning.measure"], modules)
    assert {"tvm_patdnn.ops.pattern_conv", "tvm_patdnn.ops"} <= edges and "tvm_patdnn" not in edges


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in found)
