"""The layering of the package, enforced: what each layer may import, and no import cycles.

Every ``import`` in every module counts, including those inside functions and under
``if TYPE_CHECKING:`` (a cycle hidden there is still a cycle in the design).  The layers are
drawn in docs/architecture.md; this test is their definition.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "meshd"

PURE = ("meshd.trust", "meshd.swim", "meshd.channel", "meshd.tunnel")
"""Pure cores: bytes and messages in, events and messages out; ``now`` is passed in."""

FORBIDDEN_IN_PURE = ("asyncio", "zmq", "aiohttp", "sqlite3", "time", "socket", "selectors",
                     "threading", "zeroconf")
"""What a pure core never imports: no event loop, no sockets, no database, no clock."""

ALLOWED: dict[str, tuple[str, ...]] = {
    # layer: the meshd layers it may import (itself always)
    "meshd.errors": (),
    "meshd.trust": ("meshd.errors",),
    "meshd.swim": ("meshd.errors",),
    "meshd.channel": ("meshd.errors", "meshd.trust"),
    "meshd.tunnel": ("meshd.errors", "meshd.trust", "meshd.channel"),
    "meshd.state": ("meshd.errors", "meshd.trust"),
    "meshd.peer": ("meshd.errors", "meshd.trust", "meshd.channel"),
    "meshd.local": ("meshd.errors", "meshd.channel"),
    "meshd.app": ("meshd.errors", "meshd.trust", "meshd.channel", "meshd.local", "meshd.state"),
    "meshd.daemon": ("meshd.errors", "meshd.trust", "meshd.swim", "meshd.channel", "meshd.tunnel",
                     "meshd.state", "meshd.peer", "meshd.local", "meshd"),
    "meshd.testing": ("meshd.errors", "meshd.swim", "meshd.state", "meshd.app"),
    "meshd.cli": ("meshd.errors", "meshd.trust", "meshd.state", "meshd.local", "meshd.app",
                  "meshd.testing", "meshd.daemon", "meshd"),
    "meshd": ("meshd.errors", "meshd.app"),
    "meshd.__main__": ("meshd.cli",),
}
"""Nothing below ``cli`` imports the daemon; the daemon never imports the application library."""


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


ALL = modules()


def imports_of(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """Every module ``name`` imports, resolved to a module of the tree where it is one."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in ALL else base), node.lineno


def layer_of(name: str) -> str:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if name == layer or name.startswith(layer + "."):
            return layer
    raise AssertionError(f"{name} belongs to no layer: add it to ALLOWED")


def test_every_module_belongs_to_a_layer() -> None:
    for name in ALL:
        layer_of(name)


@pytest.mark.parametrize("layer", PURE)
def test_pure_cores_do_no_io_and_read_no_clock(layer: str) -> None:
    bad = [f"{name}:{line} imports {target}" for name, path in ALL.items()
           if layer_of(name) == layer for target, line in imports_of(name, path)
           if target.split(".")[0] in FORBIDDEN_IN_PURE]
    assert not bad, "\n".join(bad)


def test_each_layer_imports_only_the_layers_below_it() -> None:
    bad = []
    for name, path in ALL.items():
        mine = layer_of(name)
        for target, line in imports_of(name, path):
            if target != "meshd" and not target.startswith("meshd."):
                continue
            theirs = layer_of(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                bad.append(f"{name}:{line} ({mine}) imports {target} ({theirs})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_even_under_type_checking() -> None:
    graph = {name: {t for t, _ in imports_of(name, path) if t in ALL and t != name}
             for name, path in ALL.items()}
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(sorted(c)) for c in cycles)


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[set[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


GLUE_AND_CALLERS = ("meshd.daemon", "meshd.peer", "meshd.state", "meshd.app", "meshd.cli",
                    "meshd.local")
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300


def test_glue_and_caller_modules_and_classes_stay_small() -> None:
    """A module of the glue or the callers that grows past these limits holds more than one
    concern (the pure cores may be longer where one state machine needs it)."""
    big = []
    for name, path in ALL.items():
        if layer_of(name) not in GLUE_AND_CALLERS:
            continue
        text = path.read_text()
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            big.append(f"{name}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    big.append(f"{name}.{node.name}: class of {size} lines")
    assert not big, "\n".join(big)


def test_the_checker_sees_a_cycle_and_a_forbidden_import(tmp_path: Path) -> None:
    """The checks above can fail: a two-module cycle is found, a clock import in a pure core is seen."""
    assert strongly_connected({"a": {"b"}, "b": {"a"}, "c": set()}) == [{"a", "b"}]
    probe = tmp_path / "probe.py"
    probe.write_text("import time\nif False:\n    from meshd.daemon import app\n")
    found = {t for t, _ in imports_of("meshd.trust.probe", probe)}
    assert "time" in found and "meshd.daemon.app" in found
