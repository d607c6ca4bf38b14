"""The package is built in floors: a module imports only from its own floor or below (issue 10).

Every relative import in ``src/kronfisher`` is read from the source, wherever it is written (module top, inside a
function, under ``TYPE_CHECKING``), so an import hidden in a function to dodge a circle is seen too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kronfisher"

# Floors, bottom first. A module's floor is that of its first dotted part (``algebra.eigen`` -> ``algebra``).
FLOORS: list[set[str]] = [
    {
        "_version",
        "errors",
        "faults",
        "options",
        "config",
        "layers",
        "report",
        "comm",
        "data",
        "models",
        "footprint",
        "plan",
        "transfer",
        "budget",
    },
    {"algebra"},
    {"collection"},
    {"decompose"},
    {"operator"},
    {"io"},
    {"drivers", "distributed", "__init__"},
    {"analysis", "cli"},
]
# The one sanctioned upward import: ``KFAC.save`` (public API) writes through the file layer above it.
SANCTIONED = {("operator", "io.files")}
MAX_LINES = 400
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _floor(module: str) -> int:
    head = module.split(".")[0]
    for i, names in enumerate(FLOORS):
        if head in names:
            return i
    raise AssertionError(f"module {module!r} is on no floor: add it to FLOORS")


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(target module, imported names, line) of every relative import in ``path``."""
    module = _module_name(path)
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    if path.name == "__init__.py" and module == "__init__":
        package = []
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join([*base, *([node.module] if node.module else [])])
            if not node.module:  # ``from . import x``: x is a module of that package
                for alias in node.names:
                    out.append((".".join([*base, alias.name]), [], node.lineno))
            else:
                out.append((target, [a.name for a in node.names], node.lineno))
    return out


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_module_imports_only_its_own_floor_or_below() -> None:
    upward = []
    for path in _sources():
        me = _module_name(path)
        for target, _, line in _imports(path):
            if (me, target) in SANCTIONED:
                continue
            if _floor(target) > _floor(me):
                upward.append(
                    f"{path.relative_to(SRC)}:{line} imports {target} (floor {_floor(target)} > {_floor(me)})"
                )
    assert not upward, "\n".join(upward)


def test_no_import_circle_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p) for p in _sources()}
    for path in _sources():
        me = _module_name(path)
        graph[me] = {t for t, _, _ in _imports(path) if t in modules and t != me and (me, t) not in SANCTIONED}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_private_name_is_imported_from_another_module() -> None:
    private = [
        f"{path.relative_to(SRC)}:{line} imports {name} from {target}"
        for path in _sources()
        for target, names, line in _imports(path)
        for name in names
        if name.startswith("_") and name != "__version__"
    ]
    assert not private, "\n".join(private)


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_module_and_function_sizes(path: Path) -> None:
    text = path.read_text()
    assert text.count("\n") <= MAX_LINES, f"{path.relative_to(SRC)} has {text.count(chr(10))} lines (> {MAX_LINES})"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.relative_to(SRC)}: functions over {MAX_FUNCTION_LINES} lines: {long}"
