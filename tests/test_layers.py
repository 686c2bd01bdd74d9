"""The import graph of pgproxy/ has no circle, and its layers point one way.

Every module under pgproxy/ is a node and every import an edge: top-level imports, imports
inside functions and under ``if TYPE_CHECKING:`` alike (a circle held together by lazy or
type-only imports is still a circle for the reader). The modules are read with ``ast``,
never imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pgproxy"

# The layers, lowest first: the wire protocol (sans-I/O), the pooling core, the daemon's
# services, the command line. A module may import its own layer and those below. The
# modules in no layer (configuration, counters, TLS contexts, hba rules, ...) are shared
# foundations: they may import the protocol layer only.
LAYERS = ("pgproxy.protocol", "pgproxy.core", "pgproxy.services", "command line")
COMMAND_LINE = frozenset({"pgproxy.cli", "pgproxy.__main__", "pgproxy.demo"})


def module_name(path: Path) -> str:
    """``pgproxy.protocol.stream`` for pgproxy/protocol/stream.py; a package by its name."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_names(name: str, path: Path) -> set[str]:
    """Every dotted name ``path`` imports, wherever the import statement is."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            found.add(origin)
            # ``from pgproxy import params`` imports the module pgproxy.params.
            found.update(f"{origin}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (itself excluded)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for imported in imported_names(name, path):
            # ``import pgproxy.protocol.codes`` also runs pgproxy.protocol, and so on up;
            # the package's face (pgproxy/__init__.py) is a leaf every module may use.
            while imported and imported != "pgproxy":
                if imported in known and imported != name:
                    targets.add(imported)
                imported = imported.rpartition(".")[0]
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as a list of modules (first == last), or None."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    for start in sorted(graph):
        if colour[start] != white:
            continue
        colour[start] = grey
        path = [start]
        stack = [iter(sorted(graph[start]))]
        while stack:
            target = next(stack[-1], None)
            if target is None:
                colour[path.pop()] = black
                stack.pop()
            elif colour[target] == grey:
                return [*path[path.index(target) :], target]
            elif colour[target] == white:
                colour[target] = grey
                path.append(target)
                stack.append(iter(sorted(graph[target])))
    return None


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert "pgproxy.cli" in graph
    assert "pgproxy.protocol.stream" in graph
    assert "pgproxy.config" in graph["pgproxy.cli"]


def test_imports_found_everywhere(tmp_path: Path) -> None:
    path = tmp_path / "sample.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pgproxy.config import Settings\n"
        "def f():\n    from . import tls\n    import pgproxy.hba\n"
        "from .protocol import codes\n"
    )
    found = imported_names("pgproxy.sample", path)
    assert {"pgproxy.config", "pgproxy.tls", "pgproxy.hba", "pgproxy.protocol.codes"} <= found


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def layer_of(module: str) -> int | None:
    """The index of ``module``'s layer in LAYERS; None for a shared foundation."""
    if module in COMMAND_LINE:
        return LAYERS.index("command line")
    for index, package in enumerate(LAYERS):
        if module == package or module.startswith(package + "."):
            return index
    return None


def test_layers_point_one_way() -> None:
    protocol, core = LAYERS.index("pgproxy.protocol"), LAYERS.index("pgproxy.core")
    upward = []
    for module, targets in import_graph().items():
        for target in targets:
            mine, theirs = layer_of(module), layer_of(target)
            if mine is None:  # a foundation: the protocol layer at most
                if theirs is not None and theirs > protocol:
                    upward.append(f"{module} -> {target}")
            elif theirs is None:  # the protocol layer needs no foundation
                if mine == protocol:
                    upward.append(f"{module} -> {target}")
            elif theirs > mine:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point up a layer: " + ", ".join(sorted(upward))
    assert layer_of("pgproxy.core.pool") == core
    assert layer_of("pgproxy.config") is None
