"""The package's structure holds what docs/architecture.md promises: no import cycle, lazy imports included.

A cycle hidden in a function-level import works until someone moves a line; these checks read
the source, so they fail the moment one appears.
"""

from __future__ import annotations

import ast
from pathlib import Path

import timm_dgate

PACKAGE = Path(timm_dgate.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(sub) for sub in ast.walk(node)}
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports at run time (module level or inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_checking_nodes(tree)
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                deps |= {f"{base}.{a.name}" for a in node.names} if node.module is None else {base}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("timm_dgate"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("timm_dgate")}
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle_lazy_imports_included():
    graph = import_graph()
    assert "timm_dgate.model" in graph["timm_dgate.cli"]  # a function-level import is seen
    assert "timm_dgate.hub" in graph["timm_dgate.model"]  # and a module-level one
    assert cycles(graph) == []


def test_library_modules_do_not_import_the_package_init():
    """Only the demo, a client of the public API, may; library modules import the module that owns a name."""
    importers = {m for m, deps in import_graph().items() if "timm_dgate" in deps}
    assert importers <= {"timm_dgate.demo.pipeline"}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen


def test_the_hub_module_never_imports_the_model_module():
    assert "timm_dgate.model" not in reachable(import_graph(), "timm_dgate.hub")


def test_the_runtime_never_imports_the_model_module():
    """The deployable side runs exported files with torch (and onnxruntime) alone, not the gated model's code."""
    seen = reachable(import_graph(), "timm_dgate.runtime")
    assert "timm_dgate.engine" in seen and not seen & {"timm_dgate.model", "timm_dgate.exporting", "timm_dgate.hub"}


def test_public_names_are_not_shadowed_by_submodules():
    """``timm_dgate.calibrate`` is the function, and no submodule of that name hides behind it."""
    submodules = {path.stem for path in PACKAGE.glob("*.py")}
    assert not submodules & set(timm_dgate.__all__)
