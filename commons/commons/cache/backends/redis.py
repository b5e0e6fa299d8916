"""The Redis store, and the index that makes invalidation cheap.

Entries live under their exact keys (``{prefix}:{namespace}:tenant_...``). Beside them, every write
records its key in a sorted set, the *leaf index* of its scope, scored by the entry's expiry (server
time, ms). Leaves are found through two small registries, so an invalidation walks only the indexes
of the scope it targets::

    {prefix}:#reg:{ns}                   tenant leaves of the namespace (and its unscoped leaf)
    {prefix}:#reg:{ns}:t:{tenant}        user leaves of one tenant
    {prefix}:#idx:{ns}:t:{tenant}        tenant-scoped entries        (a leaf)
    {prefix}:#idx:{ns}:t:{tenant}:u:{u}  one user's entries           (a leaf)
    {prefix}:#idx:{ns}:-                 entries without a tenant     (a leaf)

``ns``, ``tenant`` and ``u`` are percent-encoded, so no text a caller passes can form another
scope's index name, a glob pattern or a cluster hash tag.

Why this design: fastapi-cache2 clears a namespace with ``KEYS`` inside a Lua script, which blocks
the server for a time that grows with the whole keyspace; ``SCAN`` does not block but still visits
every key. Here invalidation costs O(entries removed): it reads a leaf in pages, ``UNLINK``s each
page and removes exactly those members from the leaf, so an entry written concurrently is either
removed or stays indexed, never orphaned. Each index update runs in a one-key Lua script that drops
members expired more than a minute ago and keeps the index's own expiry at its longest-lived entry,
so expired entries leave no garbage behind. The index is written before the entry (in one
``MULTI``), so no entry exists that an invalidation cannot find.

Every redis-py and OS error is translated here, and only here, into the cache's own errors.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import cast
from urllib.parse import quote

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from commons.cache.backends.base import CacheStore
from commons.cache.errors import (
    BackendError,
    BackendRejectedError,
    BackendUnavailableError,
)
from commons.cache.scope import CacheScope, InvalidationTarget

__all__ = ["RedisStore"]

#: Members of an index that expired longer ago than this are pruned (allows for clock skew
#: between the time an entry was written and the server's clock).
INDEX_GRACE_MS = 60_000
#: Keys removed per UNLINK while invalidating or flushing: small enough that no command blocks.
BATCH_SIZE = 500

_INDEX_ADD = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl_ms = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now_ms + ttl_ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - tonumber(ARGV[3]))
local keep_ms = ttl_ms + tonumber(ARGV[3])
local current = redis.call('PTTL', KEYS[1])
if current == -1 or current < keep_ms then
  redis.call('PEXPIRE', KEYS[1], keep_ms)
end
return 1
"""

_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _quote(text: str) -> str:
    return quote(text, safe="")


def _translate(exc: BaseException) -> BackendError:
    if isinstance(exc, redis_errors.ResponseError):
        return BackendRejectedError(f"Redis refused the command: {exc}")
    if isinstance(exc, (redis_errors.TimeoutError, asyncio.TimeoutError, TimeoutError)):
        return BackendUnavailableError("Redis did not answer in time")
    return BackendUnavailableError(f"Redis unavailable: {type(exc).__name__}: {exc}")


_REDIS_FAILURES = (redis_errors.RedisError, OSError, asyncio.TimeoutError)


@asynccontextmanager
async def _redis_errors_translated() -> AsyncIterator[None]:
    """The one seam where lower-layer errors become :class:`BackendError`."""
    try:
        yield
    except _REDIS_FAILURES as exc:
        raise _translate(exc) from exc


