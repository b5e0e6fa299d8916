"""The hit shortcut: a repeated near-cache HIT answered without the whole request flow.

Most requests of a busy cached route repeat a key this process answered a moment ago from the
near cache. The request flow (``request_flow.py``) works each of them out from scratch: it builds
the key, reads it through the layer and its breaker, validates the value, prepares its answer and
decides the outcome. Here the process remembers, for the keys answered that way most recently,
what the flow found (the key, the stored bytes, their prepared answer), by route and by what our
key builders build a key from: the path, the query and the identity they read
(``keys.identity_read_by``).
A request that repeats them is answered from that memory, only when the flow's answer would be
the same to the byte:

- it asks nothing else of the answer: a GET with neither ``If-None-Match`` nor ``Cache-Control``,
  and the route's dependencies set no header on the response;
- the same route (so the same fingerprint) under the same ``init_cache()``, with one of our key
  builders: a service's own builder may read anything, so its routes never take the shortcut;
- the near cache holds that very stored value now, by the checks of every near-cache read (its
  generations held and confirmed within ``CACHE_NEAR_CACHE_MAX_AGE_SECONDS``, the entry
  unexpired, the tracking session alive; a sampled share verified in Redis), with Redis in use
  and no failure to clear, and lookups not logged one by one (``CacheLayer.held``);
- the value is fresh.

Otherwise the flow answers, as it would have anyway. A shortcut answer is counted as the flow
counts a HIT (and a near-cache hit), with the same headers (``Age``, ``Cache-Status``' ``ttl``).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import NamedTuple

from starlette.requests import Request
from starlette.responses import Response

from commons.cache.cached_route import CachedRoute
from commons.cache.events import LookupOutcome
from commons.cache.http import PreparedResponse, Served, replay
from commons.cache.layer import CacheLayer, Lookup
from commons.cache.lifecycle import current_layer
from commons.cache.memo import HOT_LARGE_ENTRIES, HOT_SMALL_ENTRIES, HotMemo
from commons.cache.scope import CacheScope, ScopedKey

__all__ = ["HitShortcut"]

_HIT = b"HIT"
#: What remembering one key holds besides its strings and bytes.
_REMEMBERED_OVERHEAD_BYTES = 256


class _Remembered(NamedTuple):
    """What the flow found for one key, answered from the near cache."""

    route: object
    layer: weakref.ref[CacheLayer]
    key: ScopedKey
    scope: CacheScope
    #: The stored bytes, the very object the near cache holds.
    raw: bytes
    prepared: PreparedResponse
    stale_seconds: int
    lifetime: int | None
    #: With a stale window: until when (``time.monotonic()``) the value is surely still fresh.
    fresh_until: float
    #: The cache's name in ``Cache-Status``.
    status_name: bytes


#: Every route's remembered hits, by route (its shortcut), path, query and identity: objects, for
#: the keys answered most recently, as many as pay for themselves (``memo.HotMemo``). Its byte
#: bound counts the stored bytes and the body each holds, which it keeps alive once the near
#: cache and the prepared answers' memo have let them go.
_remembered = HotMemo[tuple["HitShortcut", str, bytes, object], _Remembered](
    HOT_SMALL_ENTRIES, HOT_LARGE_ENTRIES, 16 * 1024 * 1024
)


class HitShortcut:
    """The repeated HITs of one route (see the module docstring)."""

    def __init__(self, route: CachedRoute, namespace: str, identity: Callable[[], object]) -> None:
        self._route = route
        self._namespace = namespace
        self._identity = identity

    def answer(self, request: Request, sub_response: object) -> Response | None:
        """The answer to ``request`` if the flow's would be a HIT of a remembered key, to the
        byte; ``None``: the flow answers."""
        scope = request.scope
        if scope["method"] != "GET":
            return None
        identity = self._identity()
        if identity is None:
            return None
        remembered = _remembered.get(
            (self, scope["path"], scope.get("query_string", b""), identity)
        )
        if remembered is None:
            return None
        for name, _ in scope["headers"]:
            if name == b"if-none-match" or name == b"cache-control":
                return None
        if isinstance(sub_response, Response) and sub_response.raw_headers:
            return None
        layer = current_layer()
        if (
            layer is None
            or remembered.layer() is not layer
            or remembered.route is not scope.get("route")
        ):
            return None
        stale_seconds = remembered.stale_seconds
        if stale_seconds and time.monotonic() >= remembered.fresh_until:
            return None
        read = layer.held(remembered.key, remembered.scope, remembered.raw)
        if read is None:
            return None
        fresh_for = read.remaining - stale_seconds
        layer.events.lookup(self._namespace, LookupOutcome.HIT)
        lifetime = remembered.lifetime
        age = None if lifetime is None else max(lifetime - read.remaining, 0)
        allowed = self._route.client_max_age
        return replay(
            remembered.prepared,
            max_age=None if allowed is None else min(allowed, fresh_for),
            served=Served(_HIT, b"hit", remembered.status_name, fresh_for, age),
            not_modified=False,
            head=False,
        )

    def remember(
        self,
        layer: CacheLayer,
        request: Request,
        key: ScopedKey,
        lookup: Lookup,
        prepared: PreparedResponse,
        status_name: bytes,
    ) -> None:
        """What the flow answered ``request`` with: a fresh HIT of ``key`` from the near cache,
        for a GET that asked nothing else of it (its caller checks)."""
        value, held, scope = lookup.value, lookup.held, key.scope
        identity = self._identity()
        if value is None or held is None or scope is None or identity is None:
            return
        path: str = request.scope["path"]
        query: bytes = request.scope.get("query_string", b"")
        # Surely fresh until then: the remaining time is whole seconds, rounded up.
        fresh_until = time.monotonic() + lookup.fresh_for - 1
        remembered = _Remembered(
            request.scope.get("route"),
            weakref.ref(layer),
            key,
            scope,
            held,
            prepared,
            value.stale_seconds,
            value.lifetime,
            fresh_until,
            status_name,
        )
        raw_bytes = len(held) + len(prepared.body)
        size = raw_bytes + len(path) + len(query) + len(key) + _REMEMBERED_OVERHEAD_BYTES
        _remembered.put((self, path, query, identity), remembered, size)
