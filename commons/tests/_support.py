"""Helpers the test modules share; the fixtures they share are in ``conftest.py``.

Importable as ``_support`` because pytest puts ``commons/tests`` on ``sys.path`` (``pythonpath``
in the repository's ``pyproject.toml``).
"""

from __future__ import annotations

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
