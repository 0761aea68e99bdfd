"""The layers of DESIGN §2, checked on every import statement of every module (in functions and ``TYPE_CHECKING``
blocks too, where a check of the top of a file would miss them).

Arrows point down only: ``simulations/`` → ``server/``, ``client/`` → ``common/``. ``client/`` and ``server/`` never
import each other; nothing imports ``simulations/``; ``common/`` imports no Flower outside its codec package
(``common/codec/``). And no module imports itself through a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "server", "client", "simulations")
FORBIDDEN: dict[str, frozenset[str]] = {
    "common": frozenset({"server", "client", "simulations"}),
    "client": frozenset({"server", "simulations"}),
    "server": frozenset({"client", "simulations"}),
    "simulations": frozenset(),
}
"""Top-level packages each package may not import."""
FLOWER_ALLOWED_IN_COMMON = "common.codec"


def module_sources(root: Path = ROOT) -> dict[str, str]:
    """Every module of the four packages: dotted name → source."""
    sources = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            sources[name] = path.read_text(encoding="utf-8")
    return sources


def imports_of(module: str, source: str, known: Iterable[str]) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every import statement in ``source``, wherever it sits.

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module, else of ``pkg``; relative
    imports are resolved against ``module``.
    """
    modules = set(known)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: -node.level] if node.level else []
                base = ".".join([*parts, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in modules else base))
    return found


def arrow_violations(sources: Mapping[str, str]) -> list[str]:
    """``module:line imports X`` for every import against the arrows."""
    problems = []
    for module, source in sources.items():
        package = module.split(".")[0]
        for line, imported in imports_of(module, source, sources):
            top = imported.split(".")[0]
            if top in FORBIDDEN[package]:
                problems.append(f"{module}:{line} imports {imported} ({package}/ may not import {top}/)")
            elif (
                package == "common"
                and top == "flwr"
                and not (module == FLOWER_ALLOWED_IN_COMMON or module.startswith(FLOWER_ALLOWED_IN_COMMON + "."))
            ):
                problems.append(f"{module}:{line} imports {imported} (Flower outside {FLOWER_ALLOWED_IN_COMMON})")
    return problems


def import_cycles(sources: Mapping[str, str]) -> list[list[str]]:
    """Every cycle of project modules importing each other (strongly connected components with more than one
    module, or a module importing itself), by Tarjan's algorithm."""
    graph = {
        module: sorted({imported for _, imported in imports_of(module, source, sources) if imported in sources})
        for module, source in sources.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for neighbour in graph[node]:
            if neighbour not in index:
                visit(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in on_stack:
                low[node] = min(low[node], index[neighbour])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_every_import_follows_the_arrows() -> None:
    assert arrow_violations(module_sources()) == []


def test_no_module_imports_itself_through_a_cycle() -> None:
    assert import_cycles(module_sources()) == []


def test_the_walk_sees_every_package_and_imports_inside_functions() -> None:
    sources = module_sources()
    assert {name.split(".")[0] for name in sources} == set(PACKAGES)
    assert "common.rules.svd" in sources and "server.engine" in sources
    lazy = imports_of("common.config", sources["common.config"], sources)
    assert any(imported == "common.rules.registry" for _, imported in lazy)


@pytest.mark.parametrize(
    ("module", "line", "verdict"),
    [
        ("client.data", "import simulations", "client/ may not import simulations/"),
        ("client.node", "def f():\n    from simulations.launcher import PROJECT_DIR", "client/ may not import"),
        ("client.model", "from server import engine", "client/ may not import server/"),
        ("server.engine", "if TYPE_CHECKING:\n    from client.node import NodeSettings", "server/ may not import"),
        ("common.lora", "from flwr.app import Message", "Flower outside common.codec"),
        ("common.rules.svd", "from simulations import cli", "common/ may not import simulations/"),
    ],
)
def test_an_import_against_the_arrows_is_caught(module: str, line: str, verdict: str) -> None:
    sources = dict(module_sources())
    sources[module] += "\n" + line + "\n"
    problems = arrow_violations(sources)
    assert any(p.startswith(f"{module}:") and verdict in p for p in problems), problems


def test_a_cycle_is_caught_even_through_a_lazy_import() -> None:
    sources = dict(module_sources())
    sources["common.lora"] += "\ndef f():\n    from common.rules import svd\n"
    assert any("common.lora" in cycle and "common.rules.svd" in cycle for cycle in import_cycles(sources))
