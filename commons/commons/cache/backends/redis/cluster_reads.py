"""Reads on a Redis Cluster: per primary, a pipelined reader and a near cache of its own.

redis-py's cluster client spends most of a hit's time around each command: finding the slot's
node, checking a connection out of that node's pool and back in, arming a read, parsing. A hit on
a cluster is two commands or more (the entry, then its scope's generations, which live in the
namespace's slot, and each tag's, each in the tag's own slot: one *group* per slot, see
``keyspace.py``), so it paid that each time: a cluster answered 0.27x the hits of one node from
one process (a tagged hit 0.34x of an untagged one). Here each primary gets a
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

The order of the reads is kept (the entry first, then the groups of generations, each on its
slot's primary, at once): an invalidation in between shows as another generation, a miss.

The near cache, per primary
---------------------------
Redis announces the changes of the keys a connection tracks (the generations' prefix, see
``near.py``) on the server that connection is open to, and can only redirect its messages to a
connection on that same server. So each primary gets its own
:class:`~commons.cache.backends.redis.near.NearCache` (its subscribed connection, its sessions),
with ``1/n`` of the configured bounds for ``n`` primaries. An entry is kept by its slot's primary's
near cache, each group of its generations by its slot's primary's (the scope's: the namespace's
slot; a tag's: the tag's), and the entry is answered only while every one of those near caches
holds the generations it was read with: whatever drops one of them (a message, a lost or silent
connection on that other primary) makes the entry miss. A hit is answered only while each of those
primaries' sessions is confirmed too. A ``MOVED`` or ``ASK`` from a primary
empties its near cache (reason ``moved``): it no longer serves a slot it may hold keys of. A
generation's slot migrated away deletes it on the old owner, which announces it like any deletion
(an entry's slot migrated away leaves the entry right: it is still checked against its generations);
a primary demoted by a failover keeps announcing what the replication stream changes, and an
invalidation is confirmed by a replica before it returns (``WAIT``), so its message is on its way
when it does.
"""

from __future__ import annotations

import asyncio
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
    """A read under way whose result the near caches may keep (see :meth:`ClusterReads.begin`):
    for each of its commands (the entry's, then each group's), the primary it goes to, that
    primary's near cache and the ticket the read holds there."""

    primaries: tuple[_Primary, ...]
    nears: tuple[NearCache, ...]
    tickets: tuple[ReadTicket, ...]
    #: The entry's generations, group after group.
    generation_keys: tuple[str, ...]


class _Route(NamedTuple):
    """Where a read of one key goes: its commands encoded (the entry's ``MGET``, then one per
    group of generations), their slots, and the primaries the slot map named for them when the
    route was last resolved."""

    #: The scope's tags the groups were worked out for.
    tags: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]
    generation_keys: tuple[str, ...]
    slots: tuple[int, ...]
    commands: tuple[bytes, ...]
    owners: tuple[ClusterNode | None, ...] = ()
    #: Per command, the primary it goes to; empty unless each slot has one here.
    primaries: tuple[_Primary, ...] = ()
    #: Per command, its primary's near cache; empty unless each of them has one.
    nears: tuple[NearCache, ...] = ()
    #: For each generation key, its group's primary's near cache (empty as ``nears``).
    generations_from: tuple[NearCache, ...] = ()


class ClusterRead(NamedTuple):
    """The replies of one read and, per command (the entry's, then each group's), the tracking
    session its reply came in (``None``: untracked)."""

    replies: list[bytes | None]
    sessions: tuple[int | None, ...]
    #: The entry's time to live, when the read asked for it in the entry's round trip.
    told: ToldExpiry | None = None


def _resolved(route: _Route, slots: dict[int, list[ClusterNode]]) -> bool:
    """Whether ``route`` was resolved for the primaries the slot map ``slots`` names now (and
    found a primary for each)."""
    if not route.primaries:
        return False
    for index, slot in enumerate(route.slots):
        owners = slots.get(slot)
        if (owners[0] if owners else None) is not route.owners[index]:
            return False
    return True


