"""The Redis store, and the index that makes invalidation cheap.

Entries live under their exact keys (``{prefix}:{namespace}:tenant_...``). Beside them, every write
records its key in a sorted set, the *leaf index* of its scope, scored by the entry's expiry (server
time, ms). Leaves are found through two small registries, so an invalidation walks only the indexes
of the scope it targets (``keyspace.py`` names them all)::

    {prefix}:#reg:{ns}                   tenant leaves of the namespace (and its unscoped leaf)
    {prefix}:#reg:{ns}:t:{tenant}        user leaves of one tenant
    {prefix}:#idx:{ns}:t:{tenant}        tenant-scoped entries        (a leaf)
    {prefix}:#idx:{ns}:t:{tenant}:u:{u}  one user's entries           (a leaf)
    {prefix}:#idx:{ns}:-                 entries without a tenant     (a leaf)

A namespace's registries and leaves share its cluster hash tag, so on Redis Cluster they live in
one slot while its entries, whose keys are exactly as the guide gives them, spread over every slot.

On a cluster
------------
Everything above holds on Redis Cluster (:class:`redis.asyncio.cluster.RedisCluster`), with three
differences, because an entry and its indexes live in different slots and so cannot share a
``MULTI``: a write updates the indexes (one ``MULTI`` on the namespace's slot), then stores the
entry, then updates the indexes again, so an invalidation that ran between the first two steps
cannot leave the entry unindexed; an invalidation's ``UNLINK`` is split per slot; ``clear()`` scans
every primary. Reads are single-key. A store built with ``cluster_factory`` decides on its first
contact whether the node it was given is part of a cluster (``HELLO``) and, if so, switches
to the cluster client. Redis replicates asynchronously: a primary that crashes (rather than being
failed over by ``CLUSTER FAILOVER``, which waits for the replica to catch up) may take the last
writes it acknowledged with it, invalidations included. Behind Sentinel an invalidation is
confirmed on a replica (``WAIT``) or kept and applied again (see :meth:`RedisStore._retire`); on a
cluster too, on a replica of the primary owning the generation's slot.

Why this design: fastapi-cache2 clears a namespace with ``KEYS`` inside a Lua script, which blocks
the server for a time that grows with the whole keyspace; ``SCAN`` does not block but still visits
every key. Here invalidation costs O(entries removed): it reads a leaf in pages, ``UNLINK``s each
page and removes exactly those members from the leaf, so an entry written concurrently is either
removed or stays indexed, never orphaned; likewise a registry (walked with ``ZSCAN``) forgets a leaf
only once that leaf is empty. Each index update runs in a one-key Lua script that drops
members expired more than a minute ago and keeps the index's own expiry at its longest-lived entry,
so expired entries leave no garbage behind. The index is written before the entry (in one
``MULTI``), so no entry exists that an invalidation cannot find.

Every redis-py and OS error is translated here, and only here, into the cache's own errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from commons.cache.backends.base import CacheStore, ReplicaLocks, StoredRead
from commons.cache.backends.cluster_reads import ClusterReads
from commons.cache.backends.expiry import ExpiryMemo, ToldExpiry
from commons.cache.backends.near import FlushReason, NearCache, ReadTicket
from commons.cache.backends.pipelined_reads import (
    PipelinedReader,
    channel_opener,
    encode_command,
)
from commons.cache.connection import RedisClient, reports_cluster_mode
from commons.cache.errors import (
    BackendBusyError,
    BackendError,
    BackendMovingError,
    BackendRejectedError,
    BackendUnavailableError,
)
from commons.cache.keyspace import Keyspace
from commons.cache.memo import BoundedMemo
from commons.cache.scope import CacheScope, InvalidationTarget
from commons.cache.sentinel_master import (
    MasterPool,
    SentinelView,
    replica_may_be_promoted,
    reports_master_role,
)

__all__ = ["RedisStore"]

logger = logging.getLogger("commons.cache")

#: Members of an index that expired longer ago than this are pruned (allows for clock skew
#: between the time an entry was written and the server's clock). Also the life of a new
#: generation; every fill extends its scope's generations to outlive the entry by as much.
INDEX_GRACE_MS = 60_000
#: Keys removed per UNLINK while invalidating or flushing: small enough that no command blocks.
BATCH_SIZE = 500
#: Entries removed by one server-side drain step: about a tenth of a millisecond of server time.
DRAIN_PAGE_SIZE = 200
#: Leaves of one registry drained at the same time (each on its own pooled connection). More
#: overlaps more round trips but queues more work ahead of other clients' commands: measured on
#: 2 cores, 8 made other clients wait up to 7 ms, 2 about 3 ms, for 10% more time.
DRAIN_CONCURRENCY = 2
#: GETs that may wait on the pipelined read connection at once; past that a read is a miss.
PIPELINED_READS_MAX_PENDING = 4096
#: How often an invalidation that found every pooled connection in use looks for a free one.
BUSY_POLL_SECONDS = 0.002
#: Behind Sentinel and on a cluster, how long an invalidation waits (``WAIT 1 <ms>``) for a replica
#: to confirm it.
#: Unconfirmed, it is kept and applied again, as during an outage (see :meth:`RedisStore._retire`).
REPLICA_CONFIRM_TIMEOUT_MS = 100
#: On a cluster, how many redirects (``ASK``, ``MOVED``) an invalidation's deletion follows.
MAX_REDIRECTS = 5
#: On a cluster, how often an invalidation may read the slot map again when it lists no replica
#: of the generation's primary (``CLUSTER SLOTS`` omits a replica without a replication offset).
SLOT_MAP_RECHECK_SECONDS = 1.0
#: Behind Sentinel, how often a process asks the Sentinels which server is the master, so that
#: reads and writes leave a demoted master's pooled connections within about this time.
SENTINEL_MASTER_CHECK_SECONDS = 1.0

# A member's score only ever rises: a registry member stands for a whole leaf, so a short-lived
# write must not lower it below the expiry of the leaf's longer-lived entries (the pruning below
# would then unregister a leaf that still holds live entries).
_INDEX_ADD = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl_ms = tonumber(ARGV[2])
local expires_ms = now_ms + ttl_ms
local scored = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not scored or tonumber(scored) < expires_ms then
  redis.call('ZADD', KEYS[1], expires_ms, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - tonumber(ARGV[3]))
local keep_ms = ttl_ms + tonumber(ARGV[3])
local current = redis.call('PTTL', KEYS[1])
if current == -1 or current < keep_ms then
  redis.call('PEXPIRE', KEYS[1], keep_ms)
end
return 1
"""

