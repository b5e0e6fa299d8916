"""What differs between Redis topologies, behind the store: one object per topology.

:class:`~commons.cache.backends.redis.store.RedisStore` keeps the store contract, the keys, the
expiry memo and the order of an invalidation's steps; it hands what differs between one server
(``one_server.py``), a master behind Sentinel (``sentinel.py``) and a cluster (``cluster.py``) to
the :class:`Topology` it picked when it was built: how a read reaches Redis, how a fill is written,
how a retired generation is confirmed, how an index leaf is drained, which near cache (if any) is
kept coherent. No code path shared by the three asks which one it runs on.

The base class is a server reached through redis-py's own client path (``MGET``, an
``EVALSHA`` for a fill): what a one-server store does until its first contact has ruled a cluster
out, and what a master behind Sentinel does on every read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

from commons.cache.backends.base import StoredRead
from commons.cache.backends.redis.connection import RedisClient
from commons.cache.backends.redis.expiry import ExpiryMemo, ToldExpiry
from commons.cache.backends.redis.index import DRAIN_PAGE_SIZE, index_updates
from commons.cache.backends.redis.near import NearCache
from commons.cache.backends.redis.scripts import Scripts
from commons.cache.backends.redis.sentinel_master import SentinelView
from commons.cache.backends.redis.translation import REDIS_FAILURES, translate
from commons.cache.keyspace import Keyspace
from commons.cache.scope import CacheScope

__all__ = [
    "PIPELINED_READS_MAX_PENDING",
    "REPLICA_CONFIRM_TIMEOUT_MS",
    "Fill",
    "Topology",
    "command_budget",
]

#: GETs that may wait on the pipelined read connection at once; past that a read is a miss.
PIPELINED_READS_MAX_PENDING = 4096
#: Behind Sentinel and on a cluster, how long an invalidation waits (``WAIT 1 <ms>``) for a replica
#: to confirm it.
#: Unconfirmed, it is kept and applied again, as during an outage (see
#: :meth:`~commons.cache.backends.redis.store.RedisStore._retire`).
REPLICA_CONFIRM_TIMEOUT_MS = 100


def command_budget(connection_options: dict[str, Any]) -> float:
    """A command's time budget (the socket timeout) from a client's connection options."""
    return float(connection_options.get("socket_timeout") or 5.0)


class Fill(NamedTuple):
    """One write: the entry, its life, its scope and, for a fill, the generations its read saw
    (``None``: an unconditional write); ``grace_ms`` is how long index members outlive it."""

    key: str
    value: bytes
    ttl_ms: int
    scope: CacheScope
    generation: bytes | None
    grace_ms: int


def fill_script_arguments(names: Keyspace, fill: Fill) -> tuple[list[str], list[bytes | int | str]]:
    """:data:`FILL`'s keys and arguments for ``fill``."""
    updates = index_updates(names, fill.key, fill.scope)
    generation_keys = names.generation_keys(fill.scope)
    keys = [fill.key, *generation_keys, *(index for index, _ in updates)]
    args: list[bytes | int | str] = [
        fill.value,
        fill.ttl_ms,
        fill.generation or b"",
        fill.grace_ms,
        len(generation_keys),
        *(member for _, member in updates),
    ]
    return keys, args


