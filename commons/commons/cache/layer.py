"""The cache layer: one object in front of the stores that never lets a failure reach a request.

Fallback and recovery (a circuit breaker)
-----------------------------------------
With Redis configured, the layer serves from Redis while Redis answers (state ``redis``, the breaker
closed). Failures that show Redis unreachable (refused, timed out, wrong credentials) are counted;
after ``CACHE_FAILURE_THRESHOLD`` consecutive ones the breaker opens: the layer stops calling Redis
at once and serves from its bounded in-memory tier (state ``degraded``). From then on requests never
wait on Redis, whatever Redis does. A background task probes it every
``CACHE_RECOVERY_INTERVAL_SECONDS`` with one ``PING`` (so a dead Redis sees one connection attempt
per interval per process, not one per request) and, once it answers, first applies every
invalidation made in the meantime, then drops the in-memory tier (its entries may be stale for other
replicas) and returns to Redis. The breaker comes back half-open: the first failure after a
recovery opens it again at once, so a Redis that answers ``PING`` but not reads costs one request
per interval, not ``CACHE_FAILURE_THRESHOLD``. A service that started while Redis was down takes the
same way back.

A request whose read from Redis just failed does not write its freshly computed value there: the
write would only wait for the same timeout. So a request pays at most one Redis timeout, and only
before the breaker opens.

A Redis that answers but refuses commands (out of memory under ``noeviction``, a read-only replica,
missing ACL permissions) is not unreachable: reads still work, so the layer stays on Redis and the
refused writes are skipped. ``cache_status()`` says so in its reason until a write succeeds again.
Replies that say the server cannot serve a slot at all (``CLUSTERDOWN``, ``MASTERDOWN``,
``TRYAGAIN``) are an outage, not a refusal. At start-up, a refused first contact (the user may not
run ``PING``, or a cluster client's ``CLUSTER SLOTS``) leaves the layer degraded, since nothing is
known of the server yet, with a reason that names the refusal rather than an outage; the probe
brings it to Redis once the permission is granted.

No lost invalidations
---------------------
An invalidation (``invalidate``, ``delete``, ``clear``) always applies to the in-memory tier (on a
cache disabled by ``CACHE_ENABLED=false`` it does nothing: nothing was stored). If it
cannot be applied to Redis, it is kept (:class:`~commons.cache.pending.PendingInvalidations`) and
the layer degrades at once, whatever the failure count or the kind of failure, so nothing is read
from Redis until the kept invalidations have been applied there. Other replicas that still reach
Redis are unaffected; the README's Guarantees section says what holds for them during an outage.
With ``CACHE_INVALIDATION_JOURNAL`` each kept item is also written to disk before the removal
returns (``journal.py``), and :meth:`CacheLayer.start` applies what earlier processes left there
before anything is read from Redis: a stop or a crash during the outage loses nothing. Without
a journal, a process that starts while Redis does not answer keeps a flush of the whole prefix
(``CACHE_FLUSH_AFTER_DEGRADED_START``): it may follow one that stopped during the same outage
with invalidations nobody can now name.
Behind Sentinel, an invalidation that no replica confirmed (the store's ``WAIT``) fails the same
way: the master that acknowledged it may be replaced by a replica without it, so it is kept and
applied again, on whichever server is then the master, before Redis is read again.

Once started, an invalidation runs to its end even if its caller is cancelled (a client that hung
up, a timeout around the call): applied or kept, never dropped half-way. A burst of invalidations
that finds every pooled connection in use waits for one (up to a command timeout): a busy process
is no outage.

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
Stores raise :class:`~commons.cache.errors.BackendError` only. The layer catches them, counts them,
and answers as a miss. Nothing here raises into a request. The layer logs one line per change of
state (or of what Redis refuses), never one per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from commons.cache.backends.base import CacheStore, LocalStore, ReplicaLocks, StoredRead
from commons.cache.backends.factory import memory_store
from commons.cache.background_removal import BackgroundRemovals
from commons.cache.entry import (
    ParsedValue,
    expected_head,
    parse_value,
    rejection_reason,
    stored_value,
)
from commons.cache.errors import (
    BackendBusyError,
    BackendError,
    BackendRejectedError,
    BackendUnavailableError,
    CacheUnavailableError,
)
from commons.cache.events import CacheEvents
from commons.cache.journal import InvalidationJournal
from commons.cache.keyspace import lock_key, scope_of_key
from commons.cache.memo import BoundedMemo
from commons.cache.pending import PendingInvalidations, PendingItem
from commons.cache.scope import CacheScope, InvalidationTarget, ScopedKey, tag_namespace
from commons.cache.settings import CacheSettings
from commons.cache.status import CacheState, CacheStatus

__all__ = ["CacheLayer", "FillToken", "Lookup"]

logger = logging.getLogger("commons.cache")

_NOTHING = StoredRead(0, None)

#: A parsed value as the layer remembers it: the stored bytes, the fingerprint and generation
#: they were checked against, then ParsedValue's fields after ``raw``.
_ParsedFields = tuple[bytes, bytes, bytes | None, bytes, int, int, int | None]

#: What a refused operation is called in ``cache_status().reason``.
_REFUSED_WHAT = {"get": "reads", "set": "writes", "lock": "locks"}


def _start_up_failure(exc: BackendError) -> str:
    """Why the first contact failed: an outage, or Redis refusing a command the cache needs (a
    permission its user lacks), which lasts until an operator grants it."""
    # The error's own text says what failed ("Redis unavailable: ..."): said once.
    if isinstance(exc, BackendRejectedError):
        return f"at start-up, {exc} (the cache needs it: a permission, not an outage)"
    return f"at start-up, {exc}"


def _state_logger(level: int) -> logging.Logger:
    """Where a change of state is logged: ``commons.cache``, or, when nothing handles its records
    and uvicorn's logging is set up (its default configuration handles only its own loggers),
    ``uvicorn.error``, so that the backend chosen is in the service's log. Warnings need no
    detour: Python prints them without any configuration."""
    if level >= logging.WARNING or logger.hasHandlers():
        return logger
    uvicorn = logging.getLogger("uvicorn.error")
    return uvicorn if uvicorn.hasHandlers() else logger


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


class CacheLayer:
    """Routes reads, writes and invalidations to Redis or memory, and handles their failures."""

    def __init__(
        self,
        settings: CacheSettings,
        *,
        redis: CacheStore | None,
        memory: LocalStore | None = None,
        events: CacheEvents | None = None,
    ) -> None:
        """
        Args:
            settings: The cache's settings.
            redis: The shared store, if one is configured; the replica locks need it to have
                the :class:`~commons.cache.backends.base.ReplicaLocks` capability.
            memory: The in-memory tier; by default as ``CACHE_MEMORY_MAX_ENTRIES`` bounds it.
            events: Receives the cache's events.
        """
        self.settings = settings
        self.events = events or CacheEvents()
        self.prefix = settings.CACHE_PREFIX
        self._redis = redis
        self._locks = redis if isinstance(redis, ReplicaLocks) else None
        self._memory = memory or memory_store(settings)
        self._pending = PendingInvalidations(settings.CACHE_PENDING_INVALIDATIONS_MAX)
        journal_dir = settings.CACHE_INVALIDATION_JOURNAL
        self._journal = (
            InvalidationJournal(Path(journal_dir), settings.CACHE_PREFIX)
            if journal_dir is not None and redis is not None and settings.CACHE_ENABLED
            else None
        )
        self._consecutive_failures = 0
        # The operation Redis refuses while it answers (OOM, read-only), or None.
        self._refused: str | None = None
        # Mutation clock for fill tokens: bumped by every invalidation.
        self._clock = 0
        self._invalidated_at: dict[str, int] = {}
        self._cleared_at = 0
        self._recovery_task: asyncio.Task[None] | None = None
        # Removals on their way to Redis, which outlive a cancelled caller (see _on_redis).
        self._removals: set[asyncio.Task[int]] = set()
        # Old entries of invalidations that already hold, removed after they returned.
        self._background = BackgroundRemovals(
            on_removed=self.events.removed_in_background,
            on_pending=self.events.removals_pending,
        )
        self._generations_asked: dict[CacheScope, asyncio.Future[bytes]] = {}
        # The last value parsed under each key, with the fingerprint and generation it was
        # checked against (see _validated): a plain tuple of bytes, ints and None, which the
        # cyclic collector stops tracking, so a large working set adds nothing to a full
        # collection (a ParsedValue, a tuple subclass, would stay tracked).
        self._parsed = BoundedMemo[str, _ParsedFields](16_384, 32 * 1024 * 1024)
        if not settings.CACHE_ENABLED:
            initial, reason = CacheState.DISABLED, "CACHE_ENABLED is false"
        elif redis is None:
            initial, reason = CacheState.MEMORY, "REDIS_URL is not set"
        else:
            initial, reason = CacheState.DEGRADED, "not connected yet"
        self._state = initial
        # Both follow the state, decided once per change rather than on every request (comparing
        # the state with a CacheState member also costs an object on Python 3.11, whose enum
        # class finds its members through __getattr__). No change leads to or from DISABLED.
        self._enabled = initial is not CacheState.DISABLED
        self._active: CacheStore = self._memory
        self._reason = reason
        self._since = datetime.now(UTC)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connects to Redis if configured; raises only when CACHE_FAIL_FAST demands it."""
        if self._state is not CacheState.DEGRADED or self._redis is None:
            self._log_state()
            return
        await self._open_journal()
        try:
            await self._redis.ping()
            # What the journal kept from a stop or crash during an outage, before any read.
            await self._pending.apply_to(self._redis)
        except BackendError as exc:
            if self.settings.CACHE_FAIL_FAST:
                raise CacheUnavailableError(
                    f"REDIS_URL is set but Redis did not answer ({exc}); "
                    "CACHE_FAIL_FAST=true refuses to start"
                ) from exc
            reason = _start_up_failure(exc)
            if self._keep_a_flush_nobody_vouches_for(exc):
                reason += (
                    "; every entry of the prefix is removed once Redis answers, before it is "
                    "read (CACHE_FLUSH_AFTER_DEGRADED_START)"
                )
            self._transition(CacheState.DEGRADED, reason)
        else:
            self._transition(CacheState.REDIS, "connected")
            await self._forget_applied()
        self._recovery_task = asyncio.create_task(self._recover_forever(), name="cache-recovery")

    def _keep_a_flush_nobody_vouches_for(self, exc: BackendError) -> bool:
        """Keeps a flush of the prefix when this start cannot vouch for what Redis holds.

        Without a journal, an invalidation kept in memory dies with its process: one stopped or
        killed during an outage takes it along, and once Redis is back with its data every
        replica serves the old entry for the rest of its TTL. A process that starts while Redis
        does not answer may be such a process's successor, and nothing tells it what was kept;
        so it keeps a flush, applied like any kept invalidation before Redis is read (one wave
        of misses instead of old answers). A start that finds Redis answering cannot tell either,
        and keeps nothing: that window remains (the README's "No lost invalidations").
        """
        if (
            self._journal is not None
            or not self.settings.CACHE_FLUSH_AFTER_DEGRADED_START
            or not isinstance(exc, BackendUnavailableError)
        ):
            return False
        self._pending.add_everything()
        self.events.start_flush_kept()
        return True

    async def _open_journal(self) -> None:
        """Takes back what earlier processes kept in the journal (see ``journal.py``)."""
        if self._journal is None:
            return
        try:
            items = await self._journal.open()
        except OSError as exc:
            logger.error("invalidation journal not opened, kept invalidations not durable: %s", exc)
            self._journal = None
            return
        for item in items:
            self._pending.add_item(item)
        if items:
            logger.warning("invalidation journal: %d kept invalidations to apply", len(items))

    async def _forget_applied(self) -> None:
        """The journal keeps only what is still pending (nothing, once a replay succeeded)."""
        if self._journal is not None:
            await self._journal.rewrite(self._pending.items)

    async def _keep(self, item: PendingItem) -> None:
        """Keeps a removal for Redis: in memory at once, on disk before returning."""
        self._pending.add_item(item)
        if self._journal is not None:
            await self._journal.append(item)

    async def aclose(self) -> None:
        """Stops the recovery task and closes the stores. Safe to call twice."""
        task, self._recovery_task = self._recovery_task, None
        # Cancelled again until it ends: redis-py can swallow a cancellation that arrives while
        # it reconnects (its timeout on disconnecting turns it into an error the probe absorbs).
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if task is not None and not task.cancelled():
            task.exception()  # seen
        # Each ends within the Redis timeouts; cut short, one could be neither applied nor kept
        # (a process shutting down still owes Redis the invalidations it acknowledged).
        await self.removals_settled()
        # Unlike the invalidations above, these only free memory: cancelled, not waited for.
        await self._background.aclose()
        if self._journal is not None:
            # What is still kept stays on disk for the next process.
            await self._journal.aclose()
        if self._redis is not None:
            await self._redis.aclose()
        await self._memory.aclose()

    async def removals_settled(self) -> None:
        """Returns once every invalidation, deletion and flush under way (their callers may have
        given up) has been applied to Redis or kept for it."""
        while self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)

    async def background_removals_settled(self) -> None:
        """Returns once the removals of invalidated entries that run after their invalidations
        returned have ended (tests and benchmarks; see ``background_removal.py``)."""
        await self._background.wait()

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> CacheState:
        return self._state

    @property
    def enabled(self) -> bool:
        return self._enabled

    def status(self) -> CacheStatus:
        return CacheStatus(
            backend=self._state.value,
            reason=self._reason,
            since=self._since,
            redis_configured=self._redis is not None,
            pending_invalidations=len(self._pending),
            memory_entries=len(self._memory),
            removals_pending=self._background.pending,
        )

    def _transition(self, state: CacheState, reason: str) -> None:
        if state is self._state and reason == self._reason:
            return
        changed = state is not self._state
        if changed:
            self._refused = None
        self._state, self._reason, self._since = state, reason, datetime.now(UTC)
        redis = self._redis
        self._active = redis if state is CacheState.REDIS and redis is not None else self._memory
        self._log_state()
        if changed:
            self.events.state_changed(state.value)

    def _log_state(self) -> None:
        troubled = self._state is CacheState.DEGRADED or self._refused is not None
        level = logging.WARNING if troubled else logging.INFO
        _state_logger(level).log(level, "cache backend: %s (%s)", self._state.value, self._reason)

    def _active_store(self) -> CacheStore:
        return self._active

    def _record_success(self, store: CacheStore, operation: str) -> None:
        if store is not self._redis:
            return
        self._consecutive_failures = 0
        if self._refused == operation and self._state is CacheState.REDIS:
            self._refused = None
            what = _REFUSED_WHAT.get(operation, operation)
            self._transition(CacheState.REDIS, f"Redis accepts {what} again")

    def _record_failure(
        self, store: CacheStore, exc: BackendError, namespace: str, operation: str
    ) -> None:
        self.events.backend_error(namespace, operation)
        if store is not self._redis:
            logger.error("in-memory cache failed: %s", exc)
            return
        if isinstance(exc, BackendBusyError):
            # This process has every pooled connection in use (a burst): a miss, not an outage.
            return
        if not isinstance(exc, BackendUnavailableError):
            # Redis answered but refused (OOM, read-only): it is reachable, so stay on Redis.
            if self._refused is None and self._state is CacheState.REDIS:
                self._refused = operation
                what = _REFUSED_WHAT.get(operation, "commands")
                self._transition(CacheState.REDIS, f"Redis refuses {what}: {exc}")
            return
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.settings.CACHE_FAILURE_THRESHOLD:
            self._degrade(str(exc))

    def _degrade(self, reason: str) -> None:
        if self._state is CacheState.REDIS:
            self._transition(CacheState.DEGRADED, reason)

    # -- fill tokens ---------------------------------------------------------------------------

    def _mark_invalidated(self, namespace: str | None) -> None:
        """Records an invalidation of ``namespace`` (``None``: of everything)."""
        self._clock += 1
        if namespace is None:
            self._cleared_at = self._clock
        else:
            self._invalidated_at[namespace] = self._clock

    def _stamp(self, scope: CacheScope) -> int:
        """The clock of the last invalidation in this process of the scope's namespace or of
        one of its tags (a tag's targets are namespaced by ``scope.tag_namespace``)."""
        invalidated_at = self._invalidated_at.get(scope.namespace, 0)
        for tag in scope.tags:
            invalidated_at = max(invalidated_at, self._invalidated_at.get(tag_namespace(tag), 0))
        # Not max() here: it would build an iterator on every request.
        return invalidated_at if invalidated_at > self._cleared_at else self._cleared_at

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
        if scope is None or not self.enabled:
            return None
        stamp = self._stamp(scope)
        store = self._active_store()
        if store is self._memory:
            # In-process and sub-microsecond: not worth a duration sample (see events.timed).
            read = self._memory.read_now(key)
            generation = None
        else:
            started = time.perf_counter()
            try:
                read = await store.read(key, scope)
            except BackendError as exc:
                self.events.timed(scope.namespace, "get", time.perf_counter() - started)
                self._record_failure(store, exc, scope.namespace, "get")
                return Lookup(FillToken(stamp, None, redis_failed=True))
            if not read.from_memory:
                # A near-cache hit sent no command (see StoredRead.from_memory).
                self.events.timed(scope.namespace, "get", time.perf_counter() - started)
            generation = read.generation
            if generation is None:
                # A generation was lost (evicted, deleted, flushed) or never made: nothing of
                # this scope is valid, and the fill needs a generation to write under.
                read = _NOTHING
                try:
                    generation = await self._generation(store, scope)
                except BackendError as exc:
                    # Creating a generation is a write (refused by a full or read-only Redis).
                    self._record_failure(store, exc, scope.namespace, "set")
                    return Lookup(FillToken(stamp, None, redis_failed=True))
            if self._consecutive_failures or self._refused is not None:
                self._record_success(store, "get")
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
        # The memory store and the near cache hand back the very bytes object they hold: a value
        # is parsed once, not on every hit. Bytes read from Redis itself are new every time:
        # equal ones are the same value (comparing is cheaper than parsing); others take the
        # place of the last ones kept for their key.
        known = self._parsed.get(key)
        if (
            known is not None
            and (known[0] is raw or known[0] == raw)
            and known[1] == fingerprint
            and known[2] == token.generation
        ):
            known_value = ParsedValue(known[0], known[3], known[4], known[5], known[6])
            return Lookup(token, known_value, read.remaining)
        parsed = parse_value(raw, expected_head(fingerprint, token.generation or b""))
        if parsed is None:
            reason = rejection_reason(raw, fingerprint)
            if reason is not None:
                self.events.rejected_entry(namespace, reason)
            return Lookup(token)
        entry = (raw, fingerprint, token.generation, *parsed[1:])
        self._parsed.put(key, entry, len(key) + len(raw))
        return Lookup(token, parsed, read.remaining)

    async def _generation(self, store: CacheStore, scope: CacheScope) -> bytes:
        """``store.generation(scope)``, asked once at a time per scope in this process (a cold
        start misses every key of a scope at once: one round trip serves them all)."""
        pending = self._generations_asked.get(scope)
        if pending is None:
            pending = asyncio.ensure_future(store.generation(scope))
            self._generations_asked[scope] = pending
            pending.add_done_callback(lambda done: self._generation_asked(scope, done))
        return await asyncio.shield(pending)

    def _generation_asked(self, scope: CacheScope, done: asyncio.Future[bytes]) -> None:
        if self._generations_asked.get(scope) is done:
            del self._generations_asked[scope]
        if not done.cancelled():
            done.exception()  # seen, even when every caller gave up waiting

    async def token_now(self, key: str) -> FillToken | None:
        """A fill token for a value about to be computed, for a write with no read before it."""
        scope = self.scope_of(key)
        if scope is None or not self.enabled:
            return None
        stamp = self._stamp(scope)
        store = self._active_store()
        if store is self._memory:
            return FillToken(stamp, None)
        try:
            return FillToken(stamp, await self._generation(store, scope))
        except BackendError as exc:
            self._record_failure(store, exc, scope.namespace, "get")
            return FillToken(stamp, None, redis_failed=True)

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
        if self._stamp(scope) > token.stamp:
            logger.debug("cache write dropped: %s was invalidated meanwhile", scope.namespace)
            return None
        store = self._active_store()
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
        started = time.perf_counter()
        try:
            written = await store.write(key, value, expire + stale_seconds, scope, generation)
        except BackendError as exc:
            self._record_failure(store, exc, scope.namespace, "set")
            return None
        finally:
            if store is not self._memory:
                self.events.timed(scope.namespace, "set", time.perf_counter() - started)
        self._record_success(store, "set")
        return value if written else None

    # -- inspection (operators and tests) -------------------------------------------------------

    async def read_raw(self, key: str) -> tuple[int, bytes | None]:
        """The bytes stored under ``key`` in the tier in use and their remaining seconds, as they
        are (whatever their format, fingerprint or generation). Failures raise BackendError."""
        read = await self._active_store().read(key, self.scope_of(key) or CacheScope(""))
        return read.remaining, read.value

    async def write_raw(self, key: str, value: bytes, ttl_seconds: float) -> None:
        """Stores ``value`` under ``key`` as it is, unconditionally (to age or forge an entry in a
        test). Failures raise BackendError."""
        scope = self.scope_of(key) or CacheScope("")
        await self._active_store().write(key, value, ttl_seconds, scope)

    # -- removals: deletion, invalidation, flush ------------------------------------------------

    async def delete(self, key: str) -> int:
        """Removes one entry from every tier (kept for Redis while Redis cannot be reached).

        A key outside this layer's prefix is never touched.
        """
        scope = self.scope_of(key)
        if scope is None:
            return 0
        return await self._remove(
            scope.namespace,
            lambda store: store.delete(key, scope),
            (key, scope),
            operation="delete",
            what="a deletion",
        )

    async def invalidate(self, target: InvalidationTarget) -> int:
        """Makes the invalidation of the target hold; returns how many entries were removed
        before it returned (the in-memory tier's).

        On Redis it returns once the target's generation is retired; the entries, which can no
        longer be served, are removed afterwards in the background (``background_removal.py``).
        When Redis cannot be reached the invalidation is kept and applied before Redis is read
        again.
        """
        removed = await self._remove(
            target.namespace,
            lambda store: self._invalidate_on(store, target),
            target,
            operation="invalidate",
            what="an invalidation",
        )
        if self.enabled:
            self.events.invalidated(target.reported_namespace, removed)
        return removed

    async def _invalidate_on(self, store: CacheStore, target: InvalidationTarget) -> int:
        removed, removal = await store.invalidate_effective(target)
        if removal is not None:
            self._background.start(target, target.reported_namespace, removal)
        return removed

    async def clear(self) -> int:
        """Removes every entry of this prefix from every tier (the service-wide flush).

        While Redis cannot be reached the flush is kept for it, as invalidations are.
        """
        return await self._remove(
            None,
            lambda store: store.clear(),
            None,
            operation="clear",
            what="a flush",
        )

    async def _remove(
        self,
        namespace: str | None,
        removal: Callable[[CacheStore], Coroutine[Any, Any, int]],
        item: PendingItem,
        *,
        operation: str,
        what: str,
    ) -> int:
        """Applies a removal of ``namespace``'s entries (``None``: of every namespace) to every
        tier: at once in memory; on Redis, or kept for it while Redis cannot be reached.

        A disabled cache (``CACHE_ENABLED=false``) skips every removal: it stores nothing, so
        there is nothing to remove, and nothing to keep for a Redis it never uses.
        """
        if not self.enabled:
            return 0
        self._mark_invalidated(namespace)
        removed = await removal(self._memory)
        if self._redis is None:
            return removed
        if self._state is not CacheState.REDIS:
            await self._keep(item)
            return removed
        label = item.reported_namespace if isinstance(item, InvalidationTarget) else namespace
        return removed + await self._on_redis(
            removal(self._redis), item, namespace=label or "", operation=operation, what=what
        )

    async def _on_redis(
        self,
        removal: Coroutine[Any, Any, int],
        item: PendingItem,
        *,
        namespace: str,
        operation: str,
        what: str,
    ) -> int:
        """Applies an invalidation, a deletion or a flush to Redis; keeps it if it fails.

        It runs to its end even when its caller is cancelled (a client that hung up, a timeout
        around the call): cut short, it could leave the scope's generation in place, neither
        applied nor kept, and the old value would be served on. A failure keeps it for the
        recovery and degrades at once (see the module docstring).
        """

        async def apply() -> int:
            try:
                return await removal
            except BackendError as exc:
                self.events.backend_error(namespace, operation)
                self._degrade(f"{what} could not reach Redis: {exc}")
                await self._keep(item)
                return 0

        task = asyncio.ensure_future(apply())
        self._removals.add(task)
        task.add_done_callback(self._removal_done)
        return await asyncio.shield(task)

    def _removal_done(self, task: asyncio.Task[int]) -> None:
        self._removals.discard(task)
        if not task.cancelled():
            task.exception()  # seen, even when its caller gave up waiting

    # -- locks (single-flight across replicas) --------------------------------------------------

    def lock_key(self, key: str) -> str:
        """The key of the replicas' lock around computing the entry under ``key``."""
        return lock_key(self.prefix, key)

    async def try_lock(self, key: str, token: bytes, ttl_ms: int) -> bool | None:
        """Takes a short lock; ``None`` when no shared store can hold one right now."""
        redis, locks = self._redis, self._locks
        if self._state is not CacheState.REDIS or redis is None or locks is None:
            return None
        try:
            acquired = await locks.add_if_absent(key, token, ttl_ms)
        except BackendError as exc:
            self._record_failure(redis, exc, "", "lock")
            return None
        self._record_success(redis, "lock")
        return acquired

    async def unlock(self, key: str, token: bytes) -> None:
        redis, locks = self._redis, self._locks
        if redis is None or locks is None or self._state is not CacheState.REDIS:
            return  # the lock expires by itself
        try:
            await locks.delete_if_equal(key, token)
        except BackendError as exc:
            self._record_failure(redis, exc, "", "unlock")

    # -- recovery ------------------------------------------------------------------------------

    async def _recover_forever(self) -> None:
        interval = self.settings.CACHE_RECOVERY_INTERVAL_SECONDS
        reported = False
        # A cancellation redis-py turns into a timeout is sent again by aclose until this ends.
        while True:
            await asyncio.sleep(interval)
            if self._state is not CacheState.DEGRADED:
                continue
            try:
                await self.try_recover()
            except Exception:
                # The probe must outlive any surprise, or the layer would never return to Redis.
                if not reported:
                    reported = True
                    logger.exception("cache recovery probe failed unexpectedly")

    async def try_recover(self) -> bool:
        """Probes Redis; on success applies pending invalidations and returns to Redis.

        Only the recovery task calls it while requests are served; they never wait for it.
        """
        redis = self._redis
        if redis is None or self._state is not CacheState.DEGRADED:
            return False
        try:
            await redis.ping()
            applied = len(self._pending)
            await self._pending.apply_to(redis)
        except BackendError as exc:
            logger.debug("Redis still unavailable: %s", exc)
            return False
        if self._state is not CacheState.DEGRADED:
            return False
        # No await from the last check of the pending set to the switch: an invalidation arriving
        # during the replay was applied by it, and any later one goes to Redis directly.
        dropped = len(self._memory)
        # Half-open: one more failure opens the breaker again.
        self._consecutive_failures = self.settings.CACHE_FAILURE_THRESHOLD - 1
        self._transition(
            CacheState.REDIS,
            f"Redis answers again; {applied} pending invalidations applied, "
            f"{dropped} in-memory entries dropped",
        )
        await self._memory.clear()
        await self._forget_applied()
        # What the outage's set let go of is freed by its later calls, and now there are none.
        await self._pending.release_all()
        return True
