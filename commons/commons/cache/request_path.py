"""A cached route's request path: bypass, HIT, STALE, 304, or a MISS filled once.

Per request:

1. Not a GET/HEAD, caching disabled, or no identity to build a key from: the handler answers,
   nothing is read or stored (fail closed).
2. Stored and fresh: replayed with ``X-FastAPI-Cache: HIT``, an ``ETag`` digest of the bytes
   (``304`` on a matching ``If-None-Match``), ``Cache-Control: max-age=<remaining freshness>``,
   ``private`` and ``Vary: Authorization`` for tenant- or user-scoped entries. The encoded headers
   and the ETag of a stored body are computed once and reused while the stored bytes stay the same.
3. Stored but stale (only with ``stale_ttl``): replayed at once with ``X-FastAPI-Cache: STALE`` and
   ``max-age=0``; after the response is sent, one refresh per key and process (single-flight, and
   with ``distributed_lock`` one across replicas) recomputes and stores the entry.
4. Missing: filled once (``fill.py``); exceptions and non-2xx answers are never stored. A HEAD
   that misses is answered by the handler and never stored (a GET's entry answers a HEAD, never
   the other way round), and a HEAD on a stale entry starts no refresh.

Freshness is ``layer.Lookup.is_fresh``, the one rule (the stale window is written in each entry).
Every lookup outcome is counted here, once per request (``CacheEvents.lookup``).

Headers and cookies that the route's dependencies set on FastAPI's ``Response`` parameter are sent
with every answer (HIT or MISS) and never stored; headers the handler sets there are part of the
stored answer, and a cookie set by the handler makes the answer uncacheable.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from fastapi_cache.types import KeyBuilder
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response

from commons.cache.cached_route import CachedRoute
from commons.cache.entry import RejectReason
from commons.cache.events import LookupOutcome
from commons.cache.fill import Call, Fill, handler_response
from commons.cache.http import CACHE_STATUS_HEADER, PreparedResponse, asks_for_fresh, replay
from commons.cache.keyspace import qualified_namespace
from commons.cache.layer import CacheLayer, Lookup
from commons.cache.lifecycle import current_layer
from commons.cache.scope import ScopedKey

__all__ = ["RequestPath"]

_CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
_HIT, _STALE, _MISS = b"HIT", b"STALE", b"MISS"
_STATUS_NAME = CACHE_STATUS_HEADER.lower().encode("latin-1")


class _Asked(NamedTuple):
    """What the request asks of a cached answer besides its key."""

    #: ``If-None-Match`` (``None`` if absent), for a ``304``.
    if_none_match: str | None
    #: The client's ``Cache-Control`` (``""`` if absent).
    cache_control: str
    head: bool
    #: Headers the route's dependencies set: sent with this answer, never stored.
    own_headers: list[tuple[bytes, bytes]] | None


def _asked(request: Request, sub_response: object) -> _Asked:
    """One pass over the raw headers (ASGI servers send their names in lower case): cheaper on
    every hit than building starlette's ``Headers`` and looking each name up in it."""
    if_none_match: list[bytes] = []
    cache_control: list[bytes] = []
    for name, value in request.scope["headers"]:
        if name == b"if-none-match":
            if_none_match.append(value)
        elif name == b"cache-control":
            cache_control.append(value)
    own_headers = (
        list(sub_response.raw_headers)
        if isinstance(sub_response, Response) and sub_response.raw_headers
        else None
    )
    return _Asked(
        b", ".join(if_none_match).decode("latin-1") if if_none_match else None,
        b", ".join(cache_control).decode("latin-1"),
        request.scope["method"] == "HEAD",
        own_headers,
    )