# Unregisters a drained leaf (KEYS[2]) from its registry (KEYS[1]) unless it, or a registry of its
# own (KEYS[3], a tenant's user leaves), was refilled by a write that raced the invalidation: that
# entry then stays reachable by the next invalidation. All three share the namespace's hash tag.
_UNREGISTER_IF_DRAINED = """
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    return 0
  end
end
return redis.call('ZREM', KEYS[1], KEYS[2])
"""

# One page of a leaf, removed atomically on one server: the entries and their index members go
# together, so no failure can leave an entry that no index knows. Bounded by the page size, so
# the server is busy for well under a millisecond per call. The entry keys are not declared: a
# standalone server allows that, and a cluster takes the per-slot path instead.
_DRAIN_PAGE = """
local keys = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #keys == 0 then
  return {0, 0}
end
local removed = redis.call('UNLINK', unpack(keys))
redis.call('ZREM', KEYS[1], unpack(keys))
return {removed, redis.call('ZCARD', KEYS[1])}
"""

# Lua: keeps the generations KEYS[first..] alive at least `keep_ms` (a retired one is not made
# again). Part of a fill: of _FILL on one server, of _KEEP_GENERATIONS on a cluster.
# A generation that would die before keep_ms is given twice that: re-armed once per keep_ms, not
# by every fill, since Redis announces each PEXPIRE to every process tracking the key (their near
# caches would drop the scope's generations on every miss).
_KEEP_GENERATIONS_ALIVE = """
for i = first, #KEYS do
  local current = redis.call('PTTL', KEYS[i])
  if current >= 0 and current < keep_ms then
    redis.call('PEXPIRE', KEYS[i], 2 * keep_ms)
  end
end
"""

