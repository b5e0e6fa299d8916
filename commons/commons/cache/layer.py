"""The cache layer: one object in front of the stores that never lets a failure reach a request.

Fallback and recovery
---------------------
With Redis configured, the layer serves from Redis while Redis answers. Failures are counted;
after ``CACHE_FAILURE_THRESHOLD`` consecutive ones that show Redis unreachable (refused, timed out,
wrong credentials) the layer stops calling Redis at once and serves from its bounded in-memory tier:
state ``degraded``. Requests then never wait on Redis: a background task probes it every
``CACHE_RECOVERY_INTERVAL_SECONDS`` and, once it answers, first applies every invalidation made in
the meantime, then drops the in-memory tier (its entries may be stale for other replicas) and
returns to Redis. A service that started while Redis was down takes the same way back.

No lost invalidations
---------------------
An invalidation always applies to the in-memory tier. If it cannot be applied to Redis, it is kept
(:class:`~commons.cache.pending.PendingInvalidations`) and the layer degrades at once, whatever the
failure count, so nothing is read from Redis until the kept invalidations have been applied there.
Other replicas that still reach Redis are unaffected; the README's Guarantees section says what
holds for them during an outage.

A write computed before an invalidation and stored after it would bring the old value back; the
decorator takes a fill token before calling the handler and the layer drops the write if the
namespace was invalidated since.

Errors
------
Stores raise :class:`~commons.cache.errors.BackendError` only. The layer catches them, counts them,
logs once per state change, and answers as a miss. Nothing here raises into a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

from commons.cache.backends.base import CacheStore
from commons.cache.backends.memory import MemoryStore
from commons.cache.errors import BackendError, BackendUnavailableError, CacheUnavailableError
from commons.cache.events import CacheEvents
from commons.cache.pending import PendingInvalidations
from commons.cache.scope import CacheScope, InvalidationTarget, ScopedKey
from commons.cache.settings import CacheSettings
from commons.cache.status import CacheState, CacheStatus

__all__ = ["CacheLayer"]

logger = logging.getLogger("commons.cache")


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
        self._rejection_logged = False
        self._fill_epochs: dict[str, int] = {}
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
        self._state, self._reason, self._since = state, reason, datetime.now(UTC)
        self._rejection_logged = False
        self._log_state()
        self.events.state_changed(state.value)

    def _log_state(self) -> None:
        level = logging.WARNING if self._state is CacheState.DEGRADED else logging.INFO
        logger.log(level, "cache backend: %s (%s)", self._state.value, self._reason)

    def _active_store(self) -> CacheStore:
        if self._state is CacheState.REDIS and self._redis is not None:
            return self._redis
        return self._memory

    def _record_success(self, store: CacheStore) -> None:
        if store is self._redis:
            self._consecutive_failures = 0

    def _record_failure(
        self, store: CacheStore, exc: BackendError, namespace: str, operation: str
    ) -> None:
        self.events.backend_error(namespace, operation)
        if store is not self._redis:
            logger.error("in-memory cache failed: %s", exc)
            return
        if not isinstance(exc, BackendUnavailableError):
            # Redis answered but refused (OOM, read-only): reads still work, so stay on Redis.
            if not self._rejection_logged:
                self._rejection_logged = True
                logger.warning("Redis refused a cache write: %s", exc)
            return
        self._consecutive_failures += 1
        if (
            self._consecutive_failures >= self.settings.CACHE_FAILURE_THRESHOLD
            and self._state is CacheState.REDIS
        ):
            self._degrade(f"Redis unavailable: {exc}")

    def _degrade(self, reason: str) -> None:
        self._transition(CacheState.DEGRADED, reason)

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
        store = self._active_store()
        started = time.perf_counter()
        try:
            result = await store.get_with_ttl(key)
        except BackendError as exc:
            self._record_failure(store, exc, scope.namespace, "get")
            return 0, None
        finally:
            self.events.timed(scope.namespace, "get", time.perf_counter() - started)
        self._record_success(store)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "cache %s key=%s backend=%s",
                "HIT" if result[1] is not None else "MISS",
                key,
                store.name,
            )
        return result

    def fill_token(self, key: str) -> int:
        """Taken before computing a value; :meth:`set` drops the value if it went stale since."""
        scope = self.scope_of(key)
        return self._fill_epochs.get(scope.namespace, 0) if scope is not None else 0

    async def set(
        self, key: str, value: bytes, ttl_seconds: int, *, fill_token: int | None = None
    ) -> None:
        """Stores an entry; failures are absorbed."""
        scope = self.scope_of(key)
        if not self.enabled or scope is None or ttl_seconds <= 0:
            return
        if fill_token is not None and self._fill_epochs.get(scope.namespace, 0) != fill_token:
            logger.debug("cache write dropped: %s was invalidated meanwhile", scope.namespace)
            return
        store = self._active_store()
        started = time.perf_counter()
        try:
            await store.set(key, value, ttl_seconds, scope)
        except BackendError as exc:
            self._record_failure(store, exc, scope.namespace, "set")
        else:
            self._record_success(store)
        finally:
            self.events.timed(scope.namespace, "set", time.perf_counter() - started)

    async def delete(self, key: str) -> int:
        """Removes one entry from every tier."""
        removed = await self._memory.delete(key)
        if self._redis is not None and self._state is CacheState.REDIS:
            try:
                removed += await self._redis.delete(key)
            except BackendError as exc:
                scope = self.scope_of(key)
                self._record_failure(self._redis, exc, scope.namespace if scope else "", "delete")
        return removed

    # -- invalidation --------------------------------------------------------------------------

    async def invalidate(self, target: InvalidationTarget) -> int:
        """Removes the target's entries; returns how many were removed where that is known.

        When Redis cannot be reached the invalidation is kept and applied before Redis is read
        again (the returned count then covers the in-memory tier only).
        """
        if not self.enabled:
            return 0
        self._fill_epochs[target.namespace] = self._fill_epochs.get(target.namespace, 0) + 1
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
        """Removes every entry of this prefix from every tier (the service-wide flush)."""
        removed = await self._memory.clear()
        if self._redis is not None:
            removed += await self._redis.clear()
        return removed

    # -- locks (single-flight across replicas) --------------------------------------------------

    async def try_lock(self, key: str, token: bytes, ttl_ms: int) -> bool | None:
        """Takes a short lock; ``None`` when no shared store can hold one right now."""
        if self._state is not CacheState.REDIS or self._redis is None:
            return None
        try:
            return await self._redis.add_if_absent(key, token, ttl_ms)
        except BackendError as exc:
            self._record_failure(self._redis, exc, "", "lock")
            return None

    async def unlock(self, key: str, token: bytes) -> None:
        if self._redis is None:
            return
        try:
            await self._redis.delete_if_equal(key, token)
        except BackendError as exc:
            self._record_failure(self._redis, exc, "", "unlock")

    # -- recovery ------------------------------------------------------------------------------

    async def _recover_forever(self) -> None:
        interval = self.settings.CACHE_RECOVERY_INTERVAL_SECONDS
        while True:
            await asyncio.sleep(interval)
            if self._state is CacheState.DEGRADED:
                await self.try_recover()

    async def try_recover(self) -> bool:
        """Probes Redis; on success applies pending invalidations and returns to Redis."""
        redis = self._redis
        if redis is None or self._state is not CacheState.DEGRADED:
            return False
        started = time.monotonic()
        try:
            await redis.ping()
            while self._pending:
                for target in self._pending.targets():
                    await redis.invalidate(target)
                    self._pending.discard(target)
        except BackendError as exc:
            logger.debug("Redis still unavailable: %s", exc)
            return False
        # No await between the last check of the pending set and the switch: an invalidation
        # arriving while we replayed was applied above, or is applied to Redis directly below.
        self._consecutive_failures = 0
        self._transition(CacheState.REDIS, "Redis answers again")
        dropped = await self._memory.clear()
        logger.info(
            "cache back on Redis after %.3fs; %d in-memory entries dropped",
            time.monotonic() - started,
            dropped,
        )
        return True
