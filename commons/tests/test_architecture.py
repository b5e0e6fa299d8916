"""The shape of the library, as the README's Layout section draws it, holds in the code.

Checked on the source (nothing imported): which modules may import what, that no function grows
past what a reader takes in at once, and that the Layout section names every module.
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


def test_the_readme_layout_names_every_module() -> None:
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [
        name
        for name in modules()
        if not name.endswith("__init__.py") and Path(name).name not in layout
    ]
    assert missing == []
