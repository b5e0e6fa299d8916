"""``PrivateCacheControlMiddleware``: cached answers of every decorator keep our HTTP rules.

Routes cached with fastapi-cache2's own decorator (the guide's snippet) answer with a bare
``Cache-Control: max-age=...``, which lets a shared proxy or CDN store one tenant's answer and hand
it to another, and with ``ETag: W/<hash()>``: unquoted (the entity-tag grammar requires quotes) and
built from Python's salted ``hash()``, so every process and every restart tags the same bytes
differently and ``If-None-Match`` never matches across replicas.

Our ``@cache`` already says ``private`` and ``Vary: Authorization`` for scoped entries and tags
answers with a digest of their bytes; this middleware gives any response that carries the
``X-FastAPI-Cache`` header the same:

- ``Cache-Control: private, no-cache`` and ``Vary: Authorization`` unless it is already
  ``private`` or ``no-store`` (headers only, rewritten before the first message is sent): as on
  our decorator, a client revalidates with the ETag before using its copy (a ``304`` while
  nothing changed), so it never shows an answer from before an update. Answers of our decorator
  say so already and are left as they are;
- ``Cache-Status`` (RFC 9211) when the decorator did not send one: ``hit; ttl=<max-age>`` or
  ``fwd=miss`` (fastapi-cache2's backend interface does not say whether it stored, nor how old an
  entry is: no ``stored``, no ``Age``); ``fwd=bypass``, and no ``X-FastAPI-Cache``, when our
  backend found no identity to key the request under (that decorator says ``MISS`` for it);
- a ``200`` whose ETag is not a quoted tag gets ours (:func:`~commons.cache.http.entry_etag`, the
  first 128 bits of the body's SHA-256, the same in every process and replica), and a request whose
  ``If-None-Match`` matches it gets ``304`` with no body. That needs the whole body before the
  headers go out, so only those answers are held back (a cached JSON body, in memory anyway);
  answers of our decorator, which are tagged already, pass through untouched.

It also makes fastapi-cache2's decorator follow our rule for a client's ``Cache-Control``
(``CACHE_HONOR_CLIENT_NO_CACHE``). Left alone, that decorator recomputes on exactly ``no-cache``
and bypasses the cache on exactly ``no-store``, whatever the setting, and ignores the same
directives in a list. So a request asking for a fresh answer reaches the app without its
``Cache-Control`` unless the setting honours it, and with exactly ``no-cache`` when it does (a
recomputation that is stored, as ours does). Request directives are addressed to caches only
(RFC 9111, 5.2.1), so no handler loses anything it may rely on.
"""

from __future__ import annotations

import re

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from commons.cache.http import (
    CACHE_STATUS_HEADER,
    NOT_MODIFIED_HEADERS,
    asks_for_fresh,
    bypass_noted,
    cache_status_name,
    entry_etag,
    etag_matches,
)
from commons.cache.lifecycle import current_layer

__all__ = ["PrivateCacheControlMiddleware"]

_STATUS_HEADER = CACHE_STATUS_HEADER.lower()
_MAX_AGE = re.compile(r"max-age=(\d+)")
# What a 304 keeps of the 200 it stands for: the HTTP rules' list and the cache's own header.
_NOT_MODIFIED_KEEPS = NOT_MODIFIED_HEADERS | {_STATUS_HEADER}


def _make_private(headers: MutableHeaders) -> None:
    lowered = headers.get("cache-control", "").lower()
    if "private" in lowered or "no-store" in lowered:
        return
    # fastapi-cache2 says max-age=<its TTL>: a client would keep an answer from before an update.
    headers["cache-control"] = "private, no-cache"
    vary = headers.get("vary")
    if vary is None:
        headers["vary"] = "Authorization"
    elif "authorization" not in vary.lower():
        headers["vary"] = f"{vary}, Authorization"


def _add_cache_status(headers: MutableHeaders, bypassed: bool) -> None:
    """``Cache-Status`` (RFC 9211) for an answer of fastapi-cache2's decorator, from what it
    says: ``hit`` with the ``max-age`` it sent as ``ttl``, or ``fwd=miss`` (whether the answer
    was stored, and its ``Age``, are not known here); ``fwd=bypass`` and no ``X-FastAPI-Cache``,
    as on our decorator, when the cache took no part (``bypassed``: no identity bound)."""
    layer = current_layer()
    if layer is None:
        return
    name = cache_status_name(layer.prefix).decode("ascii")
    if bypassed:
        del headers[_STATUS_HEADER]
        headers["cache-status"] = f"{name}; fwd=bypass"
        return
    if headers[_STATUS_HEADER] != "HIT":
        headers["cache-status"] = f"{name}; fwd=miss"
        return
    max_age = _MAX_AGE.search(headers.get("cache-control", ""))
    ttl = f"; ttl={max_age[1]}" if max_age is not None else ""
    headers["cache-status"] = f"{name}; hit{ttl}"


def _needs_our_etag(message: Message, headers: MutableHeaders) -> bool:
    etag = headers.get("etag", "")
    return message["status"] == 200 and not etag.startswith(('"', 'W/"'))


class PrivateCacheControlMiddleware:
    """Pure ASGI middleware: cached answers are private and carry a stable ETag."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope = _under_the_client_rule(scope)
        start: Message | None = None
        body: list[bytes] = []

        async def send_cached(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if _STATUS_HEADER in headers and "cache-status" not in headers:
                    # fastapi-cache2's answer (ours carry Cache-Status and follow our rules).
                    # Reads the max-age that _make_private replaces.
                    _add_cache_status(headers, bool(bypassed))
                    _make_private(headers)
                    if _needs_our_etag(message, headers):
                        start = message  # held until the whole body is known
                        return
                await send(message)
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            await _send_tagged(scope, start, b"".join(body), send)

        with bypass_noted() as bypassed:
            await self.app(scope, receive, send_cached)


def _under_the_client_rule(scope: Scope) -> Scope:
    """The request as both decorators must see it (see the module docstring)."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    asked = [value for name, value in headers if name == b"cache-control"]
    if not asked or not asks_for_fresh(b", ".join(asked).decode("latin-1")):
        return scope
    kept = [(name, value) for name, value in headers if name != b"cache-control"]
    layer = current_layer()
    if layer is not None and layer.settings.CACHE_HONOR_CLIENT_NO_CACHE:
        kept.append((b"cache-control", b"no-cache"))
    return {**scope, "headers": kept}


async def _send_tagged(scope: Scope, start: Message, body: bytes, send: Send) -> None:
    headers = MutableHeaders(scope=start)
    etag = entry_etag(body)
    headers["etag"] = etag
    # Every line of it, as our decorator reads it: a list may come split over several.
    asked = Headers(scope=scope).getlist("if-none-match")
    if etag_matches(", ".join(asked) if asked else None, etag):
        kept = [
            (name, value)
            for name, value in start["headers"]
            if name.decode("latin-1").lower() in _NOT_MODIFIED_KEEPS
        ]
        await send({"type": "http.response.start", "status": 304, "headers": kept})
        await send({"type": "http.response.body", "body": b""})
        return
    await send(start)
    await send({"type": "http.response.body", "body": body})
