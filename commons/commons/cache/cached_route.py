"""What one decorated handler knows on every request: how to call it, render its result as its
route would, fingerprint what it renders, and the prepared replays of its stored answers."""

from __future__ import annotations

import inspect
import marshal
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.utils import get_typed_return_annotation
from fastapi.routing import APIRoute
from fastapi_cache.coder import Coder
from pydantic import TypeAdapter
from starlette.requests import Request
from starlette.responses import Response

from commons.cache.entry import BODY, ParsedValue, decode_payload, route_fingerprint
from commons.cache.http import PreparedResponse, prepare, prepare_plain_json
from commons.cache.memo import BoundedMemo, HotMemo, MemoShare, process_hot_memo, process_memo
from commons.cache.rendering import adapter_for, json_bytes, render_as_route

__all__ = ["PRODUCER", "CachedRoute", "PreparedResponses"]

#: Who wrote an entry, as its fingerprint says (the other decorator's entries are misses here).
PRODUCER = "commons.cache"
#: Prepared responses the process keeps at most, all routes together; in bytes (the stored values
#: and the bodies prepared from them), its share of ``CACHE_HIT_MEMOS_MAX_BYTES``.
_PREPARED_MAX_ENTRIES = 16_384


#: Prepared responses kept as objects (for the whole process), for the keys hit most recently:
#: they carry the last headers sent (see ``replay``), reused by hits within the same second.
#: Large while the keys hit fit in it; few over a larger working set, where every hit would
#: replace one, and objects that live long enough to reach the oldest generation before being
#: dropped are what brings full collections back (see ``memo.HotMemo``).
_hot_prepared: HotMemo[str, tuple[bytes, PreparedResponse]] = process_hot_memo(
    MemoShare.PREPARED_ANSWERS_AS_OBJECTS
)

#: A prepared response as the memo holds it: the stored bytes, then PreparedResponse's fields
#: up to ``not_modified_headers``, its two header tuples packed (:func:`_packed`), or both empty
#: for a plain JSON answer (whose headers follow from the rest). One flat tuple of bytes, ints
#: and bools: the first collection it survives untracks it, so the memo's dicts stay out of the
#: collector's walks (see ``memo.py``); tuples nested in it would take older generations'
#: collections to untrack.
_PreparedFields = tuple[bytes, bytes, int, str, bool, bytes, bytes]

#: The prepared answers of every route, by key (see :class:`PreparedResponses`).
_prepared_memo: BoundedMemo[str, _PreparedFields] = process_memo(
    MemoShare.PREPARED_ANSWERS, _PREPARED_MAX_ENTRIES, admit_seen_twice=True
)


