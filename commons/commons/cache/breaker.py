"""The layer's state and its circuit breaker: when to leave Redis, and the probe that comes back.

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

A Redis that answers, but just under ``REDIS_SOCKET_TIMEOUT_SECONDS`` (overloaded, or behind a
slow link), costs every request nearly that timeout without ever failing. With
``CACHE_SLOW_REDIS_SECONDS`` set, a read or a fill slower than that counts as a failure too, once
such calls in a row span that much time (calls held up together by this process's own blocked
event loop are not Redis' fault), and the probe's ``PING`` must answer within it. It is off by
default: a process starved of CPU (throttled at its limit) sees its own calls as slow as well,
and an open breaker weakens what other replicas' invalidations guarantee to
``CACHE_DEGRADED_TTL_SECONDS``.

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

Every store call the layer makes goes through :meth:`Breaker.attempt`, the one place that times
it, absorbs its :class:`~commons.cache.errors.BackendError`, counts it and lets the breaker judge
it. What the layer does once Redis answers again (kept invalidations first) is the probe the layer
hands to :meth:`Breaker.start_probing`; the breaker only runs it, once per interval, while
degraded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from enum import Enum
from typing import Final, Protocol, TypeVar

from commons.cache.backends.base import CacheStore, LocalStore, StoredRead
from commons.cache.errors import (
    BackendBusyError,
    BackendError,
    BackendRejectedError,
    BackendUnavailableError,
    CacheUnavailableError,
)
from commons.cache.events import CacheEvents
from commons.cache.settings import CacheSettings
from commons.cache.status import CacheState

__all__ = ["FAILED", "Breaker", "Failed", "KeptForRedis"]

logger = logging.getLogger("commons.cache")

T = TypeVar("T")

#: The operations judged by their time too (see ``CACHE_SLOW_REDIS_SECONDS``): a request's read
#: and fill, one command each. An invalidation or a lock may wait on purpose (for a pooled
#: connection, for the lock's holder).
_JUDGED_BY_TIME = frozenset({"get", "set"})

#: What a refused operation is called in ``cache_status().reason``.
_REFUSED_WHAT = {"get": "reads", "set": "writes", "lock": "locks"}


class Failed(Enum):
    """The result of a store call that failed: its error was absorbed (counted, judged)."""

    FAILED = "failed"


#: The one :class:`Failed` value, which :meth:`Breaker.attempt` returns for a failed call.
FAILED: Final = Failed.FAILED


class KeptForRedis(Protocol):
    """What was kept for Redis while it could not be reached (``removals.py``): applied before
    anything is read from Redis, at start-up and on every recovery."""

    async def open_journal(self) -> None:
        """Takes back what earlier processes kept on disk."""

    async def replay(self, redis: CacheStore) -> int:
        """Applies what is kept; how many items were kept (raises BackendError)."""

    async def forget_applied(self) -> None:
        """Lets go of what was applied (on disk too)."""

    async def release_all(self) -> None:
        """Frees what the outage's bookkeeping let go of."""

    def keep_a_flush_nobody_vouches_for(self, exc: BackendError) -> bool:
        """Keeps a flush when a start cannot vouch for what Redis holds; whether it did."""


def _start_up_failure(exc: BackendError) -> str:
    """Why the first contact failed: an outage, or Redis refusing a command the cache needs (a
    permission its user lacks), which lasts until an operator grants it."""
    # The error's own text says what failed ("Redis unavailable: ..."): said once.
    if isinstance(exc, BackendRejectedError) and "NOPERM" in str(exc):
        return f"at start-up, {exc} (the cache needs it: a permission, not an outage)"
    if isinstance(exc, BackendRejectedError):
        return f"at start-up, {exc} (not an outage)"
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


