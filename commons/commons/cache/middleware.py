"""``PrivateCacheControlMiddleware``: makes cached answers private for every decorator.

Routes cached with fastapi-cache2's own decorator (the guide's snippet) answer with a bare
``Cache-Control: max-age=...``, which lets a shared proxy or CDN store one tenant's answer and hand
it to another. Our ``@cache`` already says ``private`` and ``Vary: Authorization`` for scoped
entries; this middleware gives the same protection to any response that carries the
``X-FastAPI-Cache`` header and is not already ``private`` or ``no-store``. It only rewrites headers
before the first message is sent, so it costs nothing on the body.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from commons.cache.http import CACHE_STATUS_HEADER

__all__ = ["PrivateCacheControlMiddleware"]

_STATUS_HEADER = CACHE_STATUS_HEADER.lower()


def _make_private(headers: MutableHeaders) -> None:
    cache_control = headers.get("cache-control", "")
    lowered = cache_control.lower()
    if "private" in lowered or "no-store" in lowered:
        return
    headers["cache-control"] = f"private, {cache_control}" if cache_control else "private"
    vary = headers.get("vary")
    if vary is None:
        headers["vary"] = "Authorization"
    elif "authorization" not in vary.lower():
        headers["vary"] = f"{vary}, Authorization"


class PrivateCacheControlMiddleware:
    """Pure ASGI middleware: cached answers are never stored by shared caches."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_private(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if _STATUS_HEADER in headers:
                    _make_private(headers)
            await send(message)

        await self.app(scope, receive, send_private)
