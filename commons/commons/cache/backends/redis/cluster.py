"""A Redis Cluster: entries over every slot, a namespace's indexes and generations in one.

Everything the store promises holds on Redis Cluster (:class:`redis.asyncio.cluster.RedisCluster`),
with three differences, because an entry and its indexes live in different slots and so cannot
share a ``MULTI``: a write updates the indexes (one ``MULTI`` on the namespace's slot), then stores
the entry, then updates the indexes again, so an invalidation that ran between the first two steps
cannot leave the entry unindexed; an invalidation's ``UNLINK`` is split per slot; ``clear()`` scans
every primary. Reads are single-key (``cluster_reads.py``). A store built with ``cluster_factory``
decides on its first contact whether the node it was given is part of a cluster (``HELLO``) and,
if so, switches to the cluster client. Redis replicates asynchronously: a primary that crashes
(rather than being failed over by ``CLUSTER FAILOVER``, which waits for the replica to catch up) may
take the last writes it acknowledged with it, invalidations included. Behind Sentinel an
invalidation is confirmed on a replica (``WAIT``) or kept and applied again (see
:meth:`~commons.cache.backends.redis.store.RedisStore._retire`); on a cluster too, on a replica of
the primary owning the generation's slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, cast

from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection

from commons.cache.backends.base import StoredRead
from commons.cache.backends.redis.cluster_reads import ClusterReads
from commons.cache.backends.redis.expiry import ExpiryMemo
from commons.cache.backends.redis.index import DRAIN_PAGE_SIZE, index_updates
from commons.cache.backends.redis.near import NearCache
from commons.cache.backends.redis.scripts import INDEX_ADD, KEEP_GENERATIONS
from commons.cache.backends.redis.sentinel_master import SentinelView
from commons.cache.backends.redis.topology import (
    PIPELINED_READS_MAX_PENDING,
    REPLICA_CONFIRM_TIMEOUT_MS,
    Fill,
    Topology,
    command_budget,
)
from commons.cache.backends.redis.translation import REDIS_FAILURES, translate
from commons.cache.errors import BackendMovingError, BackendUnconfirmedError
from commons.cache.keyspace import Keyspace
from commons.cache.scope import CacheScope

__all__ = ["MAX_REDIRECTS", "SLOT_MAP_RECHECK_SECONDS", "OnCluster"]

#: On a cluster, how many redirects (``ASK``, ``MOVED``) an invalidation's deletion follows.
MAX_REDIRECTS = 5
#: On a cluster, how often an invalidation may read the slot map again when it lists no replica
#: of the generation's primary (``CLUSTER SLOTS`` omits a replica without a replication offset).
SLOT_MAP_RECHECK_SECONDS = 1.0


class OnCluster(Topology):
    """A Redis Cluster, read per primary (``cluster_reads.py``), written slot by slot."""

    is_cluster = True

    def __init__(
        self,
        client: RedisCluster,
        names: Keyspace,
        expiries: ExpiryMemo,
        near_cache: NearCache | None,
    ) -> None:
        """
        Args:
            near_cache: The shape of each primary's own near cache (``cluster_reads.py``).
        """
        budget = command_budget(client.get_connection_kwargs())
        super().__init__(client, names, expiries, budget)
        self.cluster = client
        self._slot_map_read_at = 0.0
        self.reads = ClusterReads(
            client,
            names.generation_groups,
            timeout=budget,
            max_pending=PIPELINED_READS_MAX_PENDING,
            near_cache=near_cache,
            tracked_prefixes=names.generation_prefixes(),
        )

    def held(self, key: str, scope: CacheScope, expected: bytes) -> StoredRead | None:
        return self.reads.held(key, scope, expected)

    async def read(self, key: str, scope: CacheScope) -> StoredRead:
        """What the primaries' near caches hold, else a read on the slots' primaries' pipelined
        connections (kept by their near caches), else through redis-py (a redirect, an unknown
        slot). A tagged entry's too: each tag's generations, in the tag's own slot (see
        ``keyspace.py``), are one more group read on its primary and held by its near cache."""
        cluster = self.reads
        held = cluster.held(key, scope)
        if held is not None:
            return held
        plan = cluster.begin(key, scope)
        try:
            routed = await cluster.read(key, scope, plan, with_ttl=not self.expiries.knows(key))
            if routed is None:
                return await self._read_through_client(key, scope)
            read, expires_at = await self.stored_read(key, routed.replies, routed.told)
            if (
                plan is not None
                and expires_at is not None
                and cluster.keep(plan, routed, read, expires_at)
            ):
                return read._replace(kept=True)
            return read
        except REDIS_FAILURES as exc:
            raise translate(exc) from exc
        finally:
            if plan is not None:
                cluster.end(plan)

    def generation_groups(self, scope: CacheScope) -> list[list[str]]:
        return self.keys.generation_groups(scope)

    async def _read_through_client(self, key: str, scope: CacheScope) -> StoredRead:
        """A read through redis-py: the entry, then each slot's group of its generations (the
        scope's own, each tag's) at once. Its errors are translated by :meth:`read`."""
        # The entry and its generations live in different slots: the entry first, so an
        # invalidation between the two reads shows as another generation (a miss).
        replies = [cast(bytes | None, await self.cluster.get(key))]
        groups = self.keys.generation_groups(scope)
        for values in await asyncio.gather(*(self.cluster.mget(group) for group in groups)):
            replies += cast(list[bytes | None], values)
        return (await self.stored_read(key, replies, None))[0]

    async def write(self, fill: Fill) -> bool:
        # The indexes and the generations share the namespace's slot, the entry is elsewhere:
        # index (and generations), entry, index. EVAL rather than EVALSHA: a cluster transaction
        # cannot load a script that a promoted replica has never seen. The generations are not
        # compared here (they are in another slot than the entry): a read never serves an entry
        # of another generation anyway. A fill (under a generation) keeps its scope's
        # generations alive as long as its entry, as on one server: made with a short life,
        # they would otherwise turn the scope's every entry into a miss at once. Each tag's
        # generations are in a slot of their own, kept alive there.
        client, ttl_ms, grace_ms = self.cluster, fill.ttl_ms, fill.grace_ms
        updates = index_updates(self.keys, fill.key, fill.scope)
        groups = self.keys.generation_groups(fill.scope) if fill.generation else [[]]
        await asyncio.gather(
            *(
                client.eval(KEEP_GENERATIONS, len(group), *group, ttl_ms + grace_ms)
                for group in groups[1:]
            )
        )

        async def index(kept_alive: list[str]) -> None:
            # redis-py 8.1 runs a cluster transaction on a client that has not (re)read the slot
            # map on connections it cannot close; reading the map first avoids that (a no-op
            # when it is current).
            await client.initialize()
            pipe = client.pipeline(transaction=True)
            if kept_alive:
                pipe.eval(KEEP_GENERATIONS, len(kept_alive), *kept_alive, ttl_ms + grace_ms)
            for name, member in updates:
                pipe.eval(INDEX_ADD, 1, name, member, ttl_ms, grace_ms)
            await pipe.execute()

        await index(groups[0])
        await client.set(fill.key, fill.value, px=ttl_ms)
        await index([])
        return True

    async def unlink_confirmed(self, generation_key: str, view: SentinelView | None) -> None:
        """``UNLINK``s ``generation_key`` on the primary owning its slot and, where the client's
        slot map lists a replica of that primary, waits on the same connection for one to
        confirm it (``WAIT 1``, :data:`REPLICA_CONFIRM_TIMEOUT_MS`).

        ``CLUSTER SLOTS`` leaves out the replicas the cluster counts as failed, and those that
        have no replication offset yet (a new cluster, before its first write): a map without a
        replica for the slot is read again, at most every :data:`SLOT_MAP_RECHECK_SECONDS`.
        Redirects are followed here, up to :data:`MAX_REDIRECTS`: ``MOVED`` (a failover, the end
        of a resharding) reads the slot map again; ``ASK`` (the key already moved to the node
        importing the slot) sends ``ASKING`` and the commands on one connection of that node,
        which redis-py 8.1's own redirect does not (see ``translation.py``'s
        ``_REDIRECTS_EXHAUSTED``). Unconfirmed, the map is read again too, so that a replica
        the cluster has failed since is not waited for when the invalidation is applied again.

        Raises:
            BackendUnconfirmedError: No replica confirmed the deletion.
            BackendMovingError: The slot kept moving.
        """
        client = self.cluster
        await client.initialize()
        slot = client.keyslot(generation_key)
        node, confirm = await self._slot_owner(slot)
        asking = False
        for _ in range(MAX_REDIRECTS + 1):
            commands: list[tuple[Any, ...]] = [("UNLINK", generation_key)]
            if confirm:
                commands.append(("WAIT", 1, REPLICA_CONFIRM_TIMEOUT_MS))
            if asking:
                commands.insert(0, ("ASKING",))
            replies = await _exchange(node, commands)
            if asking:
                replies = replies[1:]
            unlinked, asking = replies[0], False
            if isinstance(unlinked, redis_errors.MovedError):
                await self._read_slot_map()
                node, confirm = await self._slot_owner(slot)
                continue
            if isinstance(unlinked, redis_errors.AskError):
                node, asking = await self._node_asked(unlinked), True
                confirm = _has_replica(client, node)
                continue
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
            if not confirm or int(replies[1]) >= 1:
                return
            with contextlib.suppress(*REDIS_FAILURES):
                await self._read_slot_map()
            raise BackendUnconfirmedError(
                f"no replica confirmed the invalidation within {REPLICA_CONFIRM_TIMEOUT_MS} ms"
            )
        raise BackendMovingError("the invalidation's slot kept moving while it was applied")

    async def _slot_owner(self, slot: int) -> tuple[ClusterNode, bool]:
        """The primary owning ``slot`` in the client's slot map, and whether the map lists a
        replica of it (read again, at most every :data:`SLOT_MAP_RECHECK_SECONDS`, if not)."""
        nodes = self.cluster.nodes_manager.slots_cache.get(slot) or []
        loop = asyncio.get_running_loop()
        if len(nodes) < 2 and loop.time() - self._slot_map_read_at >= SLOT_MAP_RECHECK_SECONDS:
            await self._read_slot_map()
            nodes = self.cluster.nodes_manager.slots_cache.get(slot) or []
        if not nodes:
            raise redis_errors.SlotNotCoveredError(f"slot {slot} has no node")
        return nodes[0], len(nodes) >= 2

    async def _node_asked(self, asked: redis_errors.AskError) -> ClusterNode:
        """The node an ``ASK`` names (the slot map read again if the client does not know it)."""
        nodes = self.cluster.nodes_manager
        node = nodes.get_node(host=asked.host, port=asked.port)
        if node is None:
            await self._read_slot_map()
            node = nodes.get_node(host=asked.host, port=asked.port)
        if node is None:
            raise BackendMovingError("a slot moves to a node the cluster does not list yet")
        return node

    async def _read_slot_map(self) -> None:
        """Reads the cluster's slot map again (``CLUSTER SLOTS``), replicas included."""
        self._slot_map_read_at = asyncio.get_running_loop().time()
        await self.cluster.nodes_manager.initialize()

    async def drain_leaf(self, leaf: str) -> int:
        # The entries spread over many slots: UNLINK them per slot first, then forget them, so a
        # failure half-way leaves every surviving entry indexed.
        removed = 0
        while keys := await self.cluster.zrange(leaf, 0, DRAIN_PAGE_SIZE - 1):
            removed += int(await self.cluster.unlink(*keys))
            await self.cluster.zrem(leaf, *keys)
        return removed

    @property
    def near_caches(self) -> list[NearCache]:
        return self.reads.near_caches

    def drop_near(self, keys: list[str]) -> None:
        self.reads.drop(keys)

    def flush_near(self, reason: str) -> None:
        self.reads.flush(reason)

    async def ping(self) -> None:
        """Answers when every primary does."""
        await self.cluster.ping(target_nodes=RedisCluster.PRIMARIES)

    def start(self) -> None:
        self.reads.start()

    async def aclose(self) -> None:
        await self.reads.aclose()
        await super().aclose()


