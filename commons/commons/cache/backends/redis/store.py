"""The Redis store: the store contract on one server, behind Sentinel or on a Redis Cluster.

What the three topologies share lives here: the keys (``keyspace.py``), the generations that make
an invalidation hold, the order of an invalidation's steps, the index walk (``index.py``), the Lua
scripts (``scripts.py``) and the one seam where errors are translated (``translation.py``). What
differs is one object per topology (``topology.py``): :class:`~.one_server.OneServer`,
:class:`~.sentinel.BehindSentinel` or :class:`~.cluster.OnCluster`, picked when the store is built
from the client it is given (:func:`topology_of`), so a read on one server never passes through
cluster code. With ``REDIS_CLUSTER=auto`` the store starts on one server and, if its first contact
finds a cluster node, replaces its topology with the cluster's.

A scope's entries are valid under its *generations* (random values under ``#gen`` keys, one per
level of the scope, widest first): a read returns them with the entry, a fill is stored only while
they are still the ones its read saw, and an invalidation deletes (retires) the target's one.
Whatever removes a generation, an invalidation or an eviction, only ever turns entries into misses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster

from commons.cache.backends.base import CacheStore, ReplicaLocks, StoredRead
from commons.cache.backends.redis.cluster import OnCluster
from commons.cache.backends.redis.connection import RedisClient, reports_cluster_mode
from commons.cache.backends.redis.expiry import ExpiryMemo
from commons.cache.backends.redis.index import BATCH_SIZE, IndexWalk
from commons.cache.backends.redis.near import FlushReason, NearCache
from commons.cache.backends.redis.one_server import OneServer
from commons.cache.backends.redis.sentinel import BehindSentinel, sentinel_pool
from commons.cache.backends.redis.sentinel_master import SentinelView
from commons.cache.backends.redis.topology import Fill, Topology
from commons.cache.backends.redis.translation import REDIS_FAILURES, errors_translated, translate
from commons.cache.errors import BackendBusyError, BackendError, BackendUnavailableError
from commons.cache.keyspace import Keyspace
from commons.cache.memo import MemoShare, share_of
from commons.cache.scope import CacheScope, InvalidationTarget

__all__ = ["RedisStore", "topology_of"]

logger = logging.getLogger("commons.cache")

#: Members of an index that expired longer ago than this are pruned (allows for clock skew
#: between the time an entry was written and the server's clock). Also the life of a new
#: generation; every fill extends its scope's generations to outlive the entry by as much.
INDEX_GRACE_MS = 60_000
#: How often an invalidation that found every pooled connection in use looks for a free one.
BUSY_POLL_SECONDS = 0.002


def topology_of(
    client: RedisClient,
    names: Keyspace,
    expiries: ExpiryMemo,
    near_cache: NearCache | None,
    *,
    contact_pending: bool = False,
) -> Topology:
    """The topology object for ``client``: the one place that tells the topologies apart."""
    if isinstance(client, RedisCluster):
        return OnCluster(client, names, expiries, near_cache)
    if (pool := sentinel_pool(client)) is not None:
        return BehindSentinel(client, pool, names, expiries)
    return OneServer(client, names, expiries, near_cache, contact_pending=contact_pending)


class RedisStore(CacheStore, ReplicaLocks):
    """Stores entries in Redis under one service prefix, with scope indexes for invalidation."""

    name = "redis"
    uses_generations = True

    def __init__(
        self,
        client: RedisClient,
        prefix: str,
        *,
        cluster_factory: Callable[[], RedisCluster] | None = None,
        near_cache: NearCache | None = None,
    ) -> None:
        """
        Args:
            client: A client of one server (or of Sentinel's master), or a cluster client.
            prefix: The service's ``CACHE_PREFIX``.
            cluster_factory: With a one-server client: builds the cluster client to switch to
                if that server turns out to be a cluster node (``REDIS_CLUSTER=auto``).
            near_cache: Keeps what reads find, coherently (``near.py``): on one server this one,
                on a cluster one per primary shaped after it (``cluster_reads.py``); not used
                behind Sentinel.
        """
        self._keys = Keyspace(prefix)
        self._expiries = ExpiryMemo(max_bytes=share_of(MemoShare.EXPIRIES))
        self._near_cache = near_cache
        self._closed = False
        self._topology = topology_of(
            client,
            self._keys,
            self._expiries,
            near_cache,
            contact_pending=cluster_factory is not None,
        )
        #: The one server whose first contact decides whether it is a cluster node.
        self._first_contact: tuple[OneServer, Callable[[], RedisCluster]] | None = None
        if cluster_factory is not None and isinstance(self._topology, OneServer):
            self._first_contact = (self._topology, cluster_factory)

    @property
    def client(self) -> RedisClient:
        return self._topology.client

    @property
    def topology(self) -> Topology:
        """What this store talks to: one server, a master behind Sentinel or a cluster."""
        return self._topology

    @property
    def keyspace(self) -> Keyspace:
        """The names of this store's helper keys."""
        return self._keys

    @property
    def near_cache(self) -> NearCache | None:
        """The near cache in use on one server, or ``None`` (on a cluster each primary has its
        own, see ``cluster_reads.py``)."""
        return self._topology.near_cache

    def near_cache_held(self) -> tuple[int, int]:
        nears = self._topology.near_caches
        return sum(len(near) for near in nears), sum(near.bytes_held for near in nears)

    @property
    def is_cluster(self) -> bool:
        """Whether the store talks to a Redis Cluster (known after the first :meth:`ping`)."""
        return self._topology.is_cluster

    def generation_keys(self, scope: CacheScope) -> list[str]:
        """The keys holding the generations an entry of ``scope`` depends on, widest first."""
        return self._keys.generation_keys(scope)

    # -- reads and writes ----------------------------------------------------------------------

    def read(self, key: str, scope: CacheScope) -> Coroutine[Any, Any, StoredRead]:
        """The entry and its scope's generations, as the topology reads them (on one server in
        one round trip, with the near cache in none when it holds them)."""
        # Handed over rather than awaited here: a hit costs no coroutine of its own.
        return self._topology.read(key, scope)

    def held(self, key: str, scope: CacheScope, expected: bytes) -> StoredRead | None:
        return self._topology.held(key, scope, expected)

    async def generation(self, scope: CacheScope) -> bytes:
        groups = self._topology.generation_groups(scope)
        async with errors_translated():
            if len(groups) == 1:
                return await self._ensure(groups[0])
            # On a cluster each tag's generations are in a slot of their own: one script each.
            return b".".join(await asyncio.gather(*map(self._ensure, groups)))

    async def _ensure(self, keys: list[str]) -> bytes:
        """The generations under ``keys`` (one slot), each made where missing."""
        fresh = [secrets.token_hex(8) for _ in keys]
        ensure_generations = self._topology.scripts.ensure_generations
        return cast(bytes, await ensure_generations(keys=keys, args=[*fresh, INDEX_GRACE_MS]))

    async def write(
        self,
        key: str,
        value: bytes,
        ttl_seconds: float,
        scope: CacheScope,
        generation: bytes | None = None,
    ) -> bool:
        fill = Fill(key, value, int(ttl_seconds * 1000), scope, generation, INDEX_GRACE_MS)
        topology = self._topology
        sent_at = time.monotonic()
        # A miss's path: the seam spelled out rather than entered as a context manager (see
        # ``one_server.py``).
        try:
            stored = await topology.write(fill)
        except REDIS_FAILURES as exc:
            raise translate(exc) from exc
        finally:
            # Read-your-writes in this process: Redis' invalidation message comes later.
            topology.drop_near([key])
        if stored:
            self._expiries.remember(key, value, ttl_seconds, measured_at=sent_at)
        return stored

    async def delete(self, key: str, scope: CacheScope | None = None) -> int:
        if scope is None:
            try:
                async with errors_translated():
                    return int(await self.client.unlink(key))
            finally:
                self._topology.drop_near([key])
        # A fill of this key computed before the deletion must not bring it back; once the
        # generation is retired, the entry is a miss wherever it is read, so removing it only
        # frees its memory.
        generation_key = self._keys.scope_generation_key(scope)
        async with errors_translated():
            view = await self._topology.follow_master()
        try:
            await self._retire(generation_key, view)
        finally:
            self._topology.drop_near([key, generation_key])
        try:
            async with errors_translated():
                return int(await self.client.unlink(key))
        except BackendError as exc:
            logger.debug("deleted entry left to expire: %s", exc)
            return 0

    async def add_if_absent(self, key: str, value: bytes, ttl_ms: int) -> bool:
        async with errors_translated():
            return bool(await self.client.set(key, value, px=ttl_ms, nx=True))

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        async with errors_translated():
            return bool(await self._topology.scripts.delete_if_equal(keys=[key], args=[value]))

    # -- invalidation --------------------------------------------------------------------------

    async def invalidate(self, target: InvalidationTarget) -> int:
        """Retires the target's generation, then removes its indexed entries (all before it
        returns: the command-line tool's way; the layer's is :meth:`invalidate_effective`)."""
        removed, removal = await self.invalidate_effective(target)
        return removed + await removal()

    async def invalidate_effective(
        self, target: InvalidationTarget
    ) -> tuple[int, Callable[[], Awaitable[int]]]:
        """Retires the target's generation; returns the removal of its indexed entries, to run
        afterwards (nothing is removed before it returns).

        Retiring the generation (deleting it: the next read makes a new random one) is what makes
        the invalidation hold: no entry of the old one is ever served again, nor stored by a fill
        that began before. It is one command, which a full Redis still accepts. Removing the
        entries afterwards only frees their memory: a failure there loses nothing, and an entry
        that a fill wrote again under the new generation meanwhile may be removed too (a miss).
        """
        async with errors_translated():
            view = await self._topology.follow_master()
        scope = CacheScope(target.namespace, target.tenant_id, target.user_id)
        generation_key = self.generation_keys(scope)[-1]
        try:
            await self._retire(generation_key, view)
        finally:
            # Whether or not Redis took it: this process serves nothing of the old generation.
            self._topology.drop_near([generation_key])
        return 0, lambda: self._remove_entries(target)

    async def _remove_entries(self, target: InvalidationTarget) -> int:
        """Removes the target's indexed entries; how many (0 when Redis failed half-way: the
        rest expire by themselves)."""
        walk = IndexWalk(self.client, self._topology.scripts, self._keys, self._drain_leaf)
        return await walk.remove_entries(target)

    async def _drain_leaf(self, leaf: str) -> int:
        return await self._topology.drain_leaf(leaf)

    async def _retire(self, generation_key: str, view: SentinelView | None) -> None:
        """Deletes a scope's generation: what makes an invalidation (or a deletion) hold.

        A burst of them can find every pooled connection in use (``REDIS_MAX_CONNECTIONS``): this
        process is busy, Redis is not down, and an invalidation is worth a short wait where a
        read is not. So it waits for a connection to come free, for at most one command timeout:
        every connection in use is released within that time unless Redis stops answering, and
        a pool that stays full that long is reported as Redis not answering in time.

        Behind Sentinel and on a cluster, where a replica may be promoted, the deletion must also
        reach a replica: see :meth:`Topology.unlink_confirmed` of each topology.

        Raises:
            BackendError: The generation could not be deleted, or no replica confirmed it.
        """
        topology = self._topology
        loop = asyncio.get_running_loop()
        deadline = loop.time() + topology.command_timeout
        while True:
            try:
                async with errors_translated():
                    await topology.unlink_confirmed(generation_key, view)
                return
            except BackendBusyError as exc:
                if loop.time() >= deadline:
                    raise BackendUnavailableError(
                        f"Redis did not answer in time: {exc} for {topology.command_timeout}s"
                    ) from exc
            await asyncio.sleep(BUSY_POLL_SECONDS)

    async def clear(self, on_batch: Callable[[int], object] | None = None) -> int:
        """Removes every key of the prefix (SCAN, then UNLINK in batches); ``on_batch(n)`` after
        each batch (the CLI's progress bar)."""
        removed = 0
        try:
            async with errors_translated():
                await self._detect_cluster()
                async for batch in self.keys_of_prefix():
                    unlinked = int(await self.client.unlink(*batch))
                    removed += unlinked
                    if on_batch is not None:
                        on_batch(unlinked)
        finally:
            self._topology.flush_near(FlushReason.CLEAR)
        return removed

    async def keys_of_prefix(self) -> AsyncIterator[Sequence[bytes]]:
        """Every key of the prefix, entries and helpers alike, in batches (``SCAN``; redis-py's
        errors untranslated: callers translate them)."""
        batch: list[bytes] = []
        async for key in self.client.scan_iter(match=self._keys.all_keys_glob(), count=1000):
            batch.append(key)
            if len(batch) >= BATCH_SIZE:
                yield batch
                batch = []
        if batch:
            yield batch

    # -- connection ----------------------------------------------------------------------------

    async def ping(self) -> None:
        """Answers when Redis does; on a cluster, when every primary does."""
        async with errors_translated():
            await self._detect_cluster()
            await self._topology.ping()
        # Subscribing now, so that the first reads can be kept.
        self._topology.start()

    async def _detect_cluster(self) -> None:
        """On the first contact (``REDIS_CLUSTER=auto``): switch to the cluster client if needed."""
        if self._first_contact is None:
            return
        single, factory = self._first_contact
        if await reports_cluster_mode(single.server):
            self._topology = OnCluster(factory(), self._keys, self._expiries, self._near_cache)
            if self._near_cache is not None:
                # Each primary gets a near cache of its own (cluster_reads.py), shaped after it.
                await self._near_cache.aclose()
            with contextlib.suppress(*REDIS_FAILURES):
                await single.aclose()
        else:
            single.contact_made()
        self._first_contact = None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._near_cache is not None:
                await self._near_cache.aclose()
            await self._topology.aclose()
        except REDIS_FAILURES:
            # Closing a connection to a server that is gone is not worth an error at shutdown.
            return
