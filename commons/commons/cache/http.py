"""The HTTP rules of cached responses: what may be stored, and the headers a cached answer carries.

- Only 2xx responses with a body in memory are stored; never one that sets a cookie, is streamed,
  says ``Cache-Control: no-store`` / ``no-cache`` / ``private`` itself, or says ``Vary`` (on
  anything: ``*``, ``Accept-Language``, a session header): the key holds the route, query and
  identity only, so an answer that depends on other request headers is its own request's.
- ``ETag`` is a digest of the stored body (the first 128 bits of its SHA-256, in hex, quoted), so
  every process and replica agrees on it, and ``If-None-Match`` (a list, weak or strong, or ``*``)
  answers ``304`` with no body.
- ``Cache-Control: no-cache`` by default: a client keeps its copy but asks again before using it
  (a ``304`` when nothing changed), so no client uses an answer from before an update. A route's
  ``client_max_age`` allows reuse for that long, at most the entry's remaining *freshness*
  (never its stale window), from when the answer is sent: ``max-age`` counts from the answer's
  age, so it is that plus ``Age``. Tenant- or user-scoped answers say ``private`` too and
  ``Vary: Authorization``: a shared proxy or CDN must never hand one tenant's answer to another.
- A ``HEAD`` request gets the headers of the ``GET`` (``Content-Length`` included) and no body.
- ``Age`` says how long ago a stored answer was stored; ``Cache-Status`` (RFC 9211,
  :func:`cache_status`) how the answer was served (:class:`Served`).
- A client's ``Cache-Control: no-cache`` / ``no-store`` (:func:`asks_for_fresh`) skips the stored
  entry only when the settings honour it; otherwise no client can force recomputation.

A hit does no work beyond this: :func:`prepare` encodes a stored response's headers and ETag once,
the decorator keeps the result while the stored bytes stay the same, and :func:`replay` only adds
the per-request ``Cache-Control``, ``Age`` and status headers around the stored body (the same
ones again for every hit within one second).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import NamedTuple

from starlette.responses import Response

from commons.cache.entry import NOT_STORED_HEADERS, CachedResponse

__all__ = [
    "CACHE_STATUS_HEADER",
    "NOT_MODIFIED_HEADERS",
    "CachedBytesResponse",
    "PreparedResponse",
    "Served",
    "asks_for_fresh",
    "bypass_noted",
    "cache_status",
    "cache_status_name",
    "cacheable_response",
    "directive_names",
    "entry_etag",
    "etag_matches",
    "header_values",
    "labelled",
    "note_bypass",
    "prepare",
    "prepare_plain_json",
    "replay",
    "why_never_stored",
]

#: The header that says HIT, STALE or MISS (fastapi-cache2's name; it says HIT or MISS).
CACHE_STATUS_HEADER = "X-FastAPI-Cache"

_STATUS_NAME = CACHE_STATUS_HEADER.lower().encode("latin-1")
_CACHE_STATUS = b"cache-status"
#: Headers a 304 repeats from the 200 it stands for (RFC 9110, 15.4.5), in lower case; both
#: decorators' 304s keep these (and the cache's own status headers) and nothing else.
NOT_MODIFIED_HEADERS = frozenset(
    {"cache-control", "content-location", "date", "etag", "expires", "vary"}
)
_NOT_MODIFIED_NAMES = frozenset(name.encode("latin-1") for name in NOT_MODIFIED_HEADERS)
_FORBIDDING_DIRECTIVES = frozenset({"no-store", "no-cache", "private"})
_FRESH_DIRECTIVES = frozenset({"no-store", "no-cache"})


def entry_etag(body: bytes) -> str:
    """A strong ETag: the first 32 hex digits of the body's SHA-256 (the same in every process)."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Weak comparison of ``If-None-Match`` against ``etag`` (RFC 9110, 13.1.2)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    return any(
        candidate.strip().removeprefix("W/") == etag for candidate in if_none_match.split(",")
    )


def directive_names(cache_control: str) -> frozenset[str]:
    """The directive names of a ``Cache-Control`` value, in lower case, arguments left out: a
    directive is named by the whole of its name (``x-no-store-hint`` is not ``no-store``)."""
    return frozenset(part.partition("=")[0].strip().lower() for part in cache_control.split(","))


