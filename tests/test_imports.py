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
    assert "wsserver.client" in graph["wsserver.cli"]  # inside a function
    assert {"wsserver.console", "wsserver.ws"} <= graph["wsserver.extension"]  # from . import a, b
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


# -- no function over 60 lines -----------------------------------------------------------------

MAX_FUNCTION_LINES = 60

# argparse's declarations: a call per flag with its help text, nothing to branch on or to test
# apart; cut into pieces they would only be harder to read against ``--help``
PARSER_CALLS = frozenset(
    {"ArgumentParser", "add_parser", "add_subparsers", "add_argument", "add_argument_group",
     "add_mutually_exclusive_group", "set_defaults"}
)


def declares_parsers_only(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether every statement of ``func`` (past its docstring) is an argparse declaration:
    ``x = ....add_parser(...)`` or ``x.add_argument(...)`` and the like."""
    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    for stmt in body:
        value = stmt.value if isinstance(stmt, (ast.Expr, ast.Assign)) else None
        if not isinstance(value, ast.Call):
            return False
        name = value.func.attr if isinstance(value.func, ast.Attribute) else None
        if name not in PARSER_CALLS:
            return False
    return bool(body)


def long_functions() -> list[str]:
    """``module.function (n lines)`` for every function or method longer than the limit
    (``end_lineno - lineno + 1``, decorators left out) that is not a parser declaration."""
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES and not declares_parsers_only(node):
                found.append(f"{name}.{node.name} ({lines} lines)")
    return found


def test_the_parser_exemption_recognises_declarations_only():
    declared = ast.parse(
        "def f(sub):\n    '''doc'''\n    p = sub.add_parser('x')\n    p.add_argument('--y')\n"
        "    p.set_defaults(func=run)\n"
    ).body[0]
    assert declares_parsers_only(declared)
    logic = ast.parse(
        "def f(sub):\n    p = sub.add_parser('x')\n    if p:\n        p.add_argument('--y')\n"
    ).body[0]
    assert not declares_parsers_only(logic)
    calls = ast.parse("def f(s):\n    s.send(1)\n    s.add_argument('--y')\n").body[0]
    assert not declares_parsers_only(calls)
    assert not declares_parsers_only(ast.parse("def f():\n    '''only a docstring'''\n").body[0])


def test_no_function_is_over_60_lines():
    """House style: a function that does not fit a screen does several things (issue 16:
    the session loop was 143 lines). argparse declarations are exempt (today
    ``cli._add_client_commands``): see ``PARSER_CALLS``."""
    assert long_functions() == []


def test_the_server_imports_no_client_dependency():
    """``pip install wsserver`` leaves requests and websocket-client out (they are the
    ``client`` extra): neither the app, nor the gunicorn config, nor the command may need them."""
    import subprocess
    import sys

    code = ("import sys, wsserver.app, wsserver.cli, wsserver.__main__; "
            "wsserver.app.create_app(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('requests', 'websocket')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