# A fill: the entry is stored only while its scope's generations (KEYS[2..]) are still the ones its
# read saw (ARGV[3], joined with '.'); a missing generation refuses it too. The generations are
# kept alive at least as long as the entry. ARGV[3] empty: an unconditional write.
_FILL = (
    """
local keep_ms = tonumber(ARGV[2]) + tonumber(ARGV[4])
local first = 2
if ARGV[3] ~= '' then
  local seen = {}
  for i = first, #KEYS do
    local value = redis.call('GET', KEYS[i])
    if not value then
      return 0
    end
    seen[#seen + 1] = value
  end
  if table.concat(seen, '.') ~= ARGV[3] then
    return 0
  end
"""
    + _KEEP_GENERATIONS_ALIVE
    + """
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
)

# On a cluster, a fill's part in the namespace's slot (the entry is in another): its scope's
# generations (KEYS) are kept alive at least ARGV[1] ms.
_KEEP_GENERATIONS = (
    """
local keep_ms = tonumber(ARGV[1])
local first = 1
"""
    + _KEEP_GENERATIONS_ALIVE
    + """
return 1
"""
)

# The generations of a scope (KEYS), each created with a random value (ARGV) where missing.
_ENSURE_GENERATIONS = """
local seen = {}
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i], 'NX', 'PX', ARGV[#KEYS + 1])
  seen[i] = redis.call('GET', KEYS[i])
end
return table.concat(seen, '.')
"""

_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


#: Refusals by their error code (NOPERM: see :func:`_permission_text`). redis-py's own message of
#: a failed pipeline command quotes the command's arguments (keys with tenant ids, cached bodies),
#: which must not reach logs or status.
_REFUSALS: tuple[tuple[type[redis_errors.ResponseError], str], ...] = (
    (redis_errors.OutOfMemoryError, "OOM, used memory is above maxmemory"),
    (redis_errors.ReadOnlyError, "READONLY, the server is a read-only replica"),
    (redis_errors.ExecAbortError, "EXECABORT, a transaction was refused"),
)

#: Error replies that are no refusal of the command but an outage: the server cannot serve any
#: command of the slot right now (the cluster lost a shard, a primary is down).
_UNAVAILABLE_REPLIES: tuple[tuple[type[redis_errors.ResponseError], str], ...] = (
    (redis_errors.MasterDownError, "MASTERDOWN, the link with the primary is down"),
    (redis_errors.ClusterDownError, "CLUSTERDOWN, the cluster cannot serve the slot"),
)

#: Replies of a slot that is moving to another node: ``ASK`` and ``MOVED`` (``MovedError`` is an
#: ``AskError``), and ``TRYAGAIN`` (a command whose keys are on both nodes for the moment).
_MOVING_REPLIES = (redis_errors.AskError, redis_errors.TryAgainError)
#: What redis-py's cluster client raises when a command's redirects do not settle. In redis-py
#: 8.1 that happens during every slot migration under load: on ``ASK`` it sends ``ASKING`` on one
#: pooled connection of the importing node and the command on another, which the node then sends
#: back (``MOVED``) to the migrating one, and so on.
_REDIRECTS_EXHAUSTED = "TTL exhausted"

#: The end of a NOPERM message that names the command refused (never its arguments).
_NOPERM_COMMAND = re.compile(r"to run the '([a-z0-9|_-]+)' command( or its subcommand)?$")
#: Redis 6.2 wraps a refusal met inside a script in a generic error ("Error running script ...:
#: -OOM command not allowed ..."); later releases answer with the refusal's own code.
_SCRIPT_REFUSAL = re.compile(r"Error running script.*?-(OOM|READONLY) ")


#: Errors of redis-py's own making, translated only when raised inside redis-py (see
#: :func:`_raised_in_client`): its cluster client can hold a slot map that disagrees with its
#: nodes for a moment (a node failing, a map being read again) and then fails with one of these
#: (``'NoneType' object has no attribute ...``) where a ``RedisError`` was meant; and a command
#: written on a connection that redis-py (or the server) closed meanwhile fails in the transport
#: below it: ``RuntimeError: ... the handler is closed`` under uvloop, ``TypeError`` or
#: ``AttributeError`` in asyncio's own transports on CPython 3.12+.
_CLIENT_FAULTS = (AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError)
_CLIENT_DIR = os.path.dirname(redis_errors.__file__) + os.sep
#: Where the frames below redis-py come from: asyncio (its streams and transports).
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__) + os.sep


def _in_event_loop(filename: str) -> bool:
    """Whether a frame is the event loop's: asyncio's, or uvloop's (whose frames are named after
    its Cython sources, ``uvloop/handles/...``, or after its installed files)."""
    return filename.startswith(_ASYNCIO_DIR) or "uvloop" in filename.split(os.sep)


#: Messages of redis-py's cluster client that name nodes only (never a command's arguments), and
#: the wording of the first one shortened.
_CLUSTER_MESSAGES = (
    "Redis Cluster cannot be connected",
    "All slots are not covered",
    "Cluster mode is not enabled",
)
_NO_NODE_ANSWERED = (
    "Redis Cluster cannot be connected. Please provide at least one reachable node: ",
    "no node answered: ",
)


def _permission_text(exc: BaseException) -> str:
    """What a NOPERM refusal was about: the command, or the keys (never the keys' names)."""
    message = str(exc)
    if (named := _NOPERM_COMMAND.search(message)) is not None:
        return f"NOPERM, the user may not run {named.group(1).upper()}"
    if message.endswith("one of the keys used as arguments"):
        return "NOPERM, the user may not access the cache's keys (its ACL needs ~{prefix}:*)"
    return "NOPERM, the user lacks a permission"


def _refusal_in(exc: BaseException) -> redis_errors.NoPermissionError | None:
    """The permission refusal behind ``exc`` (the cluster client wraps the one it met)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or isinstance(seen, redis_errors.NoPermissionError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _translate_cluster_error(exc: redis_errors.RedisClusterException) -> BackendError:
    """redis-py's cluster client's own exceptions, which do not derive from ``RedisError``: no
    node answers, a slot has no node, a node refused the client's discovery commands."""
    if (refusal := _refusal_in(exc)) is not None:
        return BackendRejectedError(f"Redis refused the command: {_permission_text(refusal)}")
    if isinstance(exc, redis_errors.SlotNotCoveredError):
        return BackendUnavailableError("Redis Cluster unavailable: a slot has no node")
    if isinstance(exc, redis_errors.CrossSlotTransactionError | redis_errors.InvalidPipelineStack):
        return BackendRejectedError(
            f"the cluster client refused the command ({type(exc).__name__})"
        )
    message = str(exc)
    shown = message if message.startswith(_CLUSTER_MESSAGES) else type(exc).__name__
    return BackendUnavailableError(
        f"Redis Cluster unavailable: {shown.replace(*_NO_NODE_ANSWERED)}"
    )


def _is_moving(exc: BaseException) -> bool:
    """Whether ``exc`` says a cluster slot is moving (a resharding), which is no outage."""
    if isinstance(exc, _MOVING_REPLIES):
        return True
    return type(exc) is redis_errors.ClusterError and str(exc).startswith(_REDIRECTS_EXHAUSTED)


def _raised_in_client(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside redis-py: its innermost frame is in the package, or only
    frames of the event loop and its transports (:func:`_in_event_loop`) follow redis-py's."""
    innermost = None
    trace = exc.__traceback__
    while trace is not None:
        filename = trace.tb_frame.f_code.co_filename
        if not _in_event_loop(filename):
            innermost = filename
        trace = trace.tb_next
    return innermost is not None and innermost.startswith(_CLIENT_DIR)


def _translate(exc: BaseException) -> BackendError:
    if isinstance(exc, _CLIENT_FAULTS):
        if not _raised_in_client(exc):
            raise exc  # a mistake of ours: never disguised as an outage
        return BackendUnavailableError(f"the Redis client failed: {type(exc).__name__}")
    if _is_moving(exc):
        return BackendMovingError(f"a Redis Cluster slot is moving ({type(exc).__name__})")
    if isinstance(exc, redis_errors.ResponseError):
        for unavailable, text in _UNAVAILABLE_REPLIES:
            if isinstance(exc, unavailable):
                return BackendUnavailableError(f"Redis cannot serve the command: {text}")
        if isinstance(exc, redis_errors.NoPermissionError):
            return BackendRejectedError(f"Redis refused the command: {_permission_text(exc)}")
        for refusal, text in _REFUSALS:
            if isinstance(exc, refusal):
                return BackendRejectedError(f"Redis refused the command: {text}")
        if (wrapped := _SCRIPT_REFUSAL.search(str(exc))) is not None:
            text = next(text for _, text in _REFUSALS if text.startswith(wrapped.group(1)))
            return BackendRejectedError(f"Redis refused the command: {text}")
        return BackendRejectedError(f"Redis refused the command ({type(exc).__name__})")
    if isinstance(exc, redis_errors.RedisClusterException):
        return _translate_cluster_error(exc)
    if isinstance(exc, (redis_errors.TimeoutError, asyncio.TimeoutError, TimeoutError)):
        return BackendUnavailableError("Redis did not answer in time")
    if isinstance(exc, redis_errors.MaxConnectionsError) or (
        # BlockingConnectionPool's wait for a free connection ran out, or (redis-py before 7)
        # the pool is full: this process is busy.
        isinstance(exc, redis_errors.ConnectionError) and str(exc) in _POOL_FULL_MESSAGES
    ):
        return BackendBusyError("every pooled connection to Redis is in use")
    return BackendUnavailableError(f"Redis unavailable: {type(exc).__name__}: {exc}")


_POOL_FULL_MESSAGES = ("No connection available.", "Too many connections")

#: Everything a client of any topology raises when Redis fails. The cluster client's own
#: exceptions (no node reachable, a slot without a node) do not derive from ``RedisError``.
_REDIS_FAILURES = (
    redis_errors.RedisError,
    redis_errors.RedisClusterException,
    OSError,
    asyncio.TimeoutError,
    *_CLIENT_FAULTS,
)


@asynccontextmanager
async def _redis_errors_translated() -> AsyncIterator[None]:
    """The one seam where lower-layer errors become :class:`BackendError`."""
    try:
        yield
    except _REDIS_FAILURES as exc:
        raise _translate(exc) from exc


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
        self._prefix = prefix
        self._near_cache = near_cache
        self._near: NearCache | None = None
        self._cluster_factory = cluster_factory
        self._expiries = ExpiryMemo()
        self._keys = Keyspace(prefix)
        self._read_commands = BoundedMemo[str, tuple[bytes, int]](16_384, 16 * 1024 * 1024)
        self._closed = False
        self._reads: PipelinedReader | None = None
        self._cluster_reads: ClusterReads | None = None
        self._master_checked_at = 0.0
        self._slot_map_read_at = 0.0
        self._master_check: asyncio.Task[None] | None = None
        self._use(client)

    def _use(self, client: RedisClient) -> None:
        self._client = client
        self._reads = None
        self._cluster_reads = None
        self._near = None
        self._behind_sentinel = self._sentinel_pool() is not None
        options = (
            client.get_connection_kwargs()
            if isinstance(client, RedisCluster)
            else client.connection_pool.connection_kwargs
        )
        #: A command's time budget: how long an invalidation waits for a pooled connection.
        self._command_timeout: float = options.get("socket_timeout") or 5.0
        if isinstance(client, RedisCluster):
            self._cluster_reads = ClusterReads(
                client,
                self.generation_keys,
                timeout=self._command_timeout,
                max_pending=PIPELINED_READS_MAX_PENDING,
                near_cache=self._near_cache,
                tracked_prefixes=self._keys.generation_prefixes(),
            )
        elif isinstance(client, Redis) and (opener := channel_opener(client)) is not None:
            near = self._near_cache
            self._reads = PipelinedReader(
                opener,
                timeout=self._command_timeout,
                max_pending=PIPELINED_READS_MAX_PENDING,
                tracking=near,
            )
            if near is not None:
                near.attach(
                    opener,
                    self._reads,
                    timeout=self._command_timeout,
                    tracked_prefixes=self._keys.generation_prefixes(),
                )
                self._near = near
        self._index_add = client.register_script(_INDEX_ADD)
        self._fill = client.register_script(_FILL)
        self._ensure_generations = client.register_script(_ENSURE_GENERATIONS)
        self._delete_if_equal = client.register_script(_DELETE_IF_EQUAL)
        self._unregister_if_drained = client.register_script(_UNREGISTER_IF_DRAINED)
        self._drain_page = client.register_script(_DRAIN_PAGE)

    @property
    def client(self) -> RedisClient:
        return self._client

    @property
    def keyspace(self) -> Keyspace:
        """The names of this store's helper keys."""
        return self._keys

    @property
    def near_cache(self) -> NearCache | None:
        """The near cache in use on one server, or ``None`` (on a cluster each primary has its
        own, see ``cluster_reads.py``)."""
        return self._near

    @property
    def is_cluster(self) -> bool:
        """Whether the store talks to a Redis Cluster (known after the first :meth:`ping`)."""
        return isinstance(self._client, RedisCluster)

    # -- index names ---------------------------------------------------------------------------

    def generation_keys(self, scope: CacheScope) -> list[str]:
        """The keys holding the generations an entry of ``scope`` depends on, widest first."""
        return self._keys.generation_keys(scope)

    def _read_keys(self, key: str, scope: CacheScope) -> list[str]:
        """What a read asks for: the entry, then its scope's generations."""
        return [key, *self.generation_keys(scope)]

    def _read_command(self, key: str, scope: CacheScope) -> tuple[bytes, int]:
        """The encoded ``MGET`` of :meth:`_read_keys`, encoded once per key (a key's text names
        its scope, so the command is a function of the key)."""
        known = self._read_commands.get(key)
        if known is None:
            keys = self._read_keys(key, scope)
            known = (encode_command(b"MGET", keys), len(keys))
            self._read_commands.put(
                str(key), known, 2 * len(known[0])
            )  # a plain str, see expiry.py
        return known

    def _generation_key_of(self, target: InvalidationTarget) -> str:
        """The one generation an invalidation of ``target`` replaces."""
        return self.generation_keys(CacheScope(target.namespace, target.tenant_id, target.user_id))[
            -1
        ]

    def _index_updates(self, key: str, scope: CacheScope) -> list[tuple[str, str]]:
        """(index, member) pairs recording ``key`` under ``scope``."""
        ns, names = scope.namespace, self._keys
        if scope.tenant_id is None:
            leaf = names.unscoped_leaf(ns)
            return [(names.namespace_registry(ns), leaf), (leaf, key)]
        tenant_leaf = names.tenant_leaf(ns, scope.tenant_id)
        updates = [(names.namespace_registry(ns), tenant_leaf)]
        if scope.user_id is None:
            updates.append((tenant_leaf, key))
        else:
            user_leaf = names.user_leaf(ns, scope.tenant_id, scope.user_id)
            updates.append((names.tenant_registry(ns, scope.tenant_id), user_leaf))
            updates.append((user_leaf, key))
        return updates

    # -- reads ---------------------------------------------------------------------------------

    async def read(self, key: str, scope: CacheScope) -> StoredRead:
        """The entry and its scope's generations, in one round trip (``MGET``) on one server; with
        the near cache, none when it holds them. On a cluster, see :meth:`_read_on_cluster`."""
        cluster = self._cluster_reads
        if cluster is not None:
            if scope.tags:
                # Each tag's generations live in the tag's own slot (see keyspace.py).
                return await self._read_through_client(key, scope)
            held = cluster.held(key, scope)
            if held is not None:
                return held
            return await self._read_on_cluster(cluster, key, scope)
        # Until a first contact has ruled a cluster out, reads take redis-py's routed path.
        reads = self._reads if self._cluster_factory is None else None
        ticket: ReadTicket | None = None
        near = self._near
        if reads is None:
            self._check_sentinel_master()
        elif near is not None:
            held = near.get(key, scope.namespace)
            if held is not None:
                return held
            near.start()
            ticket = near.begin(self._read_keys(key, scope))
        # A hit's path: the seam is spelled out rather than entered as a context manager, which
        # would cost a hit a generator and two awaits.
        try:
            replies, tracked_in, told = await self._read_replies(reads, key, scope, ticket)
            read, expires_at = await self._stored_read(key, replies, told)
            if ticket is not None and near is not None and expires_at is not None:
                near.keep(ticket, tracked_in, read, expires_at)
            return read
        except _REDIS_FAILURES as exc:
            raise _translate(exc) from exc
        finally:
            if ticket is not None and near is not None:
                near.end(ticket)

    async def _read_on_cluster(
        self, cluster: ClusterReads, key: str, scope: CacheScope
    ) -> StoredRead:
        """A read on a cluster that its primaries' near caches do not hold: on the slots'
        primaries' pipelined connections (kept by their near caches), else through redis-py (a
        redirect, an unknown slot)."""
        plan = cluster.begin(key, scope)
        try:
            routed = await cluster.read(key, scope, plan, with_ttl=not self._expiries.knows(key))
            if routed is None:
                return await self._read_through_client(key, scope)
            read, expires_at = await self._stored_read(key, routed.replies, routed.told)
            if plan is not None and expires_at is not None:
                cluster.keep(plan, routed, read, expires_at)
            return read
        except _REDIS_FAILURES as exc:
            raise _translate(exc) from exc
        finally:
            if plan is not None:
                cluster.end(plan)

    async def _read_through_client(self, key: str, scope: CacheScope) -> StoredRead:
        """A read on a cluster through redis-py: the entry, then each slot's group of its
        generations (the scope's own, each tag's) at once."""
        # The entry and its generations live in different slots: the entry first, so an
        # invalidation between the two reads shows as another generation (a miss).
        async with _redis_errors_translated():
            replies = [cast(bytes | None, await self._client.get(key))]
            groups = self._keys.generation_groups(scope)
            for values in await asyncio.gather(*(self._client.mget(group) for group in groups)):
                replies += cast(list[bytes | None], values)
            return (await self._stored_read(key, replies))[0]

    async def _stored_read(
        self, key: str, replies: list[bytes | None], told: ToldExpiry | None = None
    ) -> tuple[StoredRead, float | None]:
        """What a read's replies (the entry's value, then its generations') say, and when the
        value expires (``None``: no value, or about to expire); ``told``: the entry's time to
        live as the read asked for it in the same round trip, if it did."""
        value = replies[0]
        generations = replies[1:]
        generation = None if None in generations else b".".join(generations)  # type: ignore[arg-type]
        if value is None:
            self._expiries.forget(key)
            return StoredRead(0, None, generation), None
        expires_at = self._expiries.expires_at(key, value)
        if expires_at is None and told is not None and told.ttl_ms > 0:
            self._expiries.remember(key, value, told.ttl_ms / 1000, measured_at=told.sent_at)
            expires_at = told.sent_at + told.ttl_ms / 1000
        if expires_at is None:
            # First sight of these bytes (or near their expiry): one more round trip. Its clock
            # starts when it is sent: a late reply must not lengthen the entry's life.
            sent_at = time.monotonic()
            ttl_ms = await self._client.pttl(key)
            if ttl_ms <= 0:
                return StoredRead(0, value, generation), None
            self._expiries.remember(key, value, ttl_ms / 1000, measured_at=sent_at)
            expires_at = sent_at + ttl_ms / 1000
        return StoredRead(math.ceil(expires_at - time.monotonic()), value, generation), expires_at

    async def _read_replies(
        self,
        reads: PipelinedReader | None,
        key: str,
        scope: CacheScope,
        ticket: ReadTicket | None,
    ) -> tuple[list[bytes | None], int | None, ToldExpiry | None]:
        """The entry's and its generations' values, the tracking session of the read (on the
        pipelined reader with a near cache, else ``None``), and on the pipelined reader, when
        no expiry of the entry is remembered, its time to live asked in the same round trip
        (past the expiry memo's bound every hit would otherwise cost a second one)."""
        if reads is not None:
            command, count = self._read_command(key, scope)
            if not self._expiries.knows(key):
                sent_at = time.monotonic()
                values, ttl_ms, session = await reads.mget_with_ttl(
                    command, count, encode_command(b"PTTL", [key])
                )
                return values, session, ToldExpiry(sent_at, ttl_ms)
            if ticket is not None:
                return *(await reads.mget_tracked(command, count)), None
            return await reads.mget_encoded(command, count), None, None
        # decode_responses is off: replies are bytes.
        values = cast(list[bytes | None], await self._client.mget(self._read_keys(key, scope)))
        return values, None, None

    async def generation(self, scope: CacheScope) -> bytes:
        async with _redis_errors_translated():
            if scope.tags and isinstance(self._client, RedisCluster):
                # Each tag's generations are in a slot of their own: one script per slot.
                groups = self._keys.generation_groups(scope)
                made = await asyncio.gather(*(self._ensure(keys) for keys in groups))
                return b".".join(made)
            return await self._ensure(self.generation_keys(scope))

    async def _ensure(self, keys: list[str]) -> bytes:
        """The generations under ``keys`` (one slot), each made where missing."""
        fresh = [secrets.token_hex(8) for _ in keys]
        return cast(bytes, await self._ensure_generations(keys=keys, args=[*fresh, INDEX_GRACE_MS]))

    # -- writes --------------------------------------------------------------------------------

    async def write(
        self,
        key: str,
        value: bytes,
        ttl_seconds: float,
        scope: CacheScope,
        generation: bytes | None = None,
    ) -> bool:
        ttl_ms = int(ttl_seconds * 1000)
        fill_keys = [key, *self.generation_keys(scope)]
        fill_args: list[bytes | int] = [value, ttl_ms, generation or b"", INDEX_GRACE_MS]
        self._check_sentinel_master()
        sent_at = time.monotonic()
        try:
            async with _redis_errors_translated():
                if isinstance(self._client, RedisCluster):
                    # A fill (under a generation) keeps its scope's generations alive.
                    kept_alive = self._keys.generation_groups(scope) if generation else [[]]
                    stored = await self._write_on_cluster(
                        self._client, key, value, ttl_ms, scope, kept_alive
                    )
                else:
                    stored = await self._fill_transaction(key, scope, fill_keys, fill_args)
        finally:
            # Read-your-writes in this process: Redis' invalidation message comes later.
            self._drop_near([key])
        if stored:
            self._expiries.remember(key, value, ttl_seconds, measured_at=sent_at)
        return stored

    async def _fill_transaction(
        self, key: str, scope: CacheScope, fill_keys: list[str], fill_args: list[bytes | int]
    ) -> bool:
        """The fill and its index updates in one transaction, in one round trip: ``EVALSHA``
        of scripts loaded once, and again if the server lost them (a restart, ``SCRIPT
        FLUSH``). redis-py's pipelines would ask ``SCRIPT EXISTS`` before every transaction
        that runs a script: a second round trip on every miss."""
        try:
            return await self._send_fill(key, scope, fill_keys, fill_args)
        except redis_errors.NoScriptError:
            await self._client.script_load(_INDEX_ADD)
            await self._client.script_load(_FILL)
            # The index updates are idempotent: the transaction runs again whole.
            return await self._send_fill(key, scope, fill_keys, fill_args)

    async def _send_fill(
        self, key: str, scope: CacheScope, fill_keys: list[str], fill_args: list[bytes | int]
    ) -> bool:
        ttl_ms = fill_args[1]
        pipe = self._client.pipeline(transaction=True)
        for index, member in self._index_updates(key, scope):
            pipe.evalsha(self._index_add.sha, 1, index, member, ttl_ms, INDEX_GRACE_MS)
        pipe.evalsha(self._fill.sha, len(fill_keys), *fill_keys, *fill_args)
        return bool((await pipe.execute())[-1])

    async def _write_on_cluster(
        self,
        client: RedisCluster,
        key: str,
        value: bytes,
        ttl_ms: int,
        scope: CacheScope,
        generation_groups: list[list[str]],
    ) -> bool:
        # The indexes and the generations share the namespace's slot, the entry is elsewhere:
        # index (and generations), entry, index. EVAL rather than EVALSHA: a cluster transaction
        # cannot load a script that a promoted replica has never seen. The generations are not
        # compared here (they are in another slot than the entry): a read never serves an entry
        # of another generation anyway. A fill keeps ``generation_keys`` alive as long as its
        # entry, as on one server: made with a short life, they would otherwise turn the scope's
        # every entry into a miss at once. Each tag's generations (``generation_groups[1:]``)
        # are in a slot of their own, kept alive there.
        updates = self._index_updates(key, scope)
        keep_ms = ttl_ms + INDEX_GRACE_MS
        await asyncio.gather(
            *(
                client.eval(_KEEP_GENERATIONS, len(group), *group, keep_ms)
                for group in generation_groups[1:]
            )
        )

        async def index(kept_alive: list[str]) -> None:
            # redis-py 8.1 runs a cluster transaction on a client that has not (re)read the slot
            # map on connections it cannot close; reading the map first avoids that (a no-op
            # when it is current).
            await client.initialize()
            pipe = client.pipeline(transaction=True)
            if kept_alive:
                keep_ms = ttl_ms + INDEX_GRACE_MS
                pipe.eval(_KEEP_GENERATIONS, len(kept_alive), *kept_alive, keep_ms)
            for name, member in updates:
                pipe.eval(_INDEX_ADD, 1, name, member, ttl_ms, INDEX_GRACE_MS)
            await pipe.execute()

        await index(generation_groups[0])
        await client.set(key, value, px=ttl_ms)
        await index([])
        return True

    async def delete(self, key: str, scope: CacheScope | None = None) -> int:
        if scope is None:
            try:
                async with _redis_errors_translated():
                    return int(await self._client.unlink(key))
            finally:
                self._drop_near([key])
        # A fill of this key computed before the deletion must not bring it back; once the
        # generation is retired, the entry is a miss wherever it is read, so removing it only
        # frees its memory.
        generation_key = self._keys.scope_generation_key(scope)
        async with _redis_errors_translated():
            view = await self._follow_sentinel_master()
        try:
            await self._retire(generation_key, view)
        finally:
            self._drop_near([key, generation_key])
        try:
            async with _redis_errors_translated():
                return int(await self._client.unlink(key))
        except BackendError as exc:
            logger.debug("deleted entry left to expire: %s", exc)
            return 0

    async def add_if_absent(self, key: str, value: bytes, ttl_ms: int) -> bool:
        async with _redis_errors_translated():
            return bool(await self._client.set(key, value, px=ttl_ms, nx=True))

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        async with _redis_errors_translated():
            return bool(await self._delete_if_equal(keys=[key], args=[value]))

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
        async with _redis_errors_translated():
            view = await self._follow_sentinel_master()
        generation_key = self._generation_key_of(target)
        try:
            await self._retire(generation_key, view)
        finally:
            # Whether or not Redis took it: this process serves nothing of the old generation.
            self._drop_near([generation_key])
        return 0, lambda: self._remove_entries(target)

    async def _remove_entries(self, target: InvalidationTarget) -> int:
        """Removes the target's indexed entries; how many (0 when Redis failed half-way: the
        rest expire by themselves)."""
        ns, names = target.namespace, self._keys
        try:
            async with _redis_errors_translated():
                if target.tenant_id is None:
                    return await self._drain_registry(
                        names.namespace_registry(ns), self._drain_tenant_leaf
                    )
                if target.user_id is None:
                    return await self._drain_tenant_leaf(names.tenant_leaf(ns, target.tenant_id))
                return await self._drain_leaf(names.user_leaf(ns, target.tenant_id, target.user_id))
        except BackendError as exc:
            logger.debug("invalidated entries left to expire: %s", exc)
            return 0

    def _drop_near(self, keys: list[str]) -> None:
        if self._near is not None:
            self._near.drop(keys)
        elif self._cluster_reads is not None:
            self._cluster_reads.drop(keys)

    async def _retire(self, generation_key: str, view: SentinelView | None) -> None:
        """Deletes a scope's generation: what makes an invalidation (or a deletion) hold.

        A burst of them can find every pooled connection in use (``REDIS_MAX_CONNECTIONS``): this
        process is busy, Redis is not down, and an invalidation is worth a short wait where a
        read is not. So it waits for a connection to come free, for at most one command timeout:
        every connection in use is released within that time unless Redis stops answering, and
        a pool that stays full that long is reported as Redis not answering in time.

        Behind Sentinel, where a replica may be promoted, the deletion must also reach a replica:
        see :meth:`_unlink_confirmed`.

        Raises:
            BackendError: The generation could not be deleted, or no replica confirmed it.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._command_timeout
        while True:
            try:
                async with _redis_errors_translated():
                    await self._unlink_confirmed(generation_key, view)
                return
            except BackendBusyError as exc:
                if loop.time() >= deadline:
                    raise BackendUnavailableError(
                        f"Redis did not answer in time: {exc} for {self._command_timeout}s"
                    ) from exc
            await asyncio.sleep(BUSY_POLL_SECONDS)

    async def _unlink_confirmed(self, generation_key: str, view: SentinelView | None) -> None:
        """``UNLINK``s a generation; behind Sentinel with a replica, confirmed by one (``WAIT``).

        Redis replicates asynchronously: a master that crashes, or that Sentinel demotes while
        the replica it promotes no longer follows it, loses what it acknowledged last. So where
        Sentinel could promote a replica lacking it, the deletion is followed, on the same
        connection, by ``WAIT 1`` for up to :data:`REPLICA_CONFIRM_TIMEOUT_MS`; without that
        confirmation it fails as an outage would, and the layer keeps the invalidation, stops
        reading Redis and applies it again once Redis answers (on the promoted replica after a
        failover). On a cluster, the same where the primary owning the generation's slot has a
        replica (see :meth:`_unlink_confirmed_on_cluster`). One server, or Sentinel without a
        replica that could be promoted (see :func:`replica_may_be_promoted`, which reads
        ``view``, the Sentinels' answer of this invalidation): one ``UNLINK``, no wait. With no
        answer (every Sentinel away) the master that answers takes it if it says it is a master,
        confirmed by a replica.
        """
        if isinstance(self._client, RedisCluster):
            await self._unlink_confirmed_on_cluster(self._client, generation_key)
            return
        pool = self._sentinel_pool()
        if pool is None:
            await self._client.unlink(generation_key)
            return
        # One connection for both commands: WAIT counts the replicas that have this connection's
        # last write.
        single = Redis(connection_pool=pool, single_connection_client=True)
        try:
            if view is None or not view.names_a_master:
                # The last master known, no Sentinel naming it now: only while it says so.
                await single.initialize()
                if single.connection is None or not await reports_master_role(single.connection):
                    raise BackendUnavailableError("no Sentinel names a master, nor does the server")
            await single.unlink(generation_key)
            connection = single.connection
            server = (connection.host, connection.port) if connection is not None else None
            if not replica_may_be_promoted(view, server):
                return
            confirmed = int(
                await single.execute_command("WAIT", 1, REPLICA_CONFIRM_TIMEOUT_MS)  # type: ignore[no-untyped-call]  # redis-py: untyped
            )
        finally:
            await single.aclose()
        if confirmed < 1:
            raise BackendUnavailableError(
                f"no replica confirmed the invalidation within {REPLICA_CONFIRM_TIMEOUT_MS} ms"
            )

    async def _unlink_confirmed_on_cluster(self, client: RedisCluster, key: str) -> None:
        """``UNLINK``s ``key`` on the primary owning its slot and, where the client's slot map
        lists a replica of that primary, waits on the same connection for one to confirm it
        (``WAIT 1``, :data:`REPLICA_CONFIRM_TIMEOUT_MS`).

        ``CLUSTER SLOTS`` leaves out the replicas the cluster counts as failed, and those that
        have no replication offset yet (a new cluster, before its first write): a map without a
        replica for the slot is read again, at most every :data:`SLOT_MAP_RECHECK_SECONDS`.
        Redirects are followed here, up to :data:`MAX_REDIRECTS`: ``MOVED`` (a failover, the end
        of a resharding) reads the slot map again; ``ASK`` (the key already moved to the node
        importing the slot) sends ``ASKING`` and the commands on one connection of that node,
        which redis-py 8.1's own redirect does not (see :data:`_REDIRECTS_EXHAUSTED`).
        Unconfirmed, the map is read again too, so that a replica the cluster has failed since
        is not waited for when the invalidation is applied again.

        Raises:
            BackendUnavailableError: No replica confirmed the deletion.
            BackendMovingError: The slot kept moving.
        """
        await client.initialize()
        slot = client.keyslot(key)
        node, confirm = await self._slot_owner(client, slot)
        asking = False
        for _ in range(MAX_REDIRECTS + 1):
            commands: list[tuple[Any, ...]] = [("UNLINK", key)]
            if confirm:
                commands.append(("WAIT", 1, REPLICA_CONFIRM_TIMEOUT_MS))
            if asking:
                commands.insert(0, ("ASKING",))
            replies = await _exchange(node, commands)
            if asking:
                replies = replies[1:]
            unlinked, asking = replies[0], False
            if isinstance(unlinked, redis_errors.MovedError):
                await self._read_slot_map(client)
                node, confirm = await self._slot_owner(client, slot)
                continue
            if isinstance(unlinked, redis_errors.AskError):
                node, asking = await self._node_asked(client, unlinked), True
                confirm = _has_replica(client, node)
                continue
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
            if not confirm or int(replies[1]) >= 1:
                return
            with contextlib.suppress(*_REDIS_FAILURES):
                await self._read_slot_map(client)
            raise BackendUnavailableError(
                f"no replica confirmed the invalidation within {REPLICA_CONFIRM_TIMEOUT_MS} ms"
            )
        raise BackendMovingError("the invalidation's slot kept moving while it was applied")

    async def _slot_owner(self, client: RedisCluster, slot: int) -> tuple[ClusterNode, bool]:
        """The primary owning ``slot`` in the client's slot map, and whether the map lists a
        replica of it (read again, at most every :data:`SLOT_MAP_RECHECK_SECONDS`, if not)."""
        nodes = client.nodes_manager.slots_cache.get(slot) or []
        loop = asyncio.get_running_loop()
        if len(nodes) < 2 and loop.time() - self._slot_map_read_at >= SLOT_MAP_RECHECK_SECONDS:
            await self._read_slot_map(client)
            nodes = client.nodes_manager.slots_cache.get(slot) or []
        if not nodes:
            raise redis_errors.SlotNotCoveredError(f"slot {slot} has no node")
        return nodes[0], len(nodes) >= 2

    async def _node_asked(self, client: RedisCluster, asked: redis_errors.AskError) -> ClusterNode:
        """The node an ``ASK`` names (the slot map read again if the client does not know it)."""
        node = client.nodes_manager.get_node(host=asked.host, port=asked.port)
        if node is None:
            await self._read_slot_map(client)
            node = client.nodes_manager.get_node(host=asked.host, port=asked.port)
        if node is None:
            raise BackendMovingError("a slot moves to a node the cluster does not list yet")
        return node

    async def _read_slot_map(self, client: RedisCluster) -> None:
        """Reads the cluster's slot map again (``CLUSTER SLOTS``), replicas included."""
        self._slot_map_read_at = asyncio.get_running_loop().time()
        await client.nodes_manager.initialize()

    def _sentinel_pool(self) -> MasterPool | None:
        """The pool of Sentinel's master, when the store talks to one."""
        pool = self._client.connection_pool if isinstance(self._client, Redis) else None
        if isinstance(pool, MasterPool) and pool.is_master:
            return pool
        return None

    def _check_sentinel_master(self) -> None:
        """Behind Sentinel, asks it for the master at most every
        :data:`SENTINEL_MASTER_CHECK_SECONDS`, in the background: reads and writes never wait for
        it. When Sentinel names another master, every connection to the old one is dropped (those
        in use once their command is answered); new ones go to the new master.
        Without this, pooled connections to a demoted master would go on serving its reads.
        """
        if self._master_check is not None or not self._behind_sentinel:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._master_checked_at < SENTINEL_MASTER_CHECK_SECONDS:
            return
        pool = self._sentinel_pool()
        if pool is None:
            return
        self._master_checked_at = loop.time()
        self._master_check = loop.create_task(self._recheck_master(pool))

    async def _recheck_master(self, pool: MasterPool) -> None:
        try:
            await self._leave_other_servers(pool)
        finally:
            self._master_check = None

    @staticmethod
    async def _leave_other_servers(pool: MasterPool) -> None:
        """Drops every pooled connection to another server than the master Sentinel names.

        Not only when this check is the first to learn of a switch: a connection that redis-py
        made meanwhile has already told the pool, which then drops its idle connections only,
        and those that were busy then went back to the pool still talking to the old master.
        """
        try:
            view = await pool.ask()
        except _REDIS_FAILURES as exc:
            logger.debug("Sentinel not asked for the master: %s", exc)
            return
        if view is None or not view.names_a_master:
            # No Sentinel names a master: the connections stay where they are.
            return
        found = view.address
        in_use = list(getattr(pool, "_in_use_connections", ()))
        idle = list(getattr(pool, "_available_connections", ()))
        if any(_connected_elsewhere(connection, found) for connection in [*in_use, *idle]):
            # Idle connections now; those in use once their command is answered (redis-py
            # disconnects a connection marked so when it is released).
            for connection in in_use:
                if _connected_elsewhere(connection, found):
                    connection.mark_for_reconnect()
            with contextlib.suppress(*_REDIS_FAILURES):
                await pool.disconnect(inuse_connections=False)

    async def _follow_sentinel_master(self) -> SentinelView | None:
        """Behind Sentinel, asks it for the master before an invalidation walks the indexes;
        returns the answer (``None``: no Sentinel answered, or not behind Sentinel).

        After a failover, pooled connections to the demoted master still answer reads (as a
        replica, possibly mid-resync); an invalidation that read the indexes there could miss
        entries the new master holds. Asking first drops every connection to an old master.
        """
        pool = self._sentinel_pool()
        if pool is None:
            return None
        _, view = await pool.locate_master()
        return view

    async def _drain_tenant_leaf(self, leaf: str) -> int:
        """Drains a tenant's leaf, then the user leaves registered under that tenant."""
        # The unscoped leaf's registry never exists, so draining it costs one empty read.
        registry = self._keys.registry_of_leaf(leaf)
        removed = await self._drain_leaf(leaf)
        return removed + await self._drain_registry(registry, self._drain_leaf)

    async def _drain_registry(self, registry: str, drain: Callable[[str], Awaitable[int]]) -> int:
        # ZSCAN returns every leaf registered for the whole walk; a leaf is unregistered only once
        # it is empty, so one refilled by a concurrent write stays findable (and no walk repeats).
        # Leaves are drained a few at a time concurrently: the walk's cost is round trips, and
        # they overlap on separate pooled connections.
        async def drain_and_unregister(leaf: str) -> int:
            removed = await drain(leaf)
            leaf_registry = self._keys.registry_of_leaf(leaf)
            await self._unregister_if_drained(keys=[registry, leaf, leaf_registry])
            return removed

        removed = 0
        chunk: list[str] = []
        async for member, _ in self._client.zscan_iter(registry, count=BATCH_SIZE):
            chunk.append(member.decode())
            if len(chunk) >= DRAIN_CONCURRENCY:
                removed += sum(await asyncio.gather(*map(drain_and_unregister, chunk)))
                chunk = []
        if chunk:
            removed += sum(await asyncio.gather(*map(drain_and_unregister, chunk)))
        return removed

    async def _drain_leaf(self, leaf: str) -> int:
        if not isinstance(self._client, RedisCluster):
            removed, remaining = 0, 1
            while remaining:
                unlinked, remaining = await self._drain_page(keys=[leaf], args=[DRAIN_PAGE_SIZE])
                removed += int(unlinked)
            return removed
        # On a cluster the entries spread over many slots: UNLINK them per slot first, then
        # forget them, so a failure half-way leaves every surviving entry indexed.
        removed = 0
        while keys := await self._client.zrange(leaf, 0, DRAIN_PAGE_SIZE - 1):
            removed += int(await self._client.unlink(*keys))
            await self._client.zrem(leaf, *keys)
        return removed

    async def clear(self, on_batch: Callable[[int], object] | None = None) -> int:
        """Removes every key of the prefix (SCAN, then UNLINK in batches); ``on_batch(n)`` after
        each batch (the CLI's progress bar)."""
        removed = 0
        try:
            async with _redis_errors_translated():
                await self._detect_cluster()
                async for batch in self.keys_of_prefix():
                    unlinked = int(await self._client.unlink(*batch))
                    removed += unlinked
                    if on_batch is not None:
                        on_batch(unlinked)
        finally:
            if self._near is not None:
                self._near.flush(FlushReason.CLEAR)
            if self._cluster_reads is not None:
                self._cluster_reads.flush(FlushReason.CLEAR)
        return removed

    async def keys_of_prefix(self) -> AsyncIterator[Sequence[bytes]]:
        """Every key of the prefix, entries and helpers alike, in batches (``SCAN``; redis-py's
        errors untranslated: callers translate them)."""
        batch: list[bytes] = []
        async for key in self._client.scan_iter(match=self._keys.all_keys_glob(), count=1000):
            batch.append(key)
            if len(batch) >= BATCH_SIZE:
                yield batch
                batch = []
        if batch:
            yield batch

    # -- connection ----------------------------------------------------------------------------

    async def ping(self) -> None:
        """Answers when Redis does; on a cluster, when every primary does."""
        async with _redis_errors_translated():
            await self._detect_cluster()
            if isinstance(self._client, RedisCluster):
                await self._client.ping(target_nodes=RedisCluster.PRIMARIES)
            else:
                await self._client.ping()
        # Subscribing now, so that the first reads can be kept.
        if self._near is not None and self._cluster_factory is None:
            self._near.start()
        elif self._cluster_reads is not None:
            self._cluster_reads.start()

    async def _detect_cluster(self) -> None:
        """On the first contact (``REDIS_CLUSTER=auto``): switch to the cluster client if needed."""
        factory = self._cluster_factory
        if factory is None or not isinstance(self._client, Redis):
            return
        if await reports_cluster_mode(self._client):
            single, single_reads, cluster = self._client, self._reads, factory()
            self._use(cluster)
            if self._near_cache is not None:
                # Each primary gets a near cache of its own (cluster_reads.py), shaped after it.
                await self._near_cache.aclose()
            with contextlib.suppress(*_REDIS_FAILURES):
                if single_reads is not None:
                    await single_reads.aclose()
                await single.aclose()
        self._cluster_factory = None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        check, self._master_check = self._master_check, None
        if check is not None:
            check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await check
        try:
            if self._near_cache is not None:
                await self._near_cache.aclose()
            if self._reads is not None:
                await self._reads.aclose()
            if self._cluster_reads is not None:
                await self._cluster_reads.aclose()
            await self._client.aclose()
        except _REDIS_FAILURES:
            # Closing a connection to a server that is gone is not worth an error at shutdown.
            return


def _connected_elsewhere(connection: Any, master: tuple[str, int]) -> bool:
    """Whether a pooled connection is open to another server than ``master``."""
    return bool(connection.is_connected) and (connection.host, connection.port) != master


_DISCONNECTS_IF_NEEDED = hasattr(ClusterNode, "disconnect_if_needed")


async def _exchange(node: ClusterNode, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Sends ``commands`` at once on one pooled connection of a cluster node; their replies, an
    error reply as its exception (not raised)."""
    connection = node.acquire_connection()
    replies: list[Any] = []
    try:
        if _DISCONNECTS_IF_NEEDED:  # redis-py 7.2+: a connection marked for a reconnect
            await node.disconnect_if_needed(connection)
        await connection.send_packed_command(connection.pack_commands(commands))
        for _command in commands:
            try:
                replies.append(await connection.read_response())
            except redis_errors.ResponseError as exc:
                replies.append(exc)
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        node.release(connection)
    return replies


def _has_replica(client: RedisCluster, primary: ClusterNode) -> bool:
    """Whether the client's slot map lists a replica of ``primary``."""
    return any(
        len(nodes) > 1 and nodes[0] is primary
        for nodes in client.nodes_manager.slots_cache.values()
    )
