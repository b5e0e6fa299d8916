"""Reads on a Redis Cluster: per primary, a pipelined reader and a near cache of its own.

redis-py's cluster client spends most of a hit's time around each command: finding the slot's
node, checking a connection out of that node's pool and back in, arming a read, parsing. A hit on
a cluster is two commands (the entry, then its scope's generations, which live in the
namespace's slot), so it paid that twice: a cluster answered 0.27x the hits of one node from one
process. Here each primary gets a
:class:`~commons.cache.backends.redis.pipelined_reads.PipelinedReader` of its own, opened with
the node's connection settings, and a read goes to the primary that redis-py's slot map names for
its key.

Why a read cannot be answered by the wrong server: the readers never send ``READONLY``, so a
server that does not own a key's slot (a primary the slot moved away from, a primary demoted to
replica) answers ``MOVED`` or ``ASK`` instead of a value. Such a reply, a slot the map does not
cover, ``TRYAGAIN``, ``CLUSTERDOWN`` or a connection that cannot be opened sends that read down
redis-py's own path (:meth:`ClusterReads.read` returns ``None``), which follows the redirect,
refreshes the slot map and retries as it always has. A timeout is not retried there: it is an
outage, as on one server, and the caller's breaker counts it.

The order of the two reads is kept (the entry first, then the generations): an invalidation in
between shows as another generation, a miss.

The near cache, per primary
---------------------------
Redis announces the changes of the keys a connection tracks (the generations' prefix, see
``near.py``) on the server that connection is open to, and can only redirect its messages to a
connection on that same server. So each primary gets its own
:class:`~commons.cache.backends.redis.near.NearCache` (its subscribed connection, its sessions),
with ``1/n`` of the configured bounds for ``n`` primaries. An entry is kept by its slot's primary's
near cache, its generations by their namespace slot's primary's, and the entry is answered only
while that near cache holds the generations it was read with: whatever drops one of them (a message,
a lost or silent connection on that other primary) makes the entry miss. A hit is answered only
while the generations' primary's session is confirmed too. A ``MOVED`` or ``ASK`` from a primary
empties its near cache (reason ``moved``): it no longer serves a slot it may hold keys of. A
generation's slot migrated away deletes it on the old owner, which announces it like any deletion
(an entry's slot migrated away leaves the entry right: it is still checked against its generations);
a primary demoted by a failover keeps announcing what the replication stream changes, and an
invalidation is confirmed by a replica before it returns (``WAIT``), so its message is on its way
when it does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster

from commons.cache.backends.base import StoredRead
from commons.cache.backends.redis.expiry import ToldExpiry
from commons.cache.backends.redis.near import FlushReason, NearCache, ReadTicket
from commons.cache.backends.redis.pipelined_reads import PipelinedReader
from commons.cache.backends.redis.read_channel import connection_opener, encode_command
from commons.cache.memo import BoundedMemo
from commons.cache.scope import CacheScope

__all__ = ["ClusterRead", "ClusterReadPlan", "ClusterReads"]

#: Error replies that say the slot is served elsewhere or not at all right now.
_ROUTING_REPLIES = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")
#: Of those, the ones that say this primary no longer serves the slot.
_MOVED_REPLIES = ("MOVED", "ASK")


@dataclass(slots=True)
class _Primary:
    """What this process keeps per primary: its reader, and its near cache (or ``None``)."""

    reader: PipelinedReader
    near: NearCache | None


class ClusterReadPlan(NamedTuple):
    """A read under way whose result the near caches may keep (see :meth:`ClusterReads.begin`)."""

    entry_primary: _Primary
    entry_near: NearCache
    entry_ticket: ReadTicket
    generations_primary: _Primary
    generations_near: NearCache
    generations_ticket: ReadTicket


class _Route(NamedTuple):
    """Where a read of one key goes: its two commands encoded, their slots, and the primaries
    the slot map named for them when the route was last resolved."""

    generation_keys: list[str]
    entry_slot: int
    generations_slot: int
    entry_command: bytes
    generations_command: bytes
    entry_owner: ClusterNode | None = None
    entry_primary: _Primary | None = None
    generations_owner: ClusterNode | None = None
    generations_primary: _Primary | None = None
    #: The two primaries' near caches (``None`` without).
    entry_near: NearCache | None = None
    generations_near: NearCache | None = None


class ClusterRead(NamedTuple):
    """The replies of one read and the tracking sessions they came in (``None``: untracked)."""

    replies: list[bytes | None]
    entry_session: int | None
    generations_session: int | None
    #: The entry's time to live, when the read asked for it in the entry's round trip.
    told: ToldExpiry | None = None


class ClusterReads:
    """Pipelined reads, and near caches, on the primaries of ``client``'s cluster.

    Args:
        client: The cluster client whose slot map routes the reads.
        generation_keys: The keys of the generations an entry of a scope depends on.
        timeout: Seconds a read waits for its reply.
        max_pending: Reads that may wait on one primary at once.
        near_cache: The configured near cache, whose events and bounds the primaries' near
            caches share (``None``: reads are not kept).
        tracked_prefixes: The prefixes of the keys whose changes the near caches hear of (the
            generation keys', see ``near.py``).
    """

    def __init__(
        self,
        client: RedisCluster,
        generation_keys: Callable[[CacheScope], list[str]],
        *,
        timeout: float,
        max_pending: int,
        near_cache: NearCache | None = None,
        tracked_prefixes: tuple[str, ...] = (),
    ) -> None:
        self._client = client
        self._tracked_prefixes = tracked_prefixes
        self._generation_keys = generation_keys
        self._timeout = timeout
        self._max_pending = max_pending
        self._near_cache = near_cache
        #: By node name (``host:port``); a node's reader lives as long as the store.
        self._primaries: dict[str, _Primary] = {}
        self._routes = BoundedMemo[str, _Route](16_384, 16 * 1024 * 1024)
        self._closed = False

    @property
    def near_caches(self) -> list[NearCache]:
        """The primaries' near caches opened so far."""
        return [primary.near for primary in self._primaries.values() if primary.near is not None]

    # -- the hit path --------------------------------------------------------------------------

    def held(self, key: str, scope: CacheScope) -> StoredRead | None:
        """The read of ``key`` as the cluster would answer it now, if the near caches hold it.

        Along the primaries its last read went to, without asking the slot map again: what a
        primary's near cache holds stays tracked by that primary wherever the slot went since
        (a migrated key is deleted there and announced; a demoted primary applies its
        successor's writes), and whatever ends its session empties it.
        """
        route = self._routes.get(key)
        if route is None or route.entry_near is None or route.generations_near is None:
            return None
        return route.entry_near.get(key, scope.namespace, route.generations_near)

    def begin(self, key: str, scope: CacheScope) -> ClusterReadPlan | None:
        """Registers a read about to be sent with both near caches; ``None`` when nothing could
        be kept (no near cache, no confirmed session, an unknown slot)."""
        route = self._route(key, scope)
        entry, generations = route.entry_primary, route.generations_primary
        if entry is None or generations is None:
            return None
        entry_near, generations_near = entry.near, generations.near
        if entry_near is None or generations_near is None:
            return None
        entry_near.start()
        generations_near.start()
        entry_ticket = entry_near.begin([key])
        if entry_ticket is None:
            return None
        generations_ticket = generations_near.begin(route.generation_keys)
        if generations_ticket is None:
            entry_near.end(entry_ticket)
            return None
        return ClusterReadPlan(
            entry, entry_near, entry_ticket, generations, generations_near, generations_ticket
        )

    def start(self) -> None:
        """Opens every known primary's near cache (in the background), so that the first reads
        can be kept."""
        for node in self._client.get_primaries():
            primary = self._primary_of(node)
            if primary is not None and primary.near is not None:
                primary.near.start()

    def keep(self, plan: ClusterReadPlan, read: ClusterRead, stored: StoredRead, at: float) -> None:
        """Keeps what the read of ``plan`` found (``stored``, expiring ``at``), if both near
        caches still know it to be current."""
        if stored.value is None or stored.generation is None:
            return
        held = plan.generations_near.hold_generations(
            plan.generations_ticket, read.generations_session, stored.generation
        )
        if held is not None:
            plan.entry_near.keep_entry(
                plan.entry_ticket,
                read.entry_session,
                stored,
                at,
                plan.generations_ticket.keys,
                held,
            )

    def end(self, plan: ClusterReadPlan) -> None:
        """The read of ``plan`` is over (kept or not)."""
        plan.entry_near.end(plan.entry_ticket)
        plan.generations_near.end(plan.generations_ticket)

    # -- reading -------------------------------------------------------------------------------

    async def read(
        self,
        key: str,
        scope: CacheScope,
        plan: ClusterReadPlan | None = None,
        *,
        with_ttl: bool = False,
    ) -> ClusterRead | None:
        """The entry under ``key``, then its ``scope``'s generations, read on their slots'
        primaries (``plan``'s, when the near caches wait for them); ``None`` when the slot map
        cannot route them here (the caller then reads through redis-py). ``with_ttl``: the
        entry's ``PTTL`` goes in the entry's round trip (:meth:`PipelinedReader.mget_with_ttl`).

        Raises:
            redis.exceptions.RedisError: A timeout, or an error reply that is not about routing.
        """
        route = self._route(key, scope)
        if plan is not None:
            entry, generations = plan.entry_primary, plan.generations_primary
        else:
            found_entry, found_generations = route.entry_primary, route.generations_primary
            if found_entry is None or found_generations is None:
                return None
            entry, generations = found_entry, found_generations
        tracked = plan is not None
        told = None
        try:
            if with_ttl:
                sent_at = time.monotonic()
                ttl_command = encode_command(b"PTTL", [key])
                value, entry_session, ttl_ms = await self._ask_with_ttl(
                    entry, route.entry_command, ttl_command
                )
                told = ToldExpiry(sent_at, ttl_ms)
            else:
                value, entry_session = await self._ask(entry, route.entry_command, 1, tracked)
            values, generations_session = await self._ask(
                generations, route.generations_command, len(route.generation_keys), tracked
            )
        except _Rerouted:
            return None
        return ClusterRead([value[0], *values], entry_session, generations_session, told)

    def _route(self, key: str, scope: CacheScope) -> _Route:
        """Where the reads of ``key`` go and what they send, worked out once per key (a key's
        text names its scope, so its generations' keys are a function of it) and resolved
        again whenever the slot map names other primaries for it."""
        known = self._routes.get(key)
        if known is None:
            keyslot = self._client.keyslot
            generation_keys = self._generation_keys(scope)
            known = _Route(
                generation_keys,
                keyslot(key),
                keyslot(generation_keys[0]),
                encode_command(b"MGET", [key]),
                encode_command(b"MGET", generation_keys),
            )
        slots = self._client.nodes_manager.slots_cache
        entry_owners = slots.get(known.entry_slot)
        generations_owners = slots.get(known.generations_slot)
        entry_owner = entry_owners[0] if entry_owners else None
        generations_owner = generations_owners[0] if generations_owners else None
        if (
            entry_owner is not known.entry_owner
            or generations_owner is not known.generations_owner
            or known.entry_primary is None
        ):
            entry_primary = self._primary_of(entry_owner)
            generations_primary = self._primary_of(generations_owner)
            known = known._replace(
                entry_owner=entry_owner,
                entry_primary=entry_primary,
                generations_owner=generations_owner,
                generations_primary=generations_primary,
                entry_near=entry_primary.near if entry_primary is not None else None,
                generations_near=(
                    generations_primary.near if generations_primary is not None else None
                ),
            )
            size = 2 * (len(known.entry_command) + len(known.generations_command)) + 256
            self._routes.put(key, known, size)
        return known

    async def _ask(
        self, primary: _Primary, command: bytes, count: int, tracked: bool
    ) -> tuple[list[bytes | None], int | None]:
        """One command's values (and tracking session) from ``primary``'s reader.

        Raises:
            _Rerouted: The read belongs to redis-py's path (see the module doc).
        """
        # Both are MGETs (of one key for the entry), answered as a list of values.
        try:
            if tracked:
                return await primary.reader.mget_tracked(command, count)
            return await primary.reader.mget_encoded(command, count), None
        except redis_errors.RedisError as exc:
            if self._belongs_elsewhere(primary, exc):
                raise _Rerouted from exc
            raise

    async def _ask_with_ttl(
        self, primary: _Primary, command: bytes, ttl_command: bytes
    ) -> tuple[list[bytes | None], int | None, int]:
        """:meth:`_ask` of the entry's ``MGET``, with its ``PTTL`` in the same round trip."""
        try:
            values, ttl_ms, session = await primary.reader.mget_with_ttl(command, 1, ttl_command)
        except redis_errors.RedisError as exc:
            if self._belongs_elsewhere(primary, exc):
                raise _Rerouted from exc
            raise
        return values, session, ttl_ms

    @staticmethod
    def _belongs_elsewhere(primary: _Primary, exc: redis_errors.RedisError) -> bool:
        """Whether the read that failed with ``exc`` belongs to redis-py's path (see the module
        doc); a timeout does not: it is an outage, as on one server."""
        if isinstance(exc, redis_errors.TimeoutError):
            return False
        if isinstance(exc, redis_errors.ConnectionError):
            return True  # a node that cannot be reached may have been replaced: redis-py finds out
        if not isinstance(exc, redis_errors.ResponseError):
            return False
        message = str(exc)
        if not message.startswith(_ROUTING_REPLIES):
            return False
        if message.startswith(_MOVED_REPLIES) and primary.near is not None:
            primary.near.flush(FlushReason.MOVED)
        return True

    def _primary_of(self, node: ClusterNode | None) -> _Primary | None:
        """The reader (and near cache) of ``node``, opened on first use; ``None`` for no node
        (a slot the map does not cover)."""
        if node is None:
            return None
        primary = self._primaries.get(node.name)
        if primary is not None or self._closed:
            return primary
        opener = connection_opener(node.connection_class, node.connection_kwargs)
        if opener is None:
            return None
        near = None
        if self._near_cache is not None:
            near = self._near_cache.for_node(max(len(self._client.get_primaries()), 1))
        reader = PipelinedReader(
            opener, timeout=self._timeout, max_pending=self._max_pending, tracking=near
        )
        if near is not None:
            near.tracking.attach(
                opener, reader, timeout=self._timeout, tracked_prefixes=self._tracked_prefixes
            )
        primary = self._primaries[node.name] = _Primary(reader, near)
        return primary

    # -- this process's own changes ------------------------------------------------------------

    def drop(self, keys: list[str]) -> None:
        """Forgets ``keys`` in every primary's near cache (their slots may have moved)."""
        for near in self.near_caches:
            near.drop(keys)

    def flush(self, reason: str) -> None:
        """Empties every primary's near cache."""
        for near in self.near_caches:
            near.flush(reason)

    async def aclose(self) -> None:
        """Closes every reader and near cache; later reads go through redis-py."""
        self._closed = True
        primaries, self._primaries = self._primaries, {}
        for primary in primaries.values():
            if primary.near is not None:
                await primary.near.aclose()
            await primary.reader.aclose()


class _Rerouted(Exception):
    """A read that redis-py's routed path must answer instead."""
