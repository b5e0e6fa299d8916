"""The hit shortcut: a repeated near-cache HIT answered without the whole request flow.

Most requests of a busy cached route repeat a key this process answered a moment ago from the
near cache. The request flow (``request_flow.py``) works each of them out from scratch: it builds
the key, reads it through the layer and its breaker, validates the value, prepares its answer and
decides the outcome. Here the process remembers, for the keys answered that way most recently
(and those read from Redis that the near cache kept: often hit only once or twice more before
it evicts them, over a working set larger than it), what the flow found (the key, the stored
bytes, their ETag), by route and by what our key builders build a key from: the path, the query
and the identity they read (``keys.identity_read_by``).
A request that repeats them is answered from that memory, only when the flow's answer would be
the same to the byte:

- it asks nothing else of the answer: a GET with neither ``If-None-Match`` nor ``Cache-Control``,
  and the route's dependencies set no header on the response;
- the same route fingerprint (what the route renders) under the same ``init_cache()``, with one
  of our key builders: a service's own builder may read anything, so its routes never take the
  shortcut;
- the near cache holds that very stored value now, by the checks of every near-cache read (its
  generations held and confirmed within ``CACHE_NEAR_CACHE_MAX_AGE_SECONDS``, the entry
  unexpired, the tracking session alive; a sampled share verified in Redis), with Redis in use
  and no failure to clear, and lookups not logged one by one (``CacheLayer.held``);
- the value is fresh.

Otherwise the flow answers, as it would have anyway. A shortcut answer is counted as the flow
counts a HIT (and a near-cache hit), with the same headers (``Age``, ``Cache-Status``' ``ttl``).

What is remembered per key is one flat tuple of strings, bytes and numbers (no object), which the
garbage collector stops tracking once it has survived a collection: so the shortcut can remember
as many keys as the near cache holds (over a working set of a hundred thousand keys, about
fifty thousand), where objects would make every full collection walk them. Bounded as the near cache
is: in entries, and in bytes by ``CACHE_NEAR_CACHE_MAX_BYTES`` (the stored bytes counted, though
the near cache holds that very object while both keep it). The keys answered most recently are
also kept as objects (route, scope, prepared answer: ``memo.HotMemo``, as many as pay for
themselves), which their answer uses as they are. Otherwise the answer comes from the
route's prepared answers (``cached_route.PreparedResponses``) when they still hold it as an
object; a plain JSON answer is otherwise prepared again from the stored bytes (its ETag
remembered), and any other is left to the flow.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import NamedTuple

from starlette.requests import Request
from starlette.responses import Response

from commons.cache.cached_route import CachedRoute
from commons.cache.entry import BODY
from commons.cache.events import LookupOutcome
from commons.cache.http import PreparedResponse, Served, prepare_plain_json, replay
from commons.cache.layer import CacheLayer, Lookup
from commons.cache.lifecycle import current_layer
from commons.cache.memo import BoundedMemo, HotMemo, MemoShare, process_hot_memo
from commons.cache.scope import CacheScope, ScopedKey, shared_scope

__all__ = ["HitShortcut"]

_HIT = b"HIT"
#: What remembering one key holds besides its strings and bytes: the tuples, a float, the
#: memo's dictionary slots.
_REMEMBERED_OVERHEAD_BYTES = 400
#: Keys remembered at most (the near cache's entries are bounded by its bytes alone: about
#: fifty thousand of about 1 KB in its default 64 MiB).
_REMEMBERED_MAX_ENTRIES = 65_536

#: What the flow found for one key, answered from the near cache, as a flat tuple (see the
#: module docstring), in this order: the ``CacheLayer.serial`` and the route's fingerprint it
#: was read under; the key and its scope's fields; the stored bytes (the very object the near
#: cache holds), their kind and where their payload starts; the answer's ETag and privacy; the
#: entry's stale window and lifetime; until when (``time.monotonic()``) it is surely fresh, with
#: a stale window; the cache's name in ``Cache-Status``.
_Remembered = tuple[
    int,
    bytes,
    str,
    str,
    str | None,
    str | None,
    tuple[str, ...],
    bytes,
    bytes,
    int,
    str,
    bool,
    int,
    int | None,
    float,
    bytes,
]

#: Every route's remembered hits, by route (its shortcut's number), path, query and identity.
_RememberedKey = tuple[int, str, bytes, object]


class _RememberedHits:
    """The memo of remembered hits, bounded by the byte bound of the near cache it follows (the
    last ``init_cache()``'s ``CACHE_NEAR_CACHE_MAX_BYTES``)."""

    def __init__(self) -> None:
        self.max_bytes = 0
        self.memo = BoundedMemo[_RememberedKey, _Remembered](1, 1)

    def for_bound(self, max_bytes: int) -> BoundedMemo[_RememberedKey, _Remembered]:
        if max_bytes != self.max_bytes:
            self.max_bytes = max_bytes
            self.memo = BoundedMemo[_RememberedKey, _Remembered](_REMEMBERED_MAX_ENTRIES, max_bytes)
        return self.memo


_remembered = _RememberedHits()


class _Hot(NamedTuple):
    """A remembered hit among the keys answered most recently, with the objects its answer
    needs at hand: the route it was read through, its scope, its prepared answer."""

    route: object
    scope: CacheScope
    prepared: PreparedResponse
    remembered: _Remembered


#: The same as objects, for the keys answered most recently: as many as pay for themselves
#: (``memo.HotMemo``: all of them while the keys hit fit in 4,096, else few). A hot key's answer
#: then needs no scope looked up, no fingerprint compared, no prepared answer found.
_hot: HotMemo[_RememberedKey, _Hot] = process_hot_memo(MemoShare.NEAR_HITS_AS_OBJECTS)
#: Each shortcut's number, never reused in the process (the memo's keys hold no object).
_SERIALS = itertools.count(1)


def _prepared(route: CachedRoute, remembered: _Remembered) -> PreparedResponse | None:
    """The answer to replay for a remembered hit that is not kept as an object: a plain JSON one
    as the route's prepared answers keep it (with the headers last sent), else prepared again
    from the stored bytes, ETag known; any other only as they keep it (``None`` otherwise)."""
    key, raw, kind, offset, etag, private = remembered[2], *remembered[7:12]
    if kind != BODY:
        return route.prepared.remembered(key, raw, private)
    prepared = route.prepared.kept_as_object(key, raw, private)
    if prepared is None:
        prepared = prepare_plain_json(raw[offset:-1], private=private, etag=etag)
    return prepared


class HitShortcut:
    """The repeated HITs of one route (see the module docstring)."""

    def __init__(self, route: CachedRoute, namespace: str, identity: Callable[[], object]) -> None:
        self._route = route
        self._namespace = namespace
        self._identity = identity
        self._serial = next(_SERIALS)

    def answer(self, request: Request, sub_response: object) -> Response | None:
        """The answer to ``request`` if the flow's would be a HIT of a remembered key, to the
        byte; ``None``: the flow answers."""
        scope = request.scope
        if scope["method"] != "GET":
            return None
        identity = self._identity()
        if identity is None:
            return None
        memo_key = (self._serial, scope["path"], scope.get("query_string", b""), identity)
        hot = _hot.get(memo_key)
        remembered = hot.remembered if hot is not None else _remembered.memo.get(memo_key)
        if remembered is None:
            return None
        for name, _ in scope["headers"]:
            if name == b"if-none-match" or name == b"cache-control":
                return None
        if isinstance(sub_response, Response) and sub_response.raw_headers:
            return None
        # Unpacked at once: one step, where indexing field by field costs two each.
        (
            layer_serial,
            fingerprint,
            key,
            namespace,
            tenant_id,
            user_id,
            tags,
            raw,
            _kind,
            _offset,
            _etag,
            _private,
            stale_seconds,
            lifetime,
            fresh_until,
            status_name,
        ) = remembered
        layer = current_layer()
        route = self._route
        if (
            layer is None
            or layer_serial != layer.serial
            or (stale_seconds and time.monotonic() >= fresh_until)
        ):
            return None
        if hot is not None:
            if hot.route is not scope.get("route"):
                return None
            entry_scope, prepared = hot.scope, hot.prepared
        else:
            if fingerprint != route.fingerprint(request):
                return None
            entry_scope = shared_scope(namespace, tenant_id, user_id, tags)
            prepared = None
        read = layer.held(key, entry_scope, raw)
        if read is None:
            return None
        if prepared is None:
            prepared = _prepared(route, remembered)
            if prepared is None:
                return None
            self._keep_hot(memo_key, scope.get("route"), entry_scope, prepared, remembered, raw)
        fresh_for = read.remaining - stale_seconds
        layer.events.lookup(self._namespace, LookupOutcome.HIT)
        age = None if lifetime is None else max(lifetime - read.remaining, 0)
        allowed = route.client_max_age
        return replay(
            prepared,
            max_age=None if allowed is None else min(allowed, fresh_for),
            served=Served(_HIT, b"hit", status_name, fresh_for, age),
            not_modified=False,
            head=False,
        )

    def remember(
        self,
        layer: CacheLayer,
        request: Request,
        key: ScopedKey,
        fingerprint: bytes,
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
        plain_key = str(key)
        remembered: _Remembered = (
            layer.serial,
            fingerprint,
            plain_key,
            scope.namespace,
            scope.tenant_id,
            scope.user_id,
            scope.tags,
            held,
            value.kind,
            value.offset,
            prepared.etag,
            prepared.private,
            value.stale_seconds,
            value.lifetime,
            fresh_until,
            status_name,
        )
        size = len(held) + len(path) + len(query) + len(plain_key) + _REMEMBERED_OVERHEAD_BYTES
        memo = _remembered.for_bound(layer.settings.CACHE_NEAR_CACHE_MAX_BYTES)
        memo_key = (self._serial, path, query, identity)
        memo.put(memo_key, remembered, size)
        self._keep_hot(memo_key, request.scope.get("route"), scope, prepared, remembered, held)

    @staticmethod
    def _keep_hot(
        memo_key: _RememberedKey,
        route: object,
        scope: CacheScope,
        prepared: PreparedResponse,
        remembered: _Remembered,
        raw: bytes,
    ) -> None:
        # Its byte bound counts the body the prepared answer keeps alive beside the stored bytes.
        size = len(raw) + len(prepared.body) + _REMEMBERED_OVERHEAD_BYTES
        _hot.put(memo_key, _Hot(route, scope, prepared, remembered), size)
