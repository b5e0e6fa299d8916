"""The HTTP rules of cached responses: what may be stored, and the headers a cached answer carries.

- Only 2xx responses with a body in memory are stored; never one that sets a cookie, is streamed, or
  says ``Cache-Control: no-store`` / ``private`` itself.
- ``ETag`` is a digest of the stored bytes, so every process and replica agrees on it, and
  ``If-None-Match`` (a list, weak or strong, or ``*``) answers ``304`` with no body.
- Tenant- or user-scoped answers say ``Cache-Control: private, max-age=<remaining>`` and
  ``Vary: Authorization``: a shared proxy or CDN must never hand one tenant's answer to another.
"""

from __future__ import annotations

import hashlib

from starlette.datastructures import Headers
from starlette.responses import Response

from commons.cache.entry import CachedResponse

__all__ = [
    "CACHE_STATUS_HEADER",
    "cacheable_response",
    "entry_etag",
    "etag_matches",
    "replay",
]

#: The header that says HIT or MISS, as in fastapi-cache2.
CACHE_STATUS_HEADER = "X-FastAPI-Cache"

_HOP_BY_HOP = frozenset({"content-length", "content-type", "transfer-encoding", "connection"})


def entry_etag(body: bytes) -> str:
    """A strong ETag: the BLAKE2b digest of the body (the same in every process)."""
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Weak comparison of ``If-None-Match`` against ``etag`` (RFC 9110, 13.1.2)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    return any(
        candidate.strip().removeprefix("W/") == etag for candidate in if_none_match.split(",")
    )


def cacheable_response(response: Response) -> CachedResponse | None:
    """The storable form of a handler's own Response, or None when it must not be stored."""
    if not 200 <= response.status_code < 300:
        return None
    body = getattr(response, "body", None)
    if not isinstance(body, bytes):
        return None  # streamed or file responses
    headers = response.headers
    if "set-cookie" in headers:
        return None
    cache_control = headers.get("cache-control", "").lower()
    if "no-store" in cache_control or "private" in cache_control:
        return None
    media_type = headers.get("content-type") or response.media_type or "application/json"
    kept = tuple(
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in response.raw_headers
        if name.decode("latin-1").lower() not in _HOP_BY_HOP
    )
    return CachedResponse(body, response.status_code, media_type, kept)


def replay(
    cached: CachedResponse,
    *,
    ttl: int,
    status: str,
    private: bool,
    request_headers: Headers,
) -> Response:
    """The response to send for ``cached``: its bytes, or 304 when the client has them."""
    etag = entry_etag(cached.body)
    headers = {name.lower(): value for name, value in cached.headers}
    headers["etag"] = etag
    headers[CACHE_STATUS_HEADER.lower()] = status
    headers["cache-control"] = f"private, max-age={ttl}" if private else f"max-age={ttl}"
    if private:
        vary = headers.get("vary")
        headers["vary"] = f"{vary}, Authorization" if vary else "Authorization"
    if etag_matches(request_headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(
        content=cached.body,
        status_code=cached.status_code,
        headers=headers,
        media_type=cached.media_type,
    )