_DISCONNECTS_IF_NEEDED = hasattr(ClusterNode, "disconnect_if_needed")


async def _exchange(node: ClusterNode, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Sends ``commands`` at once on one pooled connection of a cluster node; their replies, an
    error reply as its exception (not raised).

    A connection the node closed while it sat in the pool (a restarted node, Redis's idle
    ``timeout``, a NAT that reset it) is given up and the commands sent once more on a new one,
    at once: the client's retry policy for every other command (``connection.py``). Only the
    commands an invalidation sends come here (``ASKING``, ``UNLINK``, ``WAIT``): sent twice,
    they do no harm. A timeout is not retried.
    """
    connection = node.acquire_connection()
    try:
        if _DISCONNECTS_IF_NEEDED:  # redis-py 7.2+: a connection marked for a reconnect
            await node.disconnect_if_needed(connection)
        try:
            return await _send_and_read(connection, commands)
        except redis_errors.ConnectionError:
            await connection.disconnect()  # the next send connects again
            return await _send_and_read(connection, commands)
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        node.release(connection)


async def _send_and_read(connection: Connection, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    await connection.send_packed_command(connection.pack_commands(commands))
    replies: list[Any] = []
    for _command in commands:
        try:
            replies.append(await connection.read_response())
        except redis_errors.ResponseError as exc:
            replies.append(exc)
    return replies


def _has_replica(client: RedisCluster, primary: ClusterNode) -> bool:
    """Whether the client's slot map lists a replica of ``primary``."""
    return any(
        len(nodes) > 1 and nodes[0] is primary
        for nodes in client.nodes_manager.slots_cache.values()
    )
