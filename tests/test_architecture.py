"""The package's structure holds what docs/architecture.md promises.

No import cycle, lazy and type-only imports included; each folder imports only the folders below
it; no module grows past 400 lines and the package root stays small. These checks read the
source, so they fail the moment a rule is broken, not when someone later moves a line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import timm_dgate

PACKAGE = Path(timm_dgate.__file__).parent
FOUNDATION = {"errors", "compat", "progress", "version"}  # root modules every folder may use
BELOW_MODELS = {"core", "boundaries", "fitting", "calibration", "evaluation", "hub", "deploy", "reports"}
# folder (or root module) -> what it may import besides itself and FOUNDATION
MAY_IMPORT = {
    "core": set(),
    "boundaries": {"core"},
    "fitting": {"core"},
    "calibration": {"core"},
    "reports": {"core"},
    "evaluation": {"core", "calibration", "reports"},
    "hub": {"core", "boundaries", "reports"},
    "deploy": {"core"},
    "fashion_mnist": set(),
    "models": BELOW_MODELS,
    "serve": BELOW_MODELS | {"models"},  # Ray Serve applications over folders (ray imported lazily)
    "cli": BELOW_MODELS | {"models", "fashion_mnist", "demo", "serve"},
    "demo": BELOW_MODELS | {"models", "fashion_mnist", "cli", "timm_dgate"},
    "timm_dgate": BELOW_MODELS | {"models"},  # the package __init__: re-exports only
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports: at module level, inside functions, and under ``TYPE_CHECKING``."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                deps |= {base} | {f"{base}.{a.name}" for a in node.names}  # `from ..hub import folder`: a module
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


def area(module: str) -> str:
    """The folder (or root module) a module belongs to: ``timm_dgate.core.policy`` -> ``core``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "timm_dgate"


def test_the_import_graph_has_no_cycle_lazy_and_type_only_imports_included():
    graph = import_graph()
    assert "timm_dgate.boundaries.selection" in graph["timm_dgate.cli.main"]  # a function-level import is seen
    assert "timm_dgate.core.policy" in graph["timm_dgate.models.gated"]  # and a module-level one
    assert "timm_dgate.core.exit_table" in graph["timm_dgate.core.contract"]  # and a TYPE_CHECKING one
    assert "timm_dgate.hub.cascade_folder" in graph["timm_dgate.models.auto"]  # and `from ..hub import cascade_folder`
    assert cycles(graph) == []


def test_each_folder_imports_only_the_folders_below_it():
    """core/ imports nothing above it; hub/ and deploy/ never import models/; the algorithms type against
    core.contract instead of importing a model class."""
    graph = import_graph()
    assert {area(m) for m in graph} <= set(MAY_IMPORT) | FOUNDATION, "a new folder needs a rule here"
    broken = sorted(
        f"{module} -> {dep}"
        for module, deps in graph.items()
        if area(module) in MAY_IMPORT
        for dep in deps
        if area(dep) not in MAY_IMPORT[area(module)] | FOUNDATION | {area(module)}
    )
    assert broken == []


def test_foundation_modules_import_no_other_part_of_the_package():
    graph = import_graph()
    assert {m: graph[f"timm_dgate.{m}"] for m in FOUNDATION} == {m: set() for m in FOUNDATION}


def test_library_modules_do_not_import_the_package_init():
    """Only the demo, a client of the public API, may; library modules import the module that owns a name."""
    importers = {m for m, deps in import_graph().items() if "timm_dgate" in deps}
    assert importers <= {"timm_dgate.demo.pipeline"}


def test_no_module_is_over_400_lines_and_the_root_stays_small():
    lines = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in lines.items() if n > 400} == {}
    root_modules = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(root_modules) <= 12, root_modules


def test_public_names_are_not_shadowed_by_submodules():
    """``timm_dgate.calibrate`` is the function, and no root module or folder of that name hides behind it."""
    names = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert not names & set(timm_dgate.__all__)
