"""The package's import graph has no cycle, and every module declares its public names.

Why: a cycle (``config`` importing ``auth`` importing ``config``) works only as long as the
lazy import stays inside a function and nobody reorders the module's top; it also means
neither module can be understood or tested alone. Function-level imports count: they are
cycles postponed, not removed. The graph is read from the source with ``ast``, so a cycle
is found even on a path no test runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "wsserver"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports when it runs (top level and inside functions),
    resolved to module names: ``from . import x`` names module ``x`` when there is one, else
    the package. Imports under ``if TYPE_CHECKING:`` are left out: they never execute, and a
    type annotation naming the module that owns this one (the service that creates its
    commands) is the owner relation, not a cycle."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            submodules = [f"{stem}.{alias.name}" for alias in node.names]
            targets = [t for t in submodules if t in MODULES] or [stem]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # a name inside a module: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: imported_modules(name, path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (depth-first, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def without_package_to_own_submodules(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph less the edges from a package to its own submodules (``brokers`` to
    ``brokers.memory``). Importing a submodule always runs its package's ``__init__`` first,
    so a submodule depends on its package whether it says so or not; a package that
    re-exports or builds from its submodules would then always be "a cycle". That is how
    Python packages work, not two concerns tangled; every other edge counts."""
    return {
        name: {dep for dep in deps if not dep.startswith(name + ".")}
        for name, deps in graph.items()
    }


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "wsserver.config" in graph["wsserver.auth"]  # module level, relative
    assert "wsserver.app" in graph["wsserver"]  # inside __getattr__
    assert "wsserver.brokers.redis" in graph["wsserver.gunicorn_conf"]  # inside a hook
    assert {"wsserver.console", "wsserver.ws"} <= graph["wsserver.app"]  # from . import a, b
    assert "wsserver.brokers" in graph["wsserver.brokers.memory"]  # from . import Broker


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(without_package_to_own_submodules(import_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_declares_all(name):
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    declared = [
        node
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        and any(
            isinstance(t, ast.Name) and t.id == "__all__"
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        )
    ]
    assert declared, f"{MODULES[name]} has no __all__"