def _packed(headers: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """``headers`` as one bytes object. ``marshal``, not pickle: it builds tuples of bytes and
    nothing else, and it only ever reads what this process wrote (never a stored value)."""
    return marshal.dumps(headers)


def _unpacked(packed: bytes) -> tuple[tuple[bytes, bytes], ...]:
    headers: tuple[tuple[bytes, bytes], ...] = marshal.loads(packed)  # noqa: S302 - see _packed
    return headers


def _prepared(fields: _PreparedFields) -> PreparedResponse:
    """The prepared response that ``fields`` (as the memo holds them) describe."""
    _, body, status_code, etag, private, headers, not_modified_headers = fields
    if not headers:
        return prepare_plain_json(body, private=private, etag=etag)
    return PreparedResponse(
        body, status_code, etag, private, _unpacked(headers), _unpacked(not_modified_headers)
    )


def _size(key: str, raw: bytes, body: bytes) -> int:
    """What remembering a prepared answer holds: the stored bytes, the body when it is a copy of
    their payload (a plain JSON one: a slice), and the key."""
    return len(raw) + (len(body) if body is not raw else 0) + len(key)


class PreparedResponses:
    """Prepared responses by key, reused while the stored bytes are the same (bounded).

    Comparing the stored bytes with the remembered ones costs one ``memcmp`` (nothing for the
    memory store, which hands back the very object); decoding, re-encoding headers and hashing
    the body for the ETag then happen once per stored value instead of on every hit.

    Every key's prepared fields are kept as an untracked tuple; only the most recently hit keys
    keep a :class:`PreparedResponse` object (which the collector walks): rebuilding one from its
    fields is far cheaper than a full collection walking one per key of a large working set.
    """

    def __init__(self) -> None:
        #: Shared by every route (what makes a prepared response is its bytes and privacy, and
        #: a key is one route's): the bound is the process's, however many routes it has.
        self._memo = _prepared_memo
        self._hot = _hot_prepared

    def get(self, key: str, value: ParsedValue, private: bool) -> PreparedResponse | None:
        """The prepared form of ``value``; ``None`` when its payload is no readable response."""
        prepared = self.remembered(key, value.raw, private)
        if prepared is not None:
            return prepared
        if value.kind == BODY:
            prepared = prepare_plain_json(value.payload, private=private)
        else:
            entry = decode_payload(value.kind, value.payload)
            if entry is None:
                return None
            prepared = prepare(entry, private=private)
        self.put(key, value.raw, prepared)
        return prepared

    def remembered(self, key: str, raw: bytes, private: bool) -> PreparedResponse | None:
        """The prepared form of the stored bytes ``raw`` under ``key``, if remembered; ``None``
        otherwise (nothing is prepared here)."""
        prepared = self.kept_as_object(key, raw, private)
        if prepared is not None:
            return prepared
        found = self._memo.get(key)
        if found is not None and found[0] == raw and found[4] is private:
            prepared = _prepared(found)
            size = _size(key, raw, prepared.body)
            self._hot.put(str(key), (raw, prepared), size)
            if found[0] is not raw:
                self._memo.put(str(key), (raw, *found[1:]), size)
            return prepared
        return None

    def kept_as_object(self, key: str, raw: bytes, private: bool) -> PreparedResponse | None:
        """:meth:`remembered`, among the keys prepared most recently alone (the objects kept):
        for a caller that can prepare a plain answer for less than rebuilding it from fields."""
        hot = self._hot.get(key)
        if hot is None or hot[0] != raw or hot[1].private is not private:
            return None
        if hot[0] is not raw:
            # The same bytes in another object (read from Redis): the newest is kept, so an
            # older copy (the bytes the fill wrote, once the near cache holds the ones it read)
            # is not kept alive beside it.
            self.put(key, raw, hot[1])
        return hot[1]

    def put(self, key: str, raw: bytes, prepared: PreparedResponse) -> None:
        # A plain str, as in the near cache: a ``ScopedKey`` would keep its scope and route alive
        # with every remembered key, objects a full collection walks.
        key = str(key)
        body, etag, private = prepared.body, prepared.etag, prepared.private
        size = _size(key, raw, body)
        if prepared.plain_json:
            fields: _PreparedFields = (raw, body, 200, etag, private, b"", b"")
        else:
            headers, not_modified = prepared.headers, prepared.not_modified_headers
            status = prepared.status_code
            fields = (raw, body, status, etag, private, _packed(headers), _packed(not_modified))
        self._memo.put(key, fields, size)
        self._hot.put(key, (raw, prepared), size)


class CachedRoute:
    """One decorated handler and its caching options (``@cache``'s arguments)."""

    def __init__(
        self,
        func: Callable[..., Awaitable[Any]],
        *,
        coder: type[Coder] | None,
        expire: int | None,
        stale_ttl: int,
        stale_if_error: int | None,
        lock: bool | None,
        client_max_age: int | None = None,
    ) -> None:
        self.func = func
        self.coder = coder
        self.expire = expire
        #: Seconds a stale entry is answered at once while one refresh runs (0: never).
        self.stale_ttl = stale_ttl
        #: Seconds a stale entry may stand in for a failed computation; ``None`` follows
        #: ``CACHE_STALE_IF_ERROR_SECONDS``.
        self.stale_if_error = stale_if_error
        #: ``distributed_lock``: ``None`` follows ``CACHE_DISTRIBUTED_LOCK``.
        self.lock = lock
        #: Seconds a client may reuse an answer without revalidating; ``None``: ``no-cache``.
        self.client_max_age = client_max_age
        self.is_coroutine = inspect.iscoroutinefunction(func)
        self.prepared = PreparedResponses()
        #: The endpoint FastAPI mounts (the decorated function), set once it is built.
        self.endpoint: Callable[..., Any] | None = None
        self._adapter: list[TypeAdapter[Any] | None] = []
        self._last_fingerprint: tuple[object, bytes] | None = None

    def lifetime(self, default: int) -> int:
        """Seconds an entry is fresh: ``expire``, or ``default`` (``CACHE_TTL_SECONDS``) when
        the decorator left it out."""
        return self.expire or default

    def stale_if_error_seconds(self, default: int) -> int:
        """``stale_if_error``, or ``default`` (the setting) when the decorator left it out."""
        return default if self.stale_if_error is None else self.stale_if_error

    def stale_window(self, default_stale_if_error: int) -> int:
        """Seconds an entry is kept past its freshness: long enough for either use of it."""
        return max(self.stale_ttl, self.stale_if_error_seconds(default_stale_if_error))

    async def call_handler(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.is_coroutine:
            return await self.func(*args, **kwargs)
        return await run_in_threadpool(self.func, *args, **kwargs)

    def _own_route(self, request: Request) -> APIRoute | None:
        """The route ``request`` came through, if it is this handler's (not a direct call)."""
        route = request.scope.get("route")
        endpoint = self.endpoint
        if isinstance(route, APIRoute) and (
            inspect.unwrap(route.endpoint, stop=lambda f: f is endpoint) is endpoint
        ):
            return route
        return None

    def fingerprint(self, request: Request) -> bytes:
        """What this route renders, for the stored values (see ``entry.route_fingerprint``)."""
        route = request.scope.get("route")
        last = self._last_fingerprint
        if last is not None and last[0] is route:
            return last[1]  # a handler is mounted on one route, as a rule: the hit path's case
        fingerprint = route_fingerprint(
            self._own_route(request), self.func, producer=PRODUCER, coder=self.coder
        )
        self._last_fingerprint = (route, fingerprint)
        return fingerprint

    async def render(self, result: Any, request: Request, status_code: int | None) -> Response:
        """The response FastAPI would send for ``result`` on this route."""
        if isinstance(result, Response):
            return result
        if self.coder is not None:
            body = self.coder.encode(result)
            return Response(body, status_code or 200, media_type="application/json")
        route = self._own_route(request)
        if route is not None:
            return await render_as_route(route, result, status_code, self.is_coroutine)
        # Called outside its route: render through the return annotation.
        if not self._adapter:
            self._adapter.append(adapter_for(get_typed_return_annotation(self.func)))
        type_adapter = self._adapter[0]
        if type_adapter is None:
            rendered = json_bytes(result)
        else:
            value = type_adapter.validate_python(result, from_attributes=True)
            rendered = type_adapter.dump_json(value, by_alias=True)
        return Response(rendered, status_code or 200, media_type="application/json")