class ClusterReads:
    """Pipelined reads, and near caches, on the primaries of ``client``'s cluster.

    Args:
        client: The cluster client whose slot map routes the reads.
        generation_groups: The keys of the generations an entry of a scope depends on, one
            group per slot (``Keyspace.generation_groups``).
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
        generation_groups: Callable[[CacheScope], list[list[str]]],
        *,
        timeout: float,
        max_pending: int,
        near_cache: NearCache | None = None,
        tracked_prefixes: tuple[str, ...] = (),
    ) -> None:
        self._client = client
        self._tracked_prefixes = tracked_prefixes
        self._generation_groups = generation_groups
        self._timeout = timeout
        self._max_pending = max_pending
        self._near_cache = near_cache
        #: By node name (``host:port``); a node's reader lives as long as the store.
        self._primaries: dict[str, _Primary] = {}
        self._routes = BoundedMemo[str, _Route](16_384, 16 * 1024 * 1024, admit_seen_twice=True)
        self._closed = False

    @property
    def near_caches(self) -> list[NearCache]:
        """The primaries' near caches opened so far."""
        return [primary.near for primary in self._primaries.values() if primary.near is not None]

    # -- the hit path --------------------------------------------------------------------------

    def held(self, key: str, scope: CacheScope, expected: bytes | None = None) -> StoredRead | None:
        """The read of ``key`` as the cluster would answer it now, if the near caches hold it.

        Along the primaries its last read went to, without asking the slot map again: what a
        primary's near cache holds stays tracked by that primary wherever the slot went since
        (a migrated key is deleted there and announced; a demoted primary applies its
        successor's writes), and whatever ends its session empties it.
        """
        route = self._routes.get(key)
        if route is None or not route.nears or route.tags != scope.tags:
            return None
        return route.nears[0].get(key, scope.namespace, route.generations_from, expected)

    def begin(self, key: str, scope: CacheScope) -> ClusterReadPlan | None:
        """Registers a read about to be sent with the near caches of its primaries; ``None``
        when nothing could be kept (no near cache, no confirmed session, an unknown slot, an entry
        it would not admit now)."""
        route = self._route(key, scope)
        nears = route.nears
        if not nears or not nears[0].admits(key):
            return None
        tickets: list[ReadTicket] = []
        for near, keys in zip(nears, ((key,), *route.groups), strict=True):
            near.start()
            ticket = near.begin(list(keys))
            if ticket is None:
                for began, ticket_of in zip(nears, tickets, strict=False):
                    began.end(ticket_of)
                return None
            tickets.append(ticket)
        return ClusterReadPlan(route.primaries, nears, tuple(tickets), route.generation_keys)

    def start(self) -> None:
        """Opens every known primary's near cache (in the background), so that the first reads
        can be kept."""
        for node in self._client.get_primaries():
            primary = self._primary_of(node)
            if primary is not None and primary.near is not None:
                primary.near.start()

    def keep(self, plan: ClusterReadPlan, read: ClusterRead, stored: StoredRead, at: float) -> bool:
        """Keeps what the read of ``plan`` found (``stored``, expiring ``at``), if every near
        cache still knows it to be current: each group's generations by its own, then the entry
        by its own; whether it did."""
        if stored.value is None or stored.generation is None:
            return False
        values = stored.generation.split(b".")
        held: tuple[bytes, ...] = ()
        groups = zip(plan.nears[1:], plan.tickets[1:], read.sessions[1:], strict=True)
        for near, ticket, session in groups:
            count = len(ticket.keys)
            group = near.hold_generations(ticket, session, values[len(held) : len(held) + count])
            if group is None:
                return False
            held += group
        return len(held) == len(values) and plan.nears[0].keep_entry(
            plan.tickets[0], read.sessions[0], stored, at, plan.generation_keys, held
        )

    def end(self, plan: ClusterReadPlan) -> None:
        """The read of ``plan`` is over (kept or not)."""
        for near, ticket in zip(plan.nears, plan.tickets, strict=True):
            near.end(ticket)

    # -- reading -------------------------------------------------------------------------------

    async def read(
        self,
        key: str,
        scope: CacheScope,
        plan: ClusterReadPlan | None = None,
        *,
        with_ttl: bool = False,
    ) -> ClusterRead | None:
        """The entry under ``key``, then its ``scope``'s groups of generations at once, read on
        their slots' primaries (``plan``'s, when the near caches wait for them); ``None`` when
        the slot map cannot route them here (the caller then reads through redis-py).
        ``with_ttl``: the entry's ``PTTL`` goes in the entry's round trip
        (:meth:`PipelinedReader.mget_with_ttl`).

        Raises:
            redis.exceptions.RedisError: A timeout, or an error reply that is not about routing.
        """
        route = self._route(key, scope)
        primaries = plan.primaries if plan is not None else route.primaries
        if not primaries:
            return None
        entry = primaries[0]
        tracked = plan is not None
        told = None
        try:
            if with_ttl:
                sent_at = time.monotonic()
                ttl_command = encode_command(b"PTTL", [key])
                value, entry_session, ttl_ms = await self._ask_with_ttl(
                    entry, route.commands[0], ttl_command
                )
                told = ToldExpiry(sent_at, ttl_ms)
            else:
                value, entry_session = await self._ask(entry, route.commands[0], 1, tracked)
            if len(route.groups) == 1:  # untagged: no task of its own
                values, session = await self._ask(
                    primaries[1], route.commands[1], len(route.groups[0]), tracked
                )
                return ClusterRead([value[0], *values], (entry_session, session), told)
            answers = await asyncio.gather(
                *(
                    self._ask(primary, command, len(keys), tracked)
                    for primary, command, keys in zip(
                        primaries[1:], route.commands[1:], route.groups, strict=True
                    )
                )
            )
        except _Rerouted:
            return None
        replies = [value[0]]
        for values, _ in answers:
            replies += values
        return ClusterRead(replies, (entry_session, *(each for _, each in answers)), told)

    def _route(self, key: str, scope: CacheScope) -> _Route:
        """Where the reads of ``key`` go and what they send, worked out once per key and tags (a
        key's text names its scope, the tags come with it, so its generations' keys are a
        function of both) and resolved again whenever the slot map names other primaries for
        it."""
        known = self._routes.get(key)
        if known is None or known.tags != scope.tags:
            keyslot = self._client.keyslot
            groups = tuple(tuple(group) for group in self._generation_groups(scope))
            known = _Route(
                scope.tags,
                groups,
                tuple(generation_key for group in groups for generation_key in group),
                (keyslot(key), *(keyslot(group[0]) for group in groups)),
                tuple(encode_command(b"MGET", list(keys)) for keys in ((key,), *groups)),
            )
        slots = self._client.nodes_manager.slots_cache
        if not _resolved(known, slots):
            owners_now = tuple(
                owners[0] if (owners := slots.get(slot)) else None for slot in known.slots
            )
            found = [self._primary_of(owner) for owner in owners_now]
            primaries = tuple(primary for primary in found if primary is not None)
            if len(primaries) != len(found):
                primaries = ()
            nears = tuple(primary.near for primary in primaries if primary.near is not None)
            if len(nears) != len(primaries):
                nears = ()
            known = known._replace(
                owners=owners_now,
                primaries=primaries,
                nears=nears,
                generations_from=tuple(
                    near for near, group in zip(nears[1:], known.groups, strict=True) for _ in group
                )
                if nears
                else (),
            )
            self._routes.put(key, known, 2 * sum(map(len, known.commands)) + 256)
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
