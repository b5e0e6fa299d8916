"""The cache layer: one object in front of the stores that never lets a failure reach a request.

It reads, validates and writes entries on the store its breaker chooses (``breaker.py``: Redis,
or the bounded in-memory tier while Redis cannot be reached, and the probe that comes back), and
hands removals to ``removals.py``, which keeps for Redis what cannot reach it. It knows the stores
by their contract only (``backends/base.py``): whoever builds it passes them in (``lifecycle.py``).

Fill tokens and the degraded tier
---------------------------------
What no replica can learn while Redis is down is another replica's invalidation: each in-memory
tier only sees its own process's. So while degraded, entries live in memory for at most
``CACHE_DEGRADED_TTL_SECONDS`` (30 s by default), which bounds how long a replica may answer with a
value computed before another replica's update.

A value computed before an invalidation and stored after it would bring the old value back, on
this replica or, through Redis, on every replica. Every read therefore yields a :class:`FillToken`:
the layer's own invalidation clock for the namespace and, from Redis, the scope's *generation*
(see ``backends/base.py``). The value computed after that read is stored with the token's
generation inside it, and only if neither has moved since (checked atomically with the write on
one Redis server); and a read serves an entry only if the generation in it is the scope's current
one. So an invalidation by any replica, or the loss of any helper key (evicted under
``allkeys-lru``, deleted, flushed), can only ever cost misses. Our decorator passes the token from
its read to its write; fastapi-cache2's decorator gets the same through the adapter
(``fastapi_cache_backend.py``). Entries also carry a format marker and the route's fingerprint
(``entry.py``): anything else under a key is a miss, counted, and overwritten by the fill.

Errors and logs
---------------
Stores raise :class:`~commons.cache.errors.BackendError` only. Every store call goes through
:meth:`~commons.cache.breaker.Breaker.attempt`, which counts and judges it; the layer answers as a
miss. Nothing here raises into a request. The layer logs one line per change of state (or of what
Redis refuses), never one per request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import NamedTuple

from commons.cache.backends.base import CacheStore, LocalStore, ReplicaLocks, StoredRead
from commons.cache.breaker import FAILED, Breaker
from commons.cache.entry import (
    ParsedValue,
    ValidatedValues,
    expected_head,
    rejection_reason,
    stored_value,
)
from commons.cache.events import CacheEvents
from commons.cache.keyspace import lock_key, scope_of_key
from commons.cache.memo import MemoShare, share_of
from commons.cache.removals import Removals
from commons.cache.scope import CacheScope, InvalidationTarget, ScopedKey
from commons.cache.settings import CacheSettings
from commons.cache.status import CacheState, CacheStatus

__all__ = ["CacheLayer", "FillToken", "Lookup"]

logger = logging.getLogger("commons.cache")

_NOTHING = StoredRead(0, None)
#: Each layer's number, never reused in the process (what memory kept across ``init_cache()``
#: calls compares: an id may be reused once its layer is gone).
_SERIALS = itertools.count(1)


class FillToken(NamedTuple):
    """What a miss saw, handed from its read to its write: the value computed in between is
    stored only if nothing invalidated its scope since (see the module docstring).

    Equal tokens belong to the same generation, so they can share one computation. (Tuples, as
    every object a hit creates: they are made on every request.)
    """

    #: The layer's own invalidation clock for the namespace at the read.
    stamp: int
    #: The scope's generation in Redis at the read; ``None`` when the read was not from Redis.
    generation: bytes | None
    #: The read from Redis failed: the write would most likely wait for the same timeout.
    redis_failed: bool = False


class Lookup(NamedTuple):
    """What a read found: a valid stored value (or none) and the token for filling the key."""

    token: FillToken
    value: ParsedValue | None = None
    #: Whole seconds the stored value has left to live (its stale window included).
    remaining: int = 0
    #: The stored bytes as this process's memory (the near cache) holds them, when it answered
    #: the read with no command sent or kept what the read found (the value's ``raw`` may be an
    #: equal object remembered before); ``None`` otherwise.
    held: bytes | None = None

    @property
    def fresh_for(self) -> int:
        """Seconds the value stays fresh; 0 or less once only its stale window is left."""
        stale = self.value.stale_seconds if self.value is not None else 0
        return self.remaining - stale

    @property
    def age(self) -> int | None:
        """Seconds since the value was stored (``None``: stored in the previous shape)."""
        lifetime = self.value.lifetime if self.value is not None else None
        return None if lifetime is None else max(lifetime - self.remaining, 0)

    @property
    def is_fresh(self) -> bool:
        return self.value is not None and (self.value.stale_seconds == 0 or self.fresh_for > 0)


class _GenerationsAsked:
    """``store.generation(scope)``, asked once at a time per scope in this process (a cold start
    misses every key of a scope at once: one round trip serves them all)."""

    def __init__(self) -> None:
        self._asked: dict[CacheScope, asyncio.Future[bytes]] = {}

    async def ask(self, store: CacheStore, scope: CacheScope) -> bytes:
        pending = self._asked.get(scope)
        if pending is None:
            pending = asyncio.ensure_future(store.generation(scope))
            self._asked[scope] = pending
            pending.add_done_callback(lambda done: self._answered(scope, done))
        return await asyncio.shield(pending)

    def _answered(self, scope: CacheScope, done: asyncio.Future[bytes]) -> None:
        if self._asked.get(scope) is done:
            del self._asked[scope]
        if not done.cancelled():
            done.exception()  # seen, even when every caller gave up waiting


class CacheLayer:
    """Routes reads, writes and invalidations to Redis or memory, and handles their failures."""

    def __init__(
        self,
        settings: CacheSettings,
        *,
        redis: CacheStore | None,
        memory: LocalStore,
        events: CacheEvents | None = None,
    ) -> None:
        """
        Args:
            settings: The cache's settings.
            redis: The shared store, if one is configured; the replica locks need it to have
                the :class:`~commons.cache.backends.base.ReplicaLocks` capability.
            memory: The in-memory tier (``backends.factory.memory_store`` builds it as
                ``CACHE_MEMORY_MAX_ENTRIES`` bounds it).
            events: Receives the cache's events.
        """
        self.settings = settings
        #: This layer's number, unique in the process (see ``hit_shortcut.py``).
        self.serial = next(_SERIALS)
        self.events = events or CacheEvents()
        self.prefix = settings.CACHE_PREFIX
        self._redis = redis
        self._locks = redis if isinstance(redis, ReplicaLocks) else None
        self._memory = memory
        self._breaker = Breaker(settings, self.events, redis=redis, memory=memory)
        self._removals = Removals(settings, self.events, self._breaker, redis=redis, memory=memory)
        self._clock = self._removals.clock
        self._generations = _GenerationsAsked()
        self._validated_values = ValidatedValues(max_bytes=share_of(MemoShare.PARSED_VALUES))

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connects to Redis if configured; raises only when CACHE_FAIL_FAST demands it."""
        await self._breaker.connect(self._removals)

    async def aclose(self) -> None:
        """Stops the recovery probe and closes the stores. Safe to call twice."""
        try:
            await self._breaker.stop_probing()
            await self._removals.settled()
            await self._last_replay()
            await self._removals.aclose()
        finally:
            # Whatever failed above (a full disk under the journal, say), connections close.
            try:
                if self._redis is not None:
                    await self._redis.aclose()
            finally:
                await self._memory.aclose()

    async def _last_replay(self) -> None:
        """A process that stops (or is initialised again) while it keeps invalidations for Redis
        still owes them: Redis may be back since the last probe. One last recovery attempt,
        bounded by the Redis timeouts; what it cannot apply stays in the journal, if any, or is
        lost, and the log says so."""
        pending = self._removals.pending
        if self._redis is None or self.state is not CacheState.DEGRADED or not pending:
            return
        settings = self.settings
        bound = settings.REDIS_CONNECT_TIMEOUT_SECONDS + 4 * settings.REDIS_SOCKET_TIMEOUT_SECONDS
        try:
            if await asyncio.wait_for(self.try_recover(), bound):
                return
        except TimeoutError:
            pass
        if pending and settings.CACHE_INVALIDATION_JOURNAL is None:
            logger.warning(
                "closing with %d invalidations kept for Redis, which did not answer: they are "
                "lost with this process (CACHE_INVALIDATION_JOURNAL keeps them for the next "
                "start; CACHE_FLUSH_AFTER_DEGRADED_START covers a start during the outage)",
                len(pending),
            )

    async def removals_settled(self) -> None:
        """Returns once every invalidation, deletion and flush under way (their callers may have
        given up) has been applied to Redis or kept for it."""
        await self._removals.settled()

    async def background_removals_settled(self) -> None:
        """Returns once the removals of invalidated entries that run after their invalidations
        returned have ended (tests and benchmarks; see ``background_removal.py``)."""
        await self._removals.background.wait()

    async def try_recover(self) -> bool:
        """Probes Redis; on success applies pending invalidations and returns to Redis (what
        the recovery probe runs; see ``breaker.py``)."""
        return await self._breaker.try_recover(self._removals)

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> CacheState:
        return self._breaker.state

    @property
    def enabled(self) -> bool:
        return self._breaker.enabled

    @property
    def store_in_use(self) -> CacheStore:
        """The tier reads and writes go to right now: Redis, or the in-memory tier."""
        return self._breaker.active

    def status(self) -> CacheStatus:
        breaker = self._breaker
        near_entries, near_bytes = (0, 0) if self._redis is None else self._redis.near_cache_held()
        return CacheStatus(
            backend=breaker.state.value,
            reason=breaker.reason,
            since=breaker.since,
            redis_configured=self._redis is not None,
            pending_invalidations=len(self._removals.pending),
            memory_entries=len(self._memory),
            removals_pending=self._removals.background.pending,
            near_cache_entries=near_entries,
            near_cache_bytes=near_bytes,
        )

    # -- scopes --------------------------------------------------------------------------------

    def scope_of(self, key: str) -> CacheScope | None:
        """The scope an entry under ``key`` belongs to; ``None``: never read or write it.

        Keys from our builders carry their scope. A plain string key (another key builder, or
        fastapi-cache2's ``clear(key=...)``) is accepted only under this layer's prefix, scoped as
        its text says (see ``keyspace.scope_of_key``).
        """
        if isinstance(key, ScopedKey):
            return key.scope
        return scope_of_key(self.prefix, key)

    # -- reads and writes ----------------------------------------------------------------------

    async def lookup(self, key: str, fingerprint: bytes) -> Lookup | None:
        """Reads ``key``: a valid value of this ``fingerprint`` and generation, or a miss.

        Returns ``None`` when the key must not be cached at all (no identity, another prefix, or
        caching disabled). A value in another format, of another fingerprint or of another
        generation is a miss (the first two counted with ``events.rejected_entry``); so is any
        failure, which is absorbed here.
        """
        scope = self.scope_of(key)
        breaker = self._breaker
        if scope is None or not breaker.enabled:
            return None
        stamp = self._clock.stamp(scope)
        store = breaker.active
        if store is self._memory:
            # In-process and sub-microsecond: not worth a duration sample (see events.timed).
            read = self._memory.read_now(key)
            generation = None
        else:
            attempted = await breaker.attempt(
                store,
                store.read(key, scope),
                namespace=scope.namespace,
                operation="get",
                timed=True,
            )
            if attempted is FAILED:
                return Lookup(FillToken(stamp, None, redis_failed=True))
            read = attempted
            generation = read.generation
            if generation is None:
                # A generation was lost (evicted, deleted, flushed) or never made: nothing of
                # this scope is valid, and the fill needs a generation to write under.
                read = _NOTHING
                # Creating a generation is a write (refused by a full or read-only Redis).
                made = await breaker.attempt(
                    store,
                    self._generations.ask(store, scope),
                    namespace=scope.namespace,
                    operation="set",
                )
                if made is FAILED:
                    return Lookup(FillToken(stamp, None, redis_failed=True))
                generation = made
        token = FillToken(stamp, generation)
        lookup = self._validated(read, token, fingerprint, key, scope.namespace)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "cache %s namespace=%s key=%s backend=%s",
                "HIT" if lookup.value is not None else "MISS",
                scope.namespace,
                key,
                store.name,
            )
        return lookup

    def _validated(
        self, read: StoredRead, token: FillToken, fingerprint: bytes, key: str, namespace: str
    ) -> Lookup:
        """``read`` as a lookup: its value only if of this fingerprint and generation."""
        raw = read.value
        if raw is None:
            return Lookup(token)
        parsed = self._validated_values.validated(key, raw, fingerprint, token.generation)
        if parsed is None:
            reason = rejection_reason(raw, fingerprint)
            if reason is not None:
                self.events.rejected_entry(namespace, reason)
            return Lookup(token)
        return Lookup(token, parsed, read.remaining, raw if read.from_memory or read.kept else None)

    def held(self, key: str, scope: CacheScope, expected: bytes) -> StoredRead | None:
        """What :meth:`lookup` would read for ``key`` (of ``scope``) right now, when that is
        ``expected`` (that very bytes object) read from this process's memory alone, with nothing
        else to do: Redis in use with no failure to clear, lookups not logged one by one. ``None``
        otherwise (the caller then looks it up). For ``hit_shortcut.py``: what it answers, a
        lookup would have answered the same."""
        breaker = self._breaker
        store = breaker.active
        if (
            store is self._memory
            or not breaker.enabled
            or breaker.consecutive_failures
            or breaker.refused is not None
            or logger.isEnabledFor(logging.DEBUG)
        ):
            return None
        return store.held(key, scope, expected)

    async def token_now(self, key: str) -> FillToken | None:
        """A fill token for a value about to be computed, for a write with no read before it."""
        scope = self.scope_of(key)
        if scope is None or not self.enabled:
            return None
        stamp = self._clock.stamp(scope)
        store = self._breaker.active
        if store is self._memory:
            return FillToken(stamp, None)
        generation = await self._breaker.attempt(
            store, self._generations.ask(store, scope), namespace=scope.namespace, operation="get"
        )
        if generation is FAILED:
            return FillToken(stamp, None, redis_failed=True)
        return FillToken(stamp, generation)

    async def store(
        self,
        key: str,
        payload: bytes,
        *,
        kind: bytes,
        expire: int,
        stale_seconds: int,
        fingerprint: bytes,
        token: FillToken,
    ) -> bytes | None:
        """Stores a computed value under ``key``, unless its scope was invalidated since ``token``.

        Returns the bytes written (what a later read of them returns), or ``None`` when nothing
        was written. Failures are absorbed.
        """
        scope = self.scope_of(key)
        if scope is None or not self.enabled or expire <= 0:
            return None
        if self._clock.stamp(scope) > token.stamp:
            logger.debug("cache write dropped: %s was invalidated meanwhile", scope.namespace)
            return None
        store = self._breaker.active
        if store is self._memory:
            generation = None
            if self._redis is not None:
                # Degraded: other replicas' updates cannot reach this tier, so its entries live
                # briefly (see the module docstring), and are fresh for all of that time.
                lifetime = min(expire + stale_seconds, self.settings.CACHE_DEGRADED_TTL_SECONDS)
                expire = min(expire, lifetime)
                stale_seconds = lifetime - expire
        elif token.redis_failed or token.generation is None:
            # The read failed (the write would wait for the same timeout), or it was not from
            # Redis: no generation to write under, so the value could predate an invalidation.
            return None
        else:
            generation = token.generation
        value = stored_value(
            head=expected_head(fingerprint, generation or b""),
            kind=kind,
            stale_seconds=stale_seconds,
            lifetime=expire + stale_seconds,
            payload=payload,
        )
        written = await self._breaker.attempt(
            store,
            store.write(key, value, expire + stale_seconds, scope, generation),
            namespace=scope.namespace,
            operation="set",
            timed=True,
        )
        return value if written is not FAILED and written else None

    # -- removals: deletion, invalidation, flush ------------------------------------------------

    async def delete(self, key: str) -> int:
        """Removes one entry from every tier (kept for Redis while Redis cannot be reached).

        A key outside this layer's prefix is never touched.
        """
        scope = self.scope_of(key)
        return 0 if scope is None else await self._removals.delete(key, scope)

    async def invalidate(self, target: InvalidationTarget) -> int:
        """Makes the invalidation of the target hold; returns how many entries were removed
        before it returned (the in-memory tier's).

        On Redis it returns once the target's generation is retired; the entries, which can no
        longer be served, are removed afterwards in the background (``background_removal.py``).
        When Redis cannot be reached the invalidation is kept and applied before Redis is read
        again.
        """
        return await self._removals.invalidate(target)

    async def clear(self) -> int:
        """Removes every entry of this prefix from every tier (the service-wide flush).

        While Redis cannot be reached the flush is kept for it, as invalidations are.
        """
        return await self._removals.clear()

    # -- locks (single-flight across replicas) --------------------------------------------------

    def lock_key(self, key: str) -> str:
        """The key of the replicas' lock around computing the entry under ``key``."""
        return lock_key(self.prefix, key)

    async def try_lock(self, key: str, token: bytes, ttl_ms: int) -> bool | None:
        """Takes a short lock; ``None`` when no shared store can hold one right now."""
        redis, locks = self._redis, self._locks
        if self.state is not CacheState.REDIS or redis is None or locks is None:
            return None
        acquired = await self._breaker.attempt(
            redis, locks.add_if_absent(key, token, ttl_ms), namespace="", operation="lock"
        )
        return None if acquired is FAILED else acquired

    async def unlock(self, key: str, token: bytes) -> None:
        """Releases a lock taken with ``token`` (a lock held by another token is left alone)."""
        redis, locks = self._redis, self._locks
        if redis is None or locks is None or self.state is not CacheState.REDIS:
            return  # the lock expires by itself
        await self._breaker.attempt(
            redis, locks.delete_if_equal(key, token), namespace="", operation="unlock"
        )