class RedisStore(CacheStore):
    """Stores entries in Redis under one service prefix, with scope indexes for invalidation."""

    name = "redis"

    def __init__(self, client: Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._index_add = client.register_script(_INDEX_ADD)
        self._delete_if_equal = client.register_script(_DELETE_IF_EQUAL)
        self._closed = False

    @property
    def client(self) -> Redis:
        return self._client

    # -- index names ---------------------------------------------------------------------------

    def _namespace_registry(self, namespace: str) -> str:
        return f"{self._prefix}:#reg:{_quote(namespace)}"

    def _tenant_leaf(self, namespace: str, tenant_id: str) -> str:
        return f"{self._prefix}:#idx:{_quote(namespace)}:t:{_quote(tenant_id)}"

    def _tenant_registry(self, namespace: str, tenant_id: str) -> str:
        return f"{self._prefix}:#reg:{_quote(namespace)}:t:{_quote(tenant_id)}"

    def _user_leaf(self, namespace: str, tenant_id: str, user_id: str) -> str:
        return f"{self._tenant_leaf(namespace, tenant_id)}:u:{_quote(user_id)}"

    def _unscoped_leaf(self, namespace: str) -> str:
        return f"{self._prefix}:#idx:{_quote(namespace)}:-"

    def _index_updates(self, key: str, scope: CacheScope) -> list[tuple[str, str]]:
        """(index, member) pairs recording ``key`` under ``scope``."""
        ns = scope.namespace
        if scope.tenant_id is None:
            leaf = self._unscoped_leaf(ns)
            return [(self._namespace_registry(ns), leaf), (leaf, key)]
        tenant_leaf = self._tenant_leaf(ns, scope.tenant_id)
        updates = [(self._namespace_registry(ns), tenant_leaf)]
        if scope.user_id is None:
            updates.append((tenant_leaf, key))
        else:
            user_leaf = self._user_leaf(ns, scope.tenant_id, scope.user_id)
            updates.append((self._tenant_registry(ns, scope.tenant_id), user_leaf))
            updates.append((user_leaf, key))
        return updates

    # -- reads ---------------------------------------------------------------------------------

    async def get_with_ttl(self, key: str) -> tuple[int, bytes | None]:
        async with _redis_errors_translated():
            pipe = self._client.pipeline(transaction=False)
            pipe.pttl(key)
            pipe.get(key)
            ttl_ms, value = await pipe.execute()
        if value is None:
            return 0, None
        return (math.ceil(ttl_ms / 1000) if ttl_ms > 0 else 0), value

    # -- writes --------------------------------------------------------------------------------

    async def set(self, key: str, value: bytes, ttl_seconds: int, scope: CacheScope) -> None:
        ttl_ms = int(ttl_seconds * 1000)
        async with _redis_errors_translated():
            pipe = self._client.pipeline(transaction=True)
            for index, member in self._index_updates(key, scope):
                await self._index_add(
                    keys=[index], args=[member, ttl_ms, INDEX_GRACE_MS], client=pipe
                )
            pipe.set(key, value, px=ttl_ms)
            await pipe.execute()

    async def delete(self, key: str) -> int:
        async with _redis_errors_translated():
            return int(await self._client.unlink(key))

    async def add_if_absent(self, key: str, value: bytes, ttl_ms: int) -> bool:
        async with _redis_errors_translated():
            return bool(await self._client.set(key, value, px=ttl_ms, nx=True))

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        async with _redis_errors_translated():
            return bool(await self._delete_if_equal(keys=[key], args=[value]))

    # -- invalidation --------------------------------------------------------------------------

    async def invalidate(self, target: InvalidationTarget) -> int:
        ns = target.namespace
        async with _redis_errors_translated():
            if target.tenant_id is None:
                return await self._drain_registry(
                    self._namespace_registry(ns), self._drain_tenant_leaf
                )
            if target.user_id is None:
                return await self._drain_tenant_leaf(self._tenant_leaf(ns, target.tenant_id))
            return await self._drain_leaf(self._user_leaf(ns, target.tenant_id, target.user_id))

    async def _drain_tenant_leaf(self, leaf: str) -> int:
        """Drains a tenant's leaf, then the user leaves registered under that tenant."""
        # A leaf's registry has the same name with "#reg" for "#idx"; the unscoped leaf's
        # registry never exists, so draining it costs one empty read.
        registry = f"{self._prefix}:#reg:" + leaf[len(f"{self._prefix}:#idx:") :]
        removed = await self._drain_leaf(leaf)
        return removed + await self._drain_registry(registry, self._drain_leaf)

    async def _drain_registry(self, registry: str, drain: Callable[[str], Awaitable[int]]) -> int:
        removed = 0
        while True:
            members = cast(list[bytes], await self._client.zrange(registry, 0, BATCH_SIZE - 1))
            if not members:
                return removed
            for member in members:
                removed += await drain(member.decode())
            await self._client.zrem(registry, *members)

    async def _drain_leaf(self, leaf: str) -> int:
        removed = 0
        while True:
            keys = await self._client.zrange(leaf, 0, BATCH_SIZE - 1)
            if not keys:
                return removed
            pipe = self._client.pipeline(transaction=False)
            pipe.unlink(*keys)
            pipe.zrem(leaf, *keys)
            unlinked, _ = await pipe.execute()
            removed += int(unlinked)

    async def clear(self) -> int:
        removed = 0
        async with _redis_errors_translated():
            async for batch in self._scan_batches(f"{_glob_escape(self._prefix)}:*"):
                removed += int(await self._client.unlink(*batch))
        return removed

    async def _scan_batches(self, pattern: str) -> AsyncIterator[Sequence[bytes]]:
        batch: list[bytes] = []
        async for key in self._client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= BATCH_SIZE:
                yield batch
                batch = []
        if batch:
            yield batch

    # -- connection ----------------------------------------------------------------------------

    async def ping(self) -> None:
        async with _redis_errors_translated():
            await self._client.ping()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._client.aclose()
        except _REDIS_FAILURES:
            # Closing a connection to a server that is gone is not worth an error at shutdown.
            return


def _glob_escape(text: str) -> str:
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)