def asks_for_fresh(cache_control: str) -> bool:
    """Whether a request's ``Cache-Control`` refuses a stored answer (``no-cache`` or
    ``no-store`` among its directives, in any case); honoured only with
    ``CACHE_HONOR_CLIENT_NO_CACHE=true``, on both decorators."""
    return not directive_names(cache_control).isdisjoint(_FRESH_DIRECTIVES)


def header_values(response: Response, name: bytes) -> list[bytes]:
    """The values of header ``name`` (in lower case) on ``response``, however the handler spelled
    it: Starlette's own lookups see raw names in lower case only, and a handler may append raw
    headers in any case (copied from another response, say)."""
    return [value for key, value in response.raw_headers if key.lower() == name]


def why_never_stored(response: Response) -> str | None:
    """Why a 2xx answer of a route can never be stored, when that is the handler's doing (a
    cookie, ``Vary``, ``Cache-Control``, a stream): said once per route, since every answer of
    such a route runs the handler. ``None``: it may be stored, or it is an error answer."""
    if not 200 <= response.status_code < 300:
        return None
    if not isinstance(getattr(response, "body", None), bytes):
        return "its answers are streamed (a StreamingResponse or FileResponse)"
    names = {name.lower() for name, _ in response.raw_headers}
    if b"set-cookie" in names:
        return "its answers set a cookie (Set-Cookie), which only their own request may get"
    if b"vary" in names:
        # An answer that varies on request headers may only be served to requests with the same
        # values of them, which the key does not hold: it is its own request's.
        return "its answers say Vary: the key holds no request header (build one that does)"
    cache_control = b",".join(header_values(response, b"cache-control")).decode("latin-1")
    forbidding = directive_names(cache_control) & _FORBIDDING_DIRECTIVES
    if forbidding:
        return f"its answers say Cache-Control: {', '.join(sorted(forbidding))}"
    return None


def cacheable_response(response: Response) -> CachedResponse | None:
    """The storable form of a response, or None when it must not be stored."""
    body = getattr(response, "body", None)
    if not isinstance(body, bytes) or why_never_stored(response) is not None:
        return None  # an error answer, a stream, or the handler says it is its request's own
    if not 200 <= response.status_code < 300:
        return None
    content_type = header_values(response, b"content-type")
    # None at all (a 204, bytes with no media type): none is replayed either.
    media_type = content_type[0].decode("latin-1") if content_type else ""
    kept = tuple(
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in response.raw_headers
        if name.decode("latin-1").lower() not in NOT_STORED_HEADERS
    )
    return CachedResponse(body, response.status_code, media_type, kept)


