"""Helpers the test modules share; the fixtures they share are in ``conftest.py``.

Importable as ``_support`` because pytest puts ``commons/tests`` on ``sys.path`` (``pythonpath``
in the repository's ``pyproject.toml``).
"""

from __future__ import annotations

import gc
from typing import Any

import httpx
from fastapi import FastAPI


def client_for(
    app: FastAPI, *, raise_app_exceptions: bool = True, timeout: float = 5.0
) -> httpx.AsyncClient:
    """An in-process HTTP client of ``app`` (``base_url`` ``http://test``), to use in ``async
    with``. With ``raise_app_exceptions=False`` a crash in the app is the 500 a real server would
    send rather than an exception in the test."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://test", timeout=timeout)


def as_tenant(tenant: str) -> dict[str, str]:
    """The headers of a request made as ``tenant`` to an app of ``make_identity_app``."""
    return {"X-Test-Tenant": tenant}


def acme_get_scope(path: str, query_string: bytes = b"") -> dict[str, Any]:
    """The ASGI scope of ``GET path?query_string`` made as tenant ``acme``, for a test that drives
    an app by hand (no client between them: it sees each message the app sends)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query_string,
        "root_path": "",
        "headers": [(b"host", b"test"), (b"x-test-tenant", b"acme")],
        "client": ("127.0.0.1", 1000),
        "server": ("127.0.0.1", 80),
    }


def walked_containers(root: object, *, larger_than: int = 1024) -> list[dict[Any, Any]]:
    """The dicts that ``root`` holds (within three levels) which the collector would walk item by
    item at every collection of their generation: tracked ones, with more than ``larger_than``
    items."""
    found: list[dict[Any, Any]] = []
    level: list[object] = [root]
    for _ in range(3):
        level = [child for parent in level for child in gc.get_referents(parent)]
        found += [
            held
            for held in level
            if isinstance(held, dict) and gc.is_tracked(held) and len(held) > larger_than
        ]
    return found
