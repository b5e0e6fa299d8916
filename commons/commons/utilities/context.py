"""Per-request identity on contextvars.

The cache key builders read the tenant and the user from here, so whatever authenticates a request
must bind them first. Bind them in an ``async`` FastAPI dependency (or middleware): FastAPI runs
async dependencies in the request's own task, so the endpoint and the cache decorator see the
values; a sync dependency runs in a worker thread and its changes would be lost.

:class:`RequestContextMiddleware` gives every request a fresh context in which both values start
unset, so an identity can never leak from one request into another, whatever the server does with
its tasks.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "RequestContextMiddleware",
    "bind_identity",
    "get_tenant_id",
    "get_user_id",
    "set_tenant_id",
    "set_user_id",
]

_tenant_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant_id", default=None)
_user_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("user_id", default=None)


def _normalise(value: str | int | None) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text or None


def set_tenant_id(tenant_id: str | int | None) -> contextvars.Token[str | None]:
    """Binds the current request's tenant. Returns a token for ``ContextVar.reset``."""
    return _tenant_id.set(_normalise(tenant_id))


def get_tenant_id() -> str | None:
    """The current request's tenant, or ``None`` when no tenant is bound."""
    return _tenant_id.get()


def set_user_id(user_id: str | int | None) -> contextvars.Token[str | None]:
    """Binds the current request's user. Returns a token for ``ContextVar.reset``."""
    return _user_id.set(_normalise(user_id))


def get_user_id() -> str | None:
    """The current request's user, or ``None`` when no user is bound."""
    return _user_id.get()


@contextmanager
def bind_identity(tenant_id: str | int | None, user_id: str | int | None = None) -> Iterator[None]:
    """Binds a tenant (and optionally a user) for the duration of a ``with`` block.

    Useful in background jobs and tests; the previous values are restored on exit.
    """
    tenant_token = set_tenant_id(tenant_id)
    user_token = set_user_id(user_id)
    try:
        yield
    finally:
        _user_id.reset(user_token)
        _tenant_id.reset(tenant_token)


class RequestContextMiddleware:
    """Pure ASGI middleware: each HTTP request starts with no tenant and no user bound."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tenant_token = _tenant_id.set(None)
        user_token = _user_id.set(None)
        try:
            await self.app(scope, receive, send)
        finally:
            _user_id.reset(user_token)
            _tenant_id.reset(tenant_token)
