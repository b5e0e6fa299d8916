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

No lost invalidations
---------------------
An invalidation (``invalidate``, ``delete``, ``clear``) always applies to the in-memory tier. If it
cannot be applied to Redis, it is kept (:class:`~commons.cache.pending.PendingInvalidations`) and
the layer degrades at once, whatever the failure count or the kind of failure, so nothing is read
from Redis until the kept invalidations have been applied there. Other replicas that still reach
Redis are unaffected; the README's Guarantees section says what holds for them during an outage.

What no replica can learn while Redis is down is another replica's invalidation: each in-memory
tier only sees its own process's. So while degraded, entries live in memory for at most
``CACHE_DEGRADED_TTL_SECONDS`` (30 s by default), which bounds how long a replica may answer with a
value computed before another replica's update.

A value computed before an invalidation and stored after it would bring the old value back. A
fill token (the layer's mutation clock) is taken before the handler runs: by our decorator
explicitly, and for fastapi-cache2's decorator by the read that missed, in the same request. The
write is dropped if the namespace was invalidated since.

Errors and logs
---------------
Stores raise :class:`~commons.cache.errors.BackendError` only. The layer catches them, counts them,
and answers as a miss. Nothing here raises into a request. The layer logs one line per change of
state (or of what Redis refuses), never one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from datetime import UTC, datetime

from commons.cache.backends.base import CacheStore
from commons.cache.backends.memory import MemoryStore
from commons.cache.errors import (
    BackendBusyError,
    BackendError,
    BackendUnavailableError,
    CacheUnavailableError,
)
from commons.cache.events import CacheEvents
from commons.cache.pending import PendingInvalidations
from commons.cache.scope import CacheScope, InvalidationTarget, ScopedKey
from commons.cache.settings import CacheSettings
from commons.cache.status import CacheState, CacheStatus

__all__ = ["CacheLayer"]

logger = logging.getLogger("commons.cache")

#: What a refused operation is called in ``cache_status().reason``.
_REFUSED_WHAT = {"get": "reads", "set": "writes", "lock": "locks"}


class _Read:
    """The last cache read of the current request (a request reads before it writes)."""

    __slots__ = ("fill_token", "key", "layer", "redis_failed")

    def __init__(self, layer: CacheLayer, key: str, fill_token: int, redis_failed: bool) -> None:
        self.layer = layer
        self.key = key
        self.fill_token = fill_token
        self.redis_failed = redis_failed


# Per request: each request runs in its own task, with its own copy of the context.
_last_read: contextvars.ContextVar[_Read | None] = contextvars.ContextVar(
    "commons_cache_last_read", default=None
)


class CacheLayer:
    """Routes reads, writes and invalidations to Redis or memory, and handles their failures."""

    def __init__(
        self,
        settings: CacheSettings,
        *,
        redis: CacheStore | None,
        memory: MemoryStore | None = None,
        events: CacheEvents | None = None,
    ) -> None:
        self.settings = settings
        self.events = events or CacheEvents()
        self.prefix = settings.CACHE_PREFIX
        self._redis = redis
        self._memory = memory or MemoryStore(settings.CACHE_MEMORY_MAX_ENTRIES)
        self._pending = PendingInvalidations(settings.CACHE_PENDING_INVALIDATIONS_MAX)
        self._consecutive_failures = 0
        # The operation Redis refuses while it answers (OOM, read-only), or None.
        self._refused: str | None = None
        # Mutation clock for fill tokens: bumped by every invalidation.
        self._clock = 0
        self._invalidated_at: dict[str, int] = {}
        self._cleared_at = 0
        self._recovery_task: asyncio.Task[None] | None = None
        if not settings.CACHE_ENABLED:
            initial, reason = CacheState.DISABLED, "CACHE_ENABLED is false"
        elif redis is None:
            initial, reason = CacheState.MEMORY, "REDIS_URL is not set"
        else:
            initial, reason = CacheState.DEGRADED, "not connected yet"
        self._state = initial
        self._reason = reason
        self._since = datetime.now(UTC)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connects to Redis if configured; raises only when CACHE_FAIL_FAST demands it."""
        if self._state is not CacheState.DEGRADED or self._redis is None:
            self._log_state()
            return
        try:
            await self._redis.ping()
        except BackendError as exc:
            if self.settings.CACHE_FAIL_FAST:
                raise CacheUnavailableError(
                    f"REDIS_URL is set but Redis did not answer ({exc}); "
                    "CACHE_FAIL_FAST=true refuses to start"
                ) from exc
            self._transition(CacheState.DEGRADED, f"Redis unavailable at start-up: {exc}")
        else:
            self._transition(CacheState.REDIS, "connected")
        self._recovery_task = asyncio.create_task(self._recover_forever(), name="cache-recovery")

    async def aclose(self) -> None:
        """Stops the recovery task and closes the stores. Safe to call twice."""
        task, self._recovery_task = self._recovery_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._redis is not None:
            await self._redis.aclose()
        await self._memory.aclose()

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> CacheState:
        return self._state

    @property
    def enabled(self) -> bool:
        return self._state is not CacheState.DISABLED

    def status(self) -> CacheStatus:
        return CacheStatus(
            backend=self._state.value,
            reason=self._reason,
            since=self._since,
            redis_configured=self._redis is not None,
            pending_invalidations=len(self._pending),
            memory_entries=len(self._memory),
        )

    def _transition(self, state: CacheState, reason: str) -> None:
        if state is self._state and reason == self._reason:
            return
        changed = state is not self._state
        if changed:
            self._refused = None
        self._state, self._reason, self._since = state, reason, datetime.now(UTC)
        self._log_state()
        if changed:
            self.events.state_changed(state.value)

    def _log_state(self) -> None:
        troubled = self._state is CacheState.DEGRADED or self._refused is not None
        level = logging.WARNING if troubled else logging.INFO
        logger.log(level, "cache backend: %s (%s)", self._state.value, self._reason)

    def _active_store(self) -> CacheStore:
        if self._state is CacheState.REDIS and self._redis is not None:
            return self._redis
        return self._memory

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

    def _invalidated_since(self, namespace: str, token: int) -> bool:
        return max(self._cleared_at, self._invalidated_at.get(namespace, 0)) > token

    def _this_requests_read(self, key: str) -> _Read | None:
        read = _last_read.get()
        if read is None or read.layer is not self or read.key != key:
            return None
        return read

    # -- scopes --------------------------------------------------------------------------------

    def scope_of(self, key: str) -> CacheScope | None:
        """The scope an entry under ``key`` belongs to; ``None``: never read or write it.

        Keys from our builders carry their scope. A plain string key (another key builder) is
        accepted only under this layer's prefix, scoped to its namespace segment.
        """
        if isinstance(key, ScopedKey):
            return key.scope
        head, sep, rest = key.partition(":")
        if not sep or head != self.prefix:
            return None
        namespace, _, _ = rest.partition(":")
        return CacheScope(namespace)

    # -- reads and writes ----------------------------------------------------------------------

    async def get_with_ttl(self, key: str) -> tuple[int, bytes | None]:
        """The entry and its remaining seconds; ``(0, None)`` on a miss or any failure."""
        scope = self.scope_of(key)
        if not self.enabled or scope is None:
            return 0, None
        token = self._clock
        store = self._active_store()
        if store is self._memory:
            # In-process and sub-microsecond: not worth a duration sample (see events.timed).
            result = self._memory.read(key)
        else:
            started = time.perf_counter()
            try:
                result = await store.get_with_ttl(key)
            except BackendError as exc:
                self._record_failure(store, exc, scope.namespace, "get")
                _last_read.set(_Read(self, key, token, redis_failed=True))
                return 0, None
            finally:
                self.events.timed(scope.namespace, "get", time.perf_counter() - started)
        _last_read.set(_Read(self, key, token, False))
        if self._consecutive_failures or self._refused is not None:
            self._record_success(store, "get")
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "cache %s namespace=%s key=%s backend=%s",
                "HIT" if result[1] is not None else "MISS",
                scope.namespace,
                key,
                store.name,
            )
        return result

    def fill_token(self, key: str) -> int:
        """Taken before computing a value; :meth:`set` drops the value if it went stale since."""
        return self._clock

    async def set(
        self, key: str, value: bytes, ttl_seconds: int, *, fill_token: int | None = None
    ) -> None:
        """Stores an entry; failures are absorbed.

        Without ``fill_token``, the token of this request's read of the same key is used (how
        fastapi-cache2's decorator, which reads, computes and then writes, gets the same safety).
        """
        scope = self.scope_of(key)
        if not self.enabled or scope is None or ttl_seconds <= 0:
            return
        read = self._this_requests_read(key)
        if fill_token is None and read is not None:
            fill_token = read.fill_token
        if fill_token is not None and self._invalidated_since(scope.namespace, fill_token):
            logger.debug("cache write dropped: %s was invalidated meanwhile", scope.namespace)
            return
        store = self._active_store()
        if store is self._redis and read is not None and read.redis_failed:
            # The read just failed: the write would most likely wait for the same timeout.
            return
        if self._redis is not None and store is self._memory:
            # Degraded: other replicas' updates cannot reach this tier, so its entries live
            # briefly (see the module docstring).
            ttl_seconds = min(ttl_seconds, self.settings.CACHE_DEGRADED_TTL_SECONDS)
        started = time.perf_counter()
        try:
            await store.set(key, value, ttl_seconds, scope)
        except BackendError as exc:
            self._record_failure(store, exc, scope.namespace, "set")
        else:
            self._record_success(store, "set")
        finally:
            if store is not self._memory:
                self.events.timed(scope.namespace, "set", time.perf_counter() - started)

    async def delete(self, key: str) -> int:
        """Removes one entry from every tier (kept for Redis while Redis cannot be reached)."""
        scope = self.scope_of(key)
        self._mark_invalidated(scope.namespace if scope is not None else None)
        removed = await self._memory.delete(key)
        if self._redis is None:
            return removed
        if self._state is not CacheState.REDIS:
            self._pending.add_key(key, scope)
            return removed
        try:
            removed += await self._redis.delete(key)
        except BackendError as exc:
            self.events.backend_error(scope.namespace if scope else "", "delete")
            self._pending.add_key(key, scope)
            self._degrade(f"a deletion could not reach Redis: {exc}")
        return removed

    # -- invalidation --------------------------------------------------------------------------

    async def invalidate(self, target: InvalidationTarget) -> int:
        """Removes the target's entries; returns how many were removed where that is known.

        When Redis cannot be reached the invalidation is kept and applied before Redis is read
        again (the returned count then covers the in-memory tier only).
        """
        if not self.enabled:
            return 0
        self._mark_invalidated(target.namespace)
        removed = await self._memory.invalidate(target)
        if self._redis is not None and self._state is not CacheState.REDIS:
            self._pending.add(target)
        elif self._redis is not None:
            try:
                removed += await self._redis.invalidate(target)
            except BackendError as exc:
                self.events.backend_error(target.namespace, "invalidate")
                self._pending.add(target)
                self._degrade(f"an invalidation could not reach Redis: {exc}")
        self.events.invalidated(target.namespace, removed)
        return removed

    async def clear(self) -> int:
        """Removes every entry of this prefix from every tier (the service-wide flush).

        While Redis cannot be reached the flush is kept for it, as invalidations are.
        """
        self._mark_invalidated(None)
        removed = await self._memory.clear()
        if self._redis is None:
            return removed
        if self._state is not CacheState.REDIS:
            self._pending.add_everything()
            return removed
        try:
            removed += await self._redis.clear()
        except BackendError as exc:
            self.events.backend_error("", "clear")
            self._pending.add_everything()
            self._degrade(f"a flush could not reach Redis: {exc}")
        return removed

    # -- locks (single-flight across replicas) --------------------------------------------------

    async def try_lock(self, key: str, token: bytes, ttl_ms: int) -> bool | None:
        """Takes a short lock; ``None`` when no shared store can hold one right now."""
        if self._state is not CacheState.REDIS or self._redis is None:
            return None
        read = _last_read.get()
        if read is not None and read.layer is self and read.redis_failed:
            return None  # this request's read just failed: do not wait on Redis again
        try:
            acquired = await self._redis.add_if_absent(key, token, ttl_ms)
        except BackendError as exc:
            self._record_failure(self._redis, exc, "", "lock")
            return None
        self._record_success(self._redis, "lock")
        return acquired

    async def unlock(self, key: str, token: bytes) -> None:
        if self._redis is None or self._state is not CacheState.REDIS:
            return  # the lock expires by itself
        try:
            await self._redis.delete_if_equal(key, token)
        except BackendError as exc:
            self._record_failure(self._redis, exc, "", "unlock")

    # -- recovery ------------------------------------------------------------------------------

    async def _recover_forever(self) -> None:
        interval = self.settings.CACHE_RECOVERY_INTERVAL_SECONDS
        reported = False
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
        return True