class RequestPath:
    """Answers the requests of one cached route (see the module docstring)."""

    def __init__(self, route: CachedRoute, namespace: str, key_builder: KeyBuilder) -> None:
        self.route = route
        self.namespace = namespace
        self.key_builder = key_builder
        # The last prefix seen and the qualified namespace under it (a hit does not format it).
        self._qualified = ("", qualified_namespace("", namespace))

    async def answer(
        self, request: object, sub_response: object, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """The route's answer to one call: from the cache, or from the handler."""
        route, namespace = self.route, self.namespace
        layer = current_layer()
        if layer is None or not layer.enabled:
            if layer is not None:
                layer.events.lookup(namespace, LookupOutcome.BYPASS_DISABLED)
            return await route.call_handler(args, kwargs)
        if not isinstance(request, Request) or request.scope["method"] not in _CACHEABLE_METHODS:
            return await route.call_handler(args, kwargs)
        built = self.key_builder(
            route.func,
            self._qualified_namespace(layer.prefix),
            request=request,
            response=None,
            args=args,
            kwargs=kwargs,
        )
        key = built if isinstance(built, str) else await built
        fingerprint = route.fingerprint(request)
        asked = _asked(request, sub_response)
        fresh_asked = _asks_for_fresh(layer, asked.cache_control)
        if fresh_asked:
            lookup = await _unread(layer, key)
        else:
            lookup = await layer.lookup(key, fingerprint)
        if lookup is None:
            layer.events.lookup(namespace, LookupOutcome.BYPASS_NO_IDENTITY)
            return await route.call_handler(args, kwargs)
        private = not isinstance(key, ScopedKey) or key.is_private
        if lookup.value is not None:
            prepared = route.prepared.get(key, lookup.value, private)
            if prepared is None:
                layer.events.rejected_entry(namespace, RejectReason.FORMAT)
            elif lookup.is_fresh:
                layer.events.lookup(namespace, LookupOutcome.HIT)
                return _replay(prepared, lookup.fresh_for, _HIT, asked)
            else:
                layer.events.lookup(namespace, LookupOutcome.STALE)
                call = Call(key, fingerprint, private, request, sub_response, args, kwargs)
                return self._stale(prepared, Fill(route, layer, call, lookup.token), asked)
        layer.events.lookup(
            namespace, LookupOutcome.BYPASS_CLIENT if fresh_asked else LookupOutcome.MISS
        )
        call = Call(key, fingerprint, private, request, sub_response, args, kwargs)
        if asked.head:
            return await self._head_miss(call, asked)
        return await self._filled(Fill(route, layer, call, lookup.token), asked)

    def _stale(self, prepared: PreparedResponse, refresh: Fill, asked: _Asked) -> Response:
        """A stale entry's answer, and after it one background refresh (a GET's only: see
        :meth:`_head_miss`)."""
        stale = _replay(prepared, 0, _STALE, asked)
        if not asked.head:
            # Runs once the stale answer is sent, while the request's dependencies (a database
            # session, ...) are still open.
            stale.background = BackgroundTask(refresh.refresh)
        return stale

    async def _head_miss(self, call: Call, asked: _Asked) -> Response:
        """A HEAD that found no entry: the handler answers it, and nothing is stored or shared.

        A HEAD may be answered from a GET's entry, never the other way round: a handler may
        answer HEAD with headers only, and that answer stored would be every GET's empty body.
        """
        response = await handler_response(self.route, call)
        response.raw_headers.append((_STATUS_NAME, _MISS))
        if asked.own_headers:
            response.raw_headers.extend(asked.own_headers)
        return response

    def _qualified_namespace(self, prefix: str) -> str:
        known = self._qualified
        if known[0] != prefix:
            known = self._qualified = (prefix, qualified_namespace(prefix, self.namespace))
        return known[1]

    async def _filled(self, fill: Fill, asked: _Asked) -> Any:
        """The answer of a miss: the shared, stored one, or this request's own."""
        shared = await fill.shared()
        if fill.error is not None:
            raise fill.error
        if shared.prepared is not None:
            return _replay(shared.prepared, fill.ttl, _MISS, asked)
        if shared.response is None or shared is not fill.outcome:
            # Another request's answer that may not be stored (no-store, private, non-2xx, a
            # cookie, a stream, an exception) is that request's alone: this one runs the handler
            # itself.
            return await self.route.call_handler(fill.call.args, fill.call.kwargs)
        response = shared.response  # this request computed it: its very own answer
        if asked.own_headers:
            response.raw_headers.extend(asked.own_headers)
        return response


def _asks_for_fresh(layer: CacheLayer, cache_control: str) -> bool:
    """Whether the client's ``Cache-Control`` refuses a stored answer (and the settings let it)."""
    if not cache_control or not layer.settings.CACHE_HONOR_CLIENT_NO_CACHE:
        return False
    return asks_for_fresh(cache_control)


async def _unread(layer: CacheLayer, key: str) -> Lookup | None:
    """A lookup that read nothing, for a client that asks for a fresh answer: computed, and
    stored for the next ones (``None``: not to be cached)."""
    token = await layer.token_now(key)
    return None if token is None else Lookup(token)


def _replay(prepared: PreparedResponse, max_age: int, status: bytes, asked: _Asked) -> Response:
    return replay(
        prepared,
        max_age=max_age,
        status=status,
        if_none_match=asked.if_none_match,
        head=asked.head,
        extra_headers=asked.own_headers,
    )