class Breaker:
    """The layer's state (``redis``, ``degraded``, ``memory``, ``disabled``), the store it
    implies, and the circuit breaker that moves it (see the module docstring).

    The hit path reads :attr:`active`, :attr:`enabled`, :attr:`consecutive_failures` and
    :attr:`refused` as plain attributes: decided once per change, not on every request.
    """

    def __init__(
        self,
        settings: CacheSettings,
        events: CacheEvents,
        *,
        redis: CacheStore | None,
        memory: LocalStore,
    ) -> None:
        self._settings = settings
        self._events = events
        self._redis = redis
        self._memory = memory
        #: Failures in a row that showed Redis unreachable.
        self.consecutive_failures = 0
        #: The operation Redis refuses while it answers (OOM, read-only), or None.
        self.refused: str | None = None
        if not settings.CACHE_ENABLED:
            initial, reason = CacheState.DISABLED, "CACHE_ENABLED is false"
        elif redis is None:
            initial, reason = CacheState.MEMORY, "REDIS_URL is not set"
        else:
            initial, reason = CacheState.DEGRADED, "not connected yet"
        self.state = initial
        self.reason = reason
        self.since = datetime.now(UTC)
        # Comparing the state with a CacheState member on every request also costs an object on
        # Python 3.11, whose enum class finds its members through __getattr__. No change leads
        # to or from DISABLED.
        #: Whether the cache takes part in requests at all.
        self.enabled = initial is not CacheState.DISABLED
        #: The store reads and writes go to: Redis while the breaker is closed, else memory.
        self.active: CacheStore = memory
        #: A read or write slower than this counts as a failure (0: none does).
        self._slow_seconds = settings.CACHE_SLOW_REDIS_SECONDS
        #: When the slow calls of the current run of failures began (``time.perf_counter()``).
        self._slow_since: float | None = None
        self._probe_task: asyncio.Task[None] | None = None

    # -- the state machine -----------------------------------------------------------------

    def transition(self, state: CacheState, reason: str) -> None:
        """Moves to ``state`` for ``reason``, logging and counting a change (once, not per call)."""
        if state is self.state and reason == self.reason:
            return
        changed = state is not self.state
        if changed:
            self.refused = None
        self.state, self.reason, self.since = state, reason, datetime.now(UTC)
        redis = self._redis
        self.active = redis if state is CacheState.REDIS and redis is not None else self._memory
        self.log_state()
        if changed:
            self._events.state_changed(state.value)

    def log_state(self) -> None:
        troubled = self.state is CacheState.DEGRADED or self.refused is not None
        level = logging.WARNING if troubled else logging.INFO
        _state_logger(level).log(level, "cache backend: %s (%s)", self.state.value, self.reason)

    def degrade(self, reason: str) -> None:
        """Opens the breaker: from Redis to the in-memory tier, whatever the failure count."""
        if self.state is CacheState.REDIS:
            self.transition(CacheState.DEGRADED, reason)

    def record_success(self, store: CacheStore, operation: str) -> None:
        if store is not self._redis:
            return
        self.consecutive_failures = 0
        self._slow_since = None
        if self.refused == operation and self.state is CacheState.REDIS:
            self.refused = None
            what = _REFUSED_WHAT.get(operation, operation)
            self.transition(CacheState.REDIS, f"Redis accepts {what} again")

    def record_slow(self, took: float) -> None:
        """Counts a read or write that Redis answered, but slower than
        ``CACHE_SLOW_REDIS_SECONDS``, as a failure: only a fast answer resets the count.

        The breaker opens only once the slow calls in a row also span that much time: calls
        that were all waiting while this process's own event loop was held (a handler's blocking
        work) end at the same moment, slow by no fault of Redis.
        """
        now = time.perf_counter()
        if self._slow_since is None:
            self._slow_since = now
        self.consecutive_failures += 1
        if (
            self.consecutive_failures >= self._settings.CACHE_FAILURE_THRESHOLD
            and now - self._slow_since >= self._slow_seconds
        ):
            self.degrade(
                f"Redis answers too slowly: {self.consecutive_failures} calls in a row took "
                f"over {self._slow_seconds:g} s (the last {took:.3f} s; "
                "CACHE_SLOW_REDIS_SECONDS)"
            )

    def record_failure(
        self, store: CacheStore, exc: BackendError, namespace: str, operation: str
    ) -> None:
        """Counts a failed call and judges it: a busy pool, a refusal, or an outage."""
        self._events.backend_error(namespace, operation)
        if store is not self._redis:
            logger.error("in-memory cache failed: %s", exc)
            return
        if isinstance(exc, BackendBusyError):
            # This process has every pooled connection in use (a burst): a miss, not an outage.
            return
        if not isinstance(exc, BackendUnavailableError):
            # Redis answered but refused (OOM, read-only): it is reachable, so stay on Redis.
            if self.refused is None and self.state is CacheState.REDIS:
                self.refused = operation
                what = _REFUSED_WHAT.get(operation, "commands")
                self.transition(CacheState.REDIS, f"Redis refuses {what}: {exc}")
            return
        self.consecutive_failures += 1
        if self.consecutive_failures >= self._settings.CACHE_FAILURE_THRESHOLD:
            self.degrade(str(exc))

    async def attempt(
        self,
        store: CacheStore,
        call: Awaitable[T],
        *,
        namespace: str,
        operation: str,
        timed: bool = False,
    ) -> T | Failed:
        """Awaits one store call: its result, or :data:`FAILED` once its error was counted and
        judged. With ``timed``, a call that reached Redis is timed (``events.timed``)."""
        timed = timed and store is not self._memory
        started = time.perf_counter()
        try:
            result = await call
        except BackendError as exc:
            if timed:
                self._events.timed(namespace, operation, time.perf_counter() - started)
            self.record_failure(store, exc, namespace, operation)
            return FAILED
        # A near-cache hit sent no command (see StoredRead.from_memory): not a Redis operation.
        if store is self._redis and not (isinstance(result, StoredRead) and result.from_memory):
            took = time.perf_counter() - started
            if timed:
                self._events.timed(namespace, operation, took)
            if took > self._slow_seconds > 0 and operation in _JUDGED_BY_TIME:
                self.record_slow(took)
                return result
        if self.consecutive_failures or self.refused is not None:
            self.record_success(store, operation)
        return result

    # -- start-up and the recovery probe ----------------------------------------------------

    async def connect(self, kept: KeptForRedis) -> None:
        """Connects to Redis if configured, then probes it while degraded; raises only when
        ``CACHE_FAIL_FAST`` demands it."""
        redis = self._redis
        if self.state is not CacheState.DEGRADED or redis is None:
            self.log_state()
            return
        await kept.open_journal()
        try:
            await redis.ping()
            # What the journal kept from a stop or crash during an outage, before any read.
            await kept.replay(redis)
        except BackendError as exc:
            if self._settings.CACHE_FAIL_FAST:
                raise CacheUnavailableError(
                    f"REDIS_URL is set but Redis did not answer ({exc}); "
                    "CACHE_FAIL_FAST=true refuses to start"
                ) from exc
            reason = _start_up_failure(exc)
            if kept.keep_a_flush_nobody_vouches_for(exc):
                reason += (
                    "; every entry of the prefix is removed once Redis answers, before it is "
                    "read (CACHE_FLUSH_AFTER_DEGRADED_START)"
                )
            self.transition(CacheState.DEGRADED, reason)
        else:
            self.transition(CacheState.REDIS, "connected")
            await kept.forget_applied()
        self.start_probing(lambda: self.try_recover(kept))

    async def try_recover(self, kept: KeptForRedis) -> bool:
        """Probes Redis; on success applies what was kept for it and returns to Redis.

        Only the recovery probe calls it while requests are served; they never wait for it.
        """
        redis = self._redis
        if redis is None or self.state is not CacheState.DEGRADED:
            return False
        started = time.perf_counter()
        try:
            await redis.ping()
        except BackendError as exc:
            logger.debug("Redis still unavailable: %s", exc)
            return False
        took = time.perf_counter() - started
        if took > self._slow_seconds > 0:
            logger.debug("Redis still too slow: PING took %.3f s", took)
            return False
        try:
            applied = await kept.replay(redis)
        except BackendRejectedError as exc:
            # Redis answers but refuses what the invalidations kept for it are applied with (an
            # ACL or a renamed command): an operator's matter, not an outage, and said as such.
            self.transition(
                CacheState.DEGRADED,
                f"Redis answers again but refused the invalidations kept for it: {exc} "
                "(they are applied before Redis is read again; a permission, not an outage)",
            )
            return False
        except BackendError as exc:
            logger.debug("Redis still unavailable: %s", exc)
            return False
        if self.state is not CacheState.DEGRADED:
            return False
        # No await from the last check of the pending set to the switch: an invalidation arriving
        # during the replay was applied by it, and any later one goes to Redis directly.
        dropped = len(self._memory)
        # Half-open: one more failure opens the breaker again.
        self.consecutive_failures = self._settings.CACHE_FAILURE_THRESHOLD - 1
        self._slow_since = None
        self.transition(
            CacheState.REDIS,
            f"Redis answers again; {applied} pending invalidations applied, "
            f"{dropped} in-memory entries dropped",
        )
        await self._memory.clear()
        await kept.forget_applied()
        # What the outage's set let go of is freed by its later calls, and now there are none.
        await kept.release_all()
        return True

    def start_probing(self, probe: Callable[[], Awaitable[bool]]) -> None:
        """Runs ``probe`` every ``CACHE_RECOVERY_INTERVAL_SECONDS`` while degraded."""
        self._probe_task = asyncio.create_task(self._probe_forever(probe), name="cache-recovery")

    async def _probe_forever(self, probe: Callable[[], Awaitable[bool]]) -> None:
        interval = self._settings.CACHE_RECOVERY_INTERVAL_SECONDS
        reported = False
        # A cancellation redis-py turns into a timeout is sent again by stop_probing until this
        # ends.
        while True:
            await asyncio.sleep(interval)
            if self.state is not CacheState.DEGRADED:
                continue
            try:
                await probe()
            except Exception:
                # The probe must outlive any surprise, or the layer would never return to Redis.
                if not reported:
                    reported = True
                    logger.exception("cache recovery probe failed unexpectedly")

    async def stop_probing(self) -> None:
        """Stops the probe. Safe to call twice."""
        task, self._probe_task = self._probe_task, None
        # Cancelled again until it ends: redis-py can swallow a cancellation that arrives while
        # it reconnects (its timeout on disconnecting turns it into an error the probe absorbs).
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if task is not None and not task.cancelled():
            task.exception()  # seen
