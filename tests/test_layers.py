"""The package layers import only downward, and every module imports on its own.

The layer order is what lets a newcomer read the code bottom-up and lets a plugin author depend on
``bench.core``/``bench.nn`` without pulling in the orchestration: core < nn < plugins (attacks,
defenses) < report < orchestration < cli. Imports are read from the source (including imports inside
functions), so a lazy upward import is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "attacks", "defenses")

# Lower number = lower layer. A module may import from its own layer or any lower one.
LAYERS = {
    "bench.core": 0,
    "bench.nn": 1,
    "attacks": 2,
    "defenses": 2,
    "bench.report": 3,
    "bench.orchestration": 4,
    "bench.cli": 5,
}


def layer_of(module: str) -> int | None:
    """The layer of a project module, by its longest matching prefix (None for the root ``bench``)."""
    best = None
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def project_modules() -> list[str]:
    modules = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.append(".".join(parts))
    return modules


def module_path(module: str) -> Path:
    base = ROOT.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def imported_modules(module: str, skip: set[int] = frozenset()) -> set[str]:
    """Every project module named by an import statement in ``module``'s source (nodes in ``skip`` aside)."""
    path = module_path(module)
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def upward_imports() -> list[str]:
    problems = []
    for module in project_modules():
        own = layer_of(module)
        if own is None:
            continue
        for target in sorted(imported_modules(module)):
            theirs = layer_of(target)
            if theirs is not None and theirs > own:
                problems.append(f"{module} (layer {own}) imports {target} (layer {theirs})")
    return problems


def test_every_module_belongs_to_a_layer():
    unplaced = [m for m in project_modules() if layer_of(m) is None and m != "bench"]
    assert unplaced == []


def test_imports_point_only_downward():
    assert upward_imports() == []


def test_the_check_catches_an_upward_import(monkeypatch):
    """The checker itself is live: a core module importing the orchestration is reported."""
    real = imported_modules

    def with_violation(module: str) -> set[str]:
        found = real(module)
        return found | {"bench.orchestration.runner"} if module == "bench.core.errors" else found

    monkeypatch.setitem(globals(), "imported_modules", with_violation)
    assert upward_imports() == ["bench.core.errors (layer 0) imports bench.orchestration.runner (layer 4)"]


def import_time_edges(module: str) -> set[str]:
    """Project modules imported while ``module`` itself is being imported (not inside functions)."""
    path = module_path(module)
    tree = ast.parse(path.read_text(), filename=str(path))
    lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f) if n is not f}
    eager = imported_modules(module, skip=lazy)
    known = set(project_modules())
    return {name for name in eager if name in known and name != module}


def import_cycles() -> list[list[str]]:
    graph = {m: import_time_edges(m) for m in project_modules()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_import_cycles():
    assert import_cycles() == []


def test_every_module_imports():
    """Each module loads (an ImportError from a cycle or a missing name fails here) as itself."""
    loaded = [importlib.import_module(module).__name__ for module in project_modules()]
    assert loaded == project_modules()


def test_the_cycle_check_catches_a_cycle(monkeypatch):
    real = import_time_edges

    def with_cycle(module: str) -> set[str]:
        found = real(module)
        return found | {"bench.core.registry"} if module == "bench.core.errors" else found

    monkeypatch.setitem(globals(), "import_time_edges", with_cycle)
    assert ["bench.core.errors", "bench.core.registry", "bench.core.errors"] in import_cycles()