class Topology:
    """A server reached through redis-py's client; each topology overrides what it does its way."""

    #: Whether the entries spread over the slots of a Redis Cluster.
    is_cluster = False

    def __init__(
        self, client: RedisClient, names: Keyspace, expiries: ExpiryMemo, command_timeout: float
    ) -> None:
        self.client = client
        self.keys = names
        self.expiries = expiries
        #: A command's time budget: how long an invalidation waits for a pooled connection.
        self.command_timeout = command_timeout
        self.scripts = Scripts(client)

    @property
    def near_cache(self) -> NearCache | None:
        """The near cache this topology keeps coherent in one piece, if any."""
        return None

    @property
    def near_caches(self) -> list[NearCache]:
        """Every near cache this topology keeps (a cluster: one per primary opened so far)."""
        near = self.near_cache
        return [] if near is None else [near]

    def generation_groups(self, scope: CacheScope) -> list[list[str]]:
        """The scope's generation keys in the groups one command may read or make together
        (one server: all of them at once)."""
        return [self.keys.generation_keys(scope)]

    def read_keys(self, key: str, scope: CacheScope) -> list[str]:
        """What a read asks for: the entry, then its scope's generations."""
        return [key, *self.keys.generation_keys(scope)]

    # -- reads ---------------------------------------------------------------------------------

    def held(self, key: str, scope: CacheScope, expected: bytes) -> StoredRead | None:
        """What the near cache answers for ``key`` as ``expected`` (``CacheStore.held``); none
        without a near cache."""
        return None

    async def read(self, key: str, scope: CacheScope) -> StoredRead:
        """The entry and its scope's generations, in one ``MGET`` through redis-py."""
        try:
            # decode_responses is off: replies are bytes.
            replies = cast(list[bytes | None], await self.client.mget(self.read_keys(key, scope)))
            read, _ = await self.stored_read(key, replies)
            return read
        except REDIS_FAILURES as exc:
            raise translate(exc) from exc

    async def stored_read(
        self, key: str, replies: Sequence[bytes | None], told: ToldExpiry | None = None
    ) -> tuple[StoredRead, float | None]:
        """What a read's replies (the entry's value, then its generations') say, and when the
        value expires (``None``: no value, or about to expire); ``told``: the entry's time to
        live as the read asked for it in the same round trip, if it did."""
        value = replies[0]
        generations = replies[1:]
        generation = None if None in generations else b".".join(generations)  # type: ignore[arg-type]
        if value is None:
            self.expiries.forget(key)
            return StoredRead(0, None, generation), None
        if told is not None and told.ttl_ms > 0:
            # Asked because no expiry was remembered (a cold key): told now, and as trusted.
            self.expiries.remember(key, value, told.ttl_ms / 1000, measured_at=told.sent_at)
            expires_at: float | None = told.sent_at + told.ttl_ms / 1000
        else:
            expires_at = self.expiries.expires_at(key, value)
        if expires_at is None:
            # First sight of these bytes (or near their expiry): one more round trip. Its clock
            # starts when it is sent: a late reply must not lengthen the entry's life.
            sent_at = time.monotonic()
            ttl_ms = await self.client.pttl(key)
            if ttl_ms <= 0:
                return StoredRead(0, value, generation), None
            self.expiries.remember(key, value, ttl_ms / 1000, measured_at=sent_at)
            expires_at = sent_at + ttl_ms / 1000
        return StoredRead(math.ceil(expires_at - time.monotonic()), value, generation), expires_at

    # -- writes --------------------------------------------------------------------------------

    async def write(self, fill: Fill) -> bool:
        """The fill and its index updates: one ``EVALSHA`` (:data:`FILL`), loaded again if the
        server lost it (a restart, ``SCRIPT FLUSH``). Errors untranslated: the store translates
        them."""
        keys, args = fill_script_arguments(self.keys, fill)
        return bool(await self.scripts.fill(keys=keys, args=args))

    # -- invalidation --------------------------------------------------------------------------

    async def follow_master(self) -> SentinelView | None:
        """Before an invalidation: the Sentinels' answer (``None`` off Sentinel)."""
        return None

    async def unlink_confirmed(self, generation_key: str, view: SentinelView | None) -> None:
        """``UNLINK``s a retired generation, confirmed where a replica could lose it (one
        server: one ``UNLINK``, no wait). Errors untranslated: the store translates them."""
        await self.client.unlink(generation_key)

    async def drain_leaf(self, leaf: str) -> int:
        """Removes a leaf's entries and members, a page at a time, each page atomically."""
        removed, remaining = 0, 1
        while remaining:
            unlinked, remaining = await self.scripts.drain_page(keys=[leaf], args=[DRAIN_PAGE_SIZE])
            removed += int(unlinked)
        return removed

    # -- near cache and connection -------------------------------------------------------------

    def drop_near(self, keys: list[str]) -> None:
        """Forgets ``keys`` in this process' near cache(s), if any."""

    def flush_near(self, reason: str) -> None:
        """Empties this process' near cache(s), if any."""

    async def ping(self) -> None:
        """Answers when Redis does (errors untranslated)."""
        await self.client.ping()

    def start(self) -> None:
        """After a first answer: subscribes the near cache(s), so that the first reads are kept."""

    async def aclose(self) -> None:
        """Closes the client and every connection of its own (errors untranslated)."""
        await self.client.aclose()
