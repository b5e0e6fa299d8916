"""A fastapi-cache2 ``Backend`` that delegates to the current cache layer.

It lets the guide's own ``from fastapi_cache.decorator import cache`` keep working unchanged: same
keys, same stores, same fallback, and ``invalidate_namespace()`` reaches its entries too. What
fastapi-cache2's decorator stores goes through the same rules as ours:

- The value is stored in the cache's format (``entry.py``), with a fingerprint of the route and
  handler the key was built for (our key builders record them), so an entry of another version of
  the route, garbage, or another library's bytes are misses, never a 500 from its decoder.
- Only JSON is stored: a coder that produces anything else (``PickleCoder``) is refused, with one
  warning per namespace, and nothing is ever unpickled.
- Only what fastapi-cache2's JSON decoder reads back is stored or served: it turns every object
  with a ``_spec_type`` key into a date, datetime or decimal and raises for any other, so such a
  body stored would make every hit a 500. It is not stored (one warning per namespace), and one
  stored by an earlier deploy is a miss.
- The decorator reads, computes and then writes in one request, but its ``Backend`` interface
  (``get_with_ttl(key)``, then ``set(key, value, expire)``) passes nothing from the read to the
  write. So the read's fill token is kept for that write (:class:`_ReadForWrite`), so that a value
  computed before an invalidation is not stored after it. The link is explicit and narrow: it
  holds for the task that read and for the key it read, once; any other ``set()`` is a write with
  no read before it and takes a fresh token (``CacheLayer.token_now``).
- An answer whose handler set ``Vary`` on the decorator's ``Response`` is not stored (with our key
  builders, which keep that response with the key): the key does not hold what it varies on.
- A key that names no tenant (fastapi-cache2's default key builder) is never read or written, with
  one warning per namespace naming the fix: its entry would be served to every tenant.
- ``clear()`` never touches a key outside ``CACHE_PREFIX``. ``clear(namespace=...)`` takes a
  namespace, or one tenant's or user's part of it (``"ns:tenant_1"``, ``"ns:tenant_1:user_7"``),
  as fastapi-cache2's own backends clear every key under that text; any other text is refused
  with a ``ValueError`` (it would clear nothing).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import weakref
from collections.abc import Callable
from typing import Any

from fastapi_cache.backends import Backend
from fastapi_cache.coder import JsonCoder
from starlette.responses import Response

from commons.cache.entry import BODY, RejectReason, route_fingerprint
from commons.cache.events import LookupOutcome
from commons.cache.http import header_values, note_bypass
from commons.cache.keyspace import (
    namespace_of_key,
    scope_of_namespace_text,
    split_qualified_namespace,
)
from commons.cache.layer import CacheLayer, FillToken
from commons.cache.scope import InvalidationTarget, ScopedKey

__all__ = ["LayerBackend"]

logger = logging.getLogger("commons.cache")

_PRODUCER = "fastapi-cache2"
_NOT_JSON = (
    "its coder does not produce JSON (PickleCoder?); cached values are JSON only, so that a "
    "writable Redis cannot run code"
)
_NO_TENANT = (
    "its keys name no tenant (fastapi-cache2's default key builder, or one like it), so an "
    "entry would be served to every tenant; nothing is cached: pass "
    "key_builder=tenant_cache_key_builder (or tenant_user_cache_key_builder)"
)
_NOT_DECODABLE = (
    "an answer holds a '_spec_type' key that fastapi-cache2's decoder cannot read back; "
    "such answers are not stored"
)

_TaskRef = weakref.ref[asyncio.Task[Any]] | None


class _ReadForWrite:
    """The fill token of a task's last read, handed to that task's write of the same key.

    fastapi-cache2's decorator calls ``get_with_ttl`` and then ``set`` in the request's own task.
    The token is kept in a context variable together with that task, and given out only to a
    ``set()`` of the same key in the same task, once: a task started by the handler inherits the
    variable but not the read, and a second ``set()`` takes a fresh token. (The task is held
    weakly: the variable lives in the task's own context.)
    """

    _last: contextvars.ContextVar[tuple[_TaskRef, str, FillToken] | None] = contextvars.ContextVar(
        "commons_cache_fastapi_cache2_read", default=None
    )

    @classmethod
    def remember(cls, key: str, token: FillToken) -> None:
        task = asyncio.current_task()
        cls._last.set((None if task is None else weakref.ref(task), key, token))

    @classmethod
    def take(cls, key: str) -> FillToken | None:
        """The token of this task's read of ``key``, if it is the last read and not yet taken."""
        last = cls._last.get()
        if last is None or last[1] != key:
            return None
        reader = None if last[0] is None else last[0]()
        if reader is not asyncio.current_task():
            return None
        cls._last.set(None)
        return last[2]


def _fingerprint(key: str) -> bytes:
    origin = key.origin if isinstance(key, ScopedKey) else None
    route, handler = origin if origin is not None else (None, None)
    return route_fingerprint(route, handler, producer=_PRODUCER)


def _is_json(value: bytes) -> bool:
    try:
        json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return True


def _varies(key: str) -> bool:
    """Whether the handler said ``Vary`` on the response of the request ``key`` was built for:
    that answer may only go to requests with the same values of those headers, which the key
    does not hold, so it is not stored (``Vary: *`` included)."""
    response = key.response if isinstance(key, ScopedKey) else None
    return isinstance(response, Response) and bool(header_values(response, b"vary"))


_SPEC_TYPE = b'"_spec_type"'


def _decodes(value: bytes) -> bool:
    """Whether ``value`` is JSON that fastapi-cache2's JSON decoder reads back (see the module
    docstring).

    JSON, whoever wrote it: a route may name another coder (``PickleCoder``), which decodes
    whatever it is handed, and a value written into Redis by someone else is handed to it on a
    hit. JSON is never a pickle that runs anything (unpickling it fails at its first byte).
    """
    if _SPEC_TYPE not in value:
        return _is_json(value)
    try:
        JsonCoder.decode(value)
    # Its converters (pendulum, Decimal) fail in ways of their own; any failure here would be
    # a 500 on every hit.
    except Exception:
        return False
    return True


class LayerBackend(Backend):
    """fastapi-cache2 backend over whichever layer ``init_cache()`` installed last."""

    def __init__(self, layer: Callable[[], CacheLayer | None]) -> None:
        self._layer = layer
        self._warned_namespaces: set[tuple[str, str]] = set()

    async def get_with_ttl(self, key: str) -> tuple[int, bytes | None]:
        layer = self._layer()
        if layer is None:
            return 0, None
        lookup = (
            await layer.lookup(key, _fingerprint(key)) if self._names_a_tenant(layer, key) else None
        )
        namespace = namespace_of_key(layer.prefix, key) or ""
        if lookup is None:
            if isinstance(key, ScopedKey) and key.reason is not None:
                self._refuse(layer, key, key.reason)
            # Counted as the decorator counts its own requests (see CacheEvents.lookup).
            bypass = LookupOutcome.BYPASS_DISABLED
            if layer.enabled:
                bypass = LookupOutcome.BYPASS_NO_IDENTITY
            layer.events.lookup(namespace, bypass)
            note_bypass()  # the decorator will say MISS: the middleware says bypass
            return 0, None
        _ReadForWrite.remember(key, lookup.token)
        value = lookup.value
        if value is not None and not _decodes(value.payload):
            layer.events.rejected_entry(namespace, RejectReason.FORMAT)
            value = None
        if value is None or value.kind != BODY:
            layer.events.lookup(namespace, LookupOutcome.MISS)
            return 0, None
        layer.events.lookup(namespace, LookupOutcome.HIT)
        return lookup.fresh_for, value.payload

    async def get(self, key: str) -> bytes | None:
        return (await self.get_with_ttl(key))[1]

    async def set(self, key: str, value: bytes, expire: int | None = None) -> None:
        layer = self._layer()
        if layer is None:
            return
        if not _is_json(value):
            self._refuse(layer, key, _NOT_JSON)
            return
        if not _decodes(value):
            self._refuse(layer, key, _NOT_DECODABLE)
            return
        if _varies(key) or not self._names_a_tenant(layer, key):
            return
        token = _ReadForWrite.take(key) or await layer.token_now(key)
        if token is None:
            return
        await layer.store(
            key,
            value,
            kind=BODY,
            expire=expire or layer.settings.CACHE_TTL_SECONDS,
            stale_seconds=0,
            fingerprint=_fingerprint(key),
            token=token,
        )

    def _names_a_tenant(self, layer: CacheLayer, key: str) -> bool:
        """Whether ``key`` is one tenant's (or says why not, once per namespace). Our builders'
        keys always are, or are uncacheable for a reason they log; any other key is kept only
        when its text names a tenant, as a builder wrapping ours does (fail closed)."""
        if isinstance(key, ScopedKey):
            return True
        scope = layer.scope_of(key)
        if scope is not None and scope.tenant_id is not None:
            return True
        self._refuse(layer, key, _NO_TENANT)
        return False

    def _refuse(self, layer: CacheLayer, key: str, why: str) -> None:
        namespace = namespace_of_key(layer.prefix, key) or ""
        if (namespace, why) not in self._warned_namespaces:
            self._warned_namespaces.add((namespace, why))
            logger.warning("serving namespace %r uncached (said once): %s", namespace, why)

    async def clear(self, namespace: str | None = None, key: str | None = None) -> int:
        layer = self._layer()
        if layer is None:
            return 0
        if key is not None:
            return await layer.delete(key)
        # fastapi-cache2 passes "{prefix}" or "{prefix}:{namespace}".
        prefix, bare_namespace = split_qualified_namespace(namespace or layer.prefix)
        if prefix != layer.prefix:
            return 0  # another service's keys
        if bare_namespace is None:
            return await layer.clear()
        scope = scope_of_namespace_text(bare_namespace)
        if scope is None:
            # Clearing it would remove nothing, where fastapi-cache2's own backends remove
            # every key under the text: said, not silently done.
            raise ValueError(
                f"FastAPICache.clear(namespace={bare_namespace!r}) names no entries: it takes "
                "'<namespace>', '<namespace>:tenant_<id>' or '<namespace>:tenant_<id>:user_<id>' "
                "(clear(key=...) for one key, invalidate_tags() for tags)"
            )
        return await layer.invalidate(
            InvalidationTarget(scope.namespace, scope.tenant_id, scope.user_id)
        )
