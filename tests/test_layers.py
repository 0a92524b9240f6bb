"""The floors of the code base hold: no import climbs back up, node and fleet keep to their
own insides, and no modules import each other in a circle (docs/architecture.md, "Folders")."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "schemas": set(),
    "common": {"schemas"},
    "runtime": {"common", "schemas"},
    "node": {"runtime", "common", "schemas"},
    "fleet": {"runtime", "common", "schemas"},
    "demo": {"node", "fleet", "runtime", "common", "schemas"},
}
"""Package -> the packages of ours it may import."""
SIMULATOR_MAY_RUN_THE_NODE = ("fleet.simulate.",)
"""Simulated nodes run the node's real model manager, fetch and telemetry (an exception)."""


def _modules() -> dict[str, Path]:
    found = {}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (anywhere in the file, lazily too)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                target = resolve(name)
                if target is not None and target != module:
                    edges[module].add(target)
    return edges


def test_no_import_climbs_up_a_floor_or_reaches_into_a_sibling() -> None:
    edges = _imports(_modules())
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in edges.items()
        for target in targets
        if (package := module.split(".")[0]) != (theirs := target.split(".")[0])
        and theirs not in ALLOWED[package]
        and not (module.startswith(SIMULATOR_MAY_RUN_THE_NODE) and theirs == "node")
    )
    assert wrong == []


def test_no_modules_import_each_other_in_a_circle() -> None:
    edges = _imports(_modules())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in edges.get(module, ()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for module in sorted(_modules()):
        if module not in index:
            visit(module)
    assert circles == []