class CachedBytesResponse(Response):
    """A response whose body and encoded headers are ready: nothing is rendered or re-encoded."""

    def __init__(
        self, body: bytes, status_code: int, raw_headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.body = body
        self.status_code = status_code
        self.raw_headers = raw_headers
        self.background = None


@dataclass(slots=True, eq=False)
class PreparedResponse:
    """A stored response with its headers encoded once, ready to :func:`replay` on every hit."""

    body: bytes
    status_code: int
    etag: str
    private: bool
    #: Headers of a full answer: stored headers, content type and length, ETag, Vary.
    headers: tuple[tuple[bytes, bytes], ...]
    #: Headers of a 304 answer: ETag and Vary.
    not_modified_headers: tuple[tuple[bytes, bytes], ...]
    #: A ``200 application/json`` answer with no headers of its own: its headers follow from
    #: its body, ETag and privacy alone (:func:`prepare_plain_json`).
    plain_json: bool = False
    #: The last full answer's headers with their ``max-age`` and how it was served: hits within
    #: the same second send the same ones.
    last_sent: tuple[int | None, Served, tuple[tuple[bytes, bytes], ...]] | None = None


_PLAIN_JSON_TYPE = (b"content-type", b"application/json")
_VARY_AUTHORIZATION = (b"vary", b"Authorization")


def prepare_plain_json(body: bytes, *, private: bool, etag: str | None = None) -> PreparedResponse:
    """:func:`prepare` of a stored ``200 application/json`` answer with no headers of its own
    (an entry of kind ``b``: most of them), spelled out: a cold hit over a large working set
    prepares one on every read. ``etag``: the body's, when it is known already."""
    if etag is None:
        etag = entry_etag(body)
    etag_header = (b"etag", etag.encode("latin-1"))
    length = (b"content-length", b"%d" % len(body))
    headers: tuple[tuple[bytes, bytes], ...]
    if private:
        headers = (_PLAIN_JSON_TYPE, length, etag_header, _VARY_AUTHORIZATION)
        not_modified: tuple[tuple[bytes, bytes], ...] = (etag_header, _VARY_AUTHORIZATION)
    else:
        headers, not_modified = (_PLAIN_JSON_TYPE, length, etag_header), (etag_header,)
    return PreparedResponse(body, 200, etag, private, headers, not_modified, True)


def prepare(cached: CachedResponse, *, private: bool) -> PreparedResponse:
    """Encodes ``cached``'s headers and computes its ETag, once per stored body."""
    if cached.is_plain_json:
        return prepare_plain_json(cached.body, private=private)
    etag = entry_etag(cached.body)
    headers: list[tuple[bytes, bytes]] = []
    for name, value in cached.headers:
        lowered = name.lower()
        if lowered in ("etag", "cache-control", CACHE_STATUS_HEADER.lower()):
            continue  # the cache's own, set below or per request
        headers.append((lowered.encode("latin-1"), value.encode("latin-1")))
    # Stored answers never vary (see cacheable_response); scoped ones say so to shared caches.
    vary = ["Authorization"] if private else []
    encoded_etag = etag.encode("latin-1")
    if cached.media_type:
        headers.append((b"content-type", cached.media_type.encode("latin-1")))
    if cached.status_code >= 200 and cached.status_code not in (204, 304):
        headers.append((b"content-length", str(len(cached.body)).encode("latin-1")))
    headers.append((b"etag", encoded_etag))
    cache_headers = [(b"etag", encoded_etag)]
    if vary:
        encoded_vary = (b"vary", ", ".join(vary).encode("latin-1"))
        headers.append(encoded_vary)
        cache_headers.append(encoded_vary)
    cache_headers.extend(pair for pair in headers if pair[0] in _NOT_MODIFIED_NAMES)
    return PreparedResponse(
        body=cached.body,
        status_code=cached.status_code,
        etag=etag,
        private=private,
        headers=tuple(headers),
        not_modified_headers=tuple(dict.fromkeys(cache_headers)),
    )


def _cache_control(private: bool, max_age: int | None) -> bytes:
    if max_age is None:
        return b"private, no-cache" if private else b"no-cache"
    return (b"private, max-age=%d" if private else b"max-age=%d") % max_age


class Served(NamedTuple):
    """How one answer was served, for its cache headers (one small tuple per request)."""

    #: ``X-FastAPI-Cache``: ``b"HIT"``, ``b"STALE"`` or ``b"MISS"``.
    status: bytes
    #: ``Cache-Status`` after the cache's name (RFC 9211): ``b"hit"``, ``b"fwd=miss; stored"``...
    detail: bytes
    #: The cache's name in ``Cache-Status`` (:func:`cache_status_name`).
    name: bytes
    #: ``Cache-Status``'s ``ttl``: seconds of freshness left (negative once stale); hits only.
    ttl: int | None = None
    #: ``Age``: seconds since the answer was stored; ``None`` when it was not (or is not known).
    age: int | None = None


_TOKEN_NAME = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")


def cache_status_name(prefix: str) -> bytes:
    """The cache's name in ``Cache-Status``: ``CACHE_PREFIX``, as a token when it is one, else as
    a quoted string (RFC 8941), or ``commons.cache`` when it cannot be written as either."""
    if _TOKEN_NAME.fullmatch(prefix):
        return prefix.encode("ascii")
    if prefix.isascii() and prefix.isprintable():
        return b'"%s"' % prefix.replace("\\", "\\\\").replace('"', '\\"').encode("ascii")
    return b"commons.cache"


def cache_status(served: Served) -> bytes:
    """The ``Cache-Status`` value of an answer served as ``served``."""
    value = b"%s; %s" % (served.name, served.detail)
    return value if served.ttl is None else b"%s; ttl=%d" % (value, served.ttl)


def labelled(
    result: object, sub_response: object, status: bytes, outcome: bytes | None = None
) -> object:
    """``result`` with the ``Cache-Status`` value ``status`` and, when the cache took part, its
    ``X-FastAPI-Cache`` ``outcome`` (``MISS`` for an answer the handler computed, stored or
    not), however the route sends it: on the response itself, or on FastAPI's ``Response``
    parameter, whose headers FastAPI adds to the response it renders."""
    target = result if isinstance(result, Response) else sub_response
    if isinstance(target, Response):
        if outcome is not None:
            target.raw_headers.append((_STATUS_NAME, outcome))
        target.raw_headers.append((_CACHE_STATUS, status))
    return result


def _served_headers(served: Served) -> list[tuple[bytes, bytes]]:
    headers = [(_STATUS_NAME, served.status), (_CACHE_STATUS, cache_status(served))]
    if served.age is not None:
        headers.append((b"age", b"%d" % served.age))
    return headers


def replay(
    prepared: PreparedResponse,
    *,
    max_age: int | None,
    served: Served,
    not_modified: bool,
    head: bool,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> Response:
    """The response to send for ``prepared``: its bytes, or ``304`` when the client has them
    (``not_modified``).

    Args:
        prepared: The stored response.
        max_age: Seconds from now the client may reuse the answer (``Cache-Control: max-age``
            is that plus ``served.age``: a client counts it from the answer's age); ``None``: it
            must revalidate first (``no-cache``).
        served: How it was served: ``X-FastAPI-Cache``, ``Cache-Status`` and ``Age``.
        not_modified: The request's ``If-None-Match`` names the ETag (:func:`etag_matches`):
            a ``304`` with no body.
        head: True for a ``HEAD`` request: the same headers, no body.
        extra_headers: Per-request headers to add (set by the route's dependencies).
    """
    if max_age is not None:
        # A client counts max-age from the answer's age, the Age header included (RFC 9111,
        # 4.2.3): reuse for max_age seconds from now is max-age = Age + max_age.
        max_age = max(max_age, 0) + (served.age or 0)
    if not_modified:
        cache_control = _cache_control(prepared.private, max_age)
        headers = [*prepared.not_modified_headers, (b"cache-control", cache_control)]
        headers.extend(_served_headers(served))
        if extra_headers:
            headers.extend(extra_headers)
        return CachedBytesResponse(b"", 304, headers)
    last = prepared.last_sent
    if last is not None and last[0] == max_age and last[1] == served:
        headers = list(last[2])
    else:
        cache_control = _cache_control(prepared.private, max_age)
        full = (*prepared.headers, (b"cache-control", cache_control), *_served_headers(served))
        prepared.last_sent = (max_age, served, full)
        headers = list(full)
    if extra_headers:
        headers.extend(extra_headers)
    return CachedBytesResponse(b"" if head else prepared.body, prepared.status_code, headers)


#: Per request, while ``PrivateCacheControlMiddleware`` serves it: whether the cache took no part
#: (no identity bound) in an answer of fastapi-cache2's decorator, which labels every answer it
#: did not read from the cache ``MISS`` and cannot be told otherwise. A list, so that a note
#: made in a copy of the request's context (a task, a thread) still reaches the middleware.
_bypass_note: ContextVar[list[bool] | None] = ContextVar("commons_cache_bypass", default=None)


def note_bypass() -> None:
    """Notes, for the request being served, that the cache took no part in its answer."""
    note = _bypass_note.get()
    if note is not None:
        note.append(True)


@contextmanager
def bypass_noted() -> Iterator[list[bool]]:
    """A note for :func:`note_bypass` while one request is served: non-empty once noted."""
    note: list[bool] = []
    token = _bypass_note.set(note)
    try:
        yield note
    finally:
        _bypass_note.reset(token)
