"""The shape of the library, as docs/architecture.md draws it, holds in the code.

Checked on the source (nothing imported): which modules may import what, that no function grows
past what a reader takes in at once, that the Layout names every module, and that the Imports
drawing has exactly the arrows the code has.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "commons" / "commons" / "cache"
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, ast.Module]:
    return {
        path.relative_to(PACKAGE).as_posix(): ast.parse(path.read_text())
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def imported(tree: ast.Module) -> set[str]:
    """Top-level packages and ``commons.cache`` modules a module imports (anywhere in it)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_backends_know_nothing_of_fastapi_starlette_or_the_request_flow() -> None:
    forbidden = re.compile(
        r"^(fastapi|starlette|fastapi_cache)\b|^commons\.cache\.(decorator|request_flow|decision|fill|"
        r"replica_lock|cached_route|rendering|http|middleware|layer|lifecycle)\b"
    )
    found = {
        name: sorted(m for m in imported(tree) if forbidden.match(m))
        for name, tree in modules().items()
        if name.startswith("backends/")
    }
    assert {name: bad for name, bad in found.items() if bad} == {}


@pytest.mark.parametrize("name", ["layer.py", "breaker.py", "removals.py", "pending.py"])
def test_the_layer_knows_the_stores_by_their_contract_only(name: str) -> None:
    """Whoever builds the layer passes its stores in (``lifecycle.py``): the layer and its parts
    import ``backends/base.py``, never the factory or a store."""
    backends = [m for m in imported(modules()[name]) if m.startswith("commons.cache.backends")]
    assert set(backends) <= {"commons.cache.backends.base"}


def test_the_request_decision_is_pure() -> None:
    """``decision.py`` chooses a request's outcome from plain values: no I/O, no framework."""
    assert imported(modules()["decision.py"]) <= {"__future__", "typing", "commons.cache.events"}


@pytest.mark.parametrize("name", ["keys.py", "keyspace.py", "scope.py"])
def test_key_building_imports_no_backend(name: str) -> None:
    assert [m for m in imported(modules()[name]) if m.startswith("commons.cache.backends")] == []


def test_commons_never_imports_the_example_service() -> None:
    everything = {
        name: imported(ast.parse(path.read_text()))
        for name, path in ((p.as_posix(), p) for p in (REPO / "commons").rglob("*.py"))
    }
    assert [
        name for name, deps in everything.items() if any("insights_backend" in d for d in deps)
    ] == []


def test_no_function_in_the_library_is_longer_than_a_screen() -> None:
    long = [
        f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_the_documented_layout_names_every_module() -> None:
    architecture = (REPO / "docs" / "architecture.md").read_text()
    layout = architecture.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [
        name
        for name in modules()
        if not name.endswith("__init__.py") and Path(name).name not in layout
    ]
    assert missing == []


# -- the import arrows docs/architecture.md draws -------------------------------------------------

ARROW = " ─► "


def unit_of(path: str) -> str | None:
    """The unit a module belongs to in the drawing: its path without ``.py``, the Redis package
    as one (``backends/redis``); ``None`` for a package's ``__init__``."""
    parts = path.removesuffix(".py").split("/")
    if parts[:2] == ["backends", "redis"]:
        return "backends/redis"
    return None if parts[-1] == "__init__" else "/".join(parts)


def unit_of_import(module: str) -> str | None:
    if not module.startswith("commons.cache."):
        return None
    parts = module.removeprefix("commons.cache.").split(".")
    if parts[:2] == ["backends", "redis"]:
        return "backends/redis"
    return "/".join(parts[:2]) if parts[0] == "backends" else parts[0]


def real_arrows() -> dict[str, set[str]]:
    arrows: dict[str, set[str]] = {}
    for path, tree in modules().items():
        unit = unit_of(path)
        if unit is None:
            continue
        targets = {unit_of_import(name) for name in imported(tree)}
        arrows.setdefault(unit, set()).update(t for t in targets if t and t != unit)
    return arrows


def drawn_arrows() -> tuple[set[str], list[tuple[str, set[str]]]]:
    """The foundation units, and each drawn line's units and what they import, top to bottom."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text.split("```imports\n", 1)[1].split("```", 1)[0]
    foundation: set[str] = set()
    lines: list[tuple[str, set[str]]] = []
    for line in block.splitlines():
        if line.startswith("foundation:"):
            names = line.removeprefix("foundation:").split("(", 1)[0]
            foundation = {name.strip() for name in names.split(",")}
        elif ARROW in line:
            left, right = line.split(ARROW)
            targets = set() if right.startswith("(") else {n.strip() for n in right.split(",")}
            lines += [(name.strip(), targets) for name in left.split(",")]
    return foundation, lines


def test_the_documented_imports_are_the_real_ones() -> None:
    """Each drawn line lists exactly what its module imports (foundation modules aside), every
    module is drawn, and the foundation imports nothing above it."""
    real = real_arrows()
    foundation, lines = drawn_arrows()
    drawn = dict(lines)
    assert sorted(set(real) - set(drawn) - foundation) == []
    wrong = {
        unit: {"drawn": sorted(targets), "real": sorted(real.get(unit, set()) - foundation)}
        for unit, targets in drawn.items()
        if real.get(unit, set()) - foundation != targets
    }
    assert wrong == {}
    assert {
        unit: sorted(real[unit] - foundation) for unit in foundation if real[unit] - foundation
    } == {}


def test_the_documented_imports_point_down_the_page() -> None:
    """No module imports one drawn above it: the drawing is the order to read the code in."""
    _, lines = drawn_arrows()
    position = {unit: index for index, (unit, _) in enumerate(lines)}
    upward = [
        f"{unit} ─► {target}"
        for unit, targets in lines
        for target in targets
        if position[target] < position[unit]
    ]
    assert upward == []
