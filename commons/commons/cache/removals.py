"""Removals (deletions, invalidations, flushes) on every tier, and what is kept for Redis.

An invalidation (``invalidate``, ``delete``, ``clear``) always applies to the in-memory tier (on a
cache disabled by ``CACHE_ENABLED=false`` it does nothing: nothing was stored). If it
cannot be applied to Redis, it is kept (:class:`~commons.cache.pending.PendingInvalidations`) and
the layer degrades at once, whatever the failure count or the kind of failure, so nothing is read
from Redis until the kept invalidations have been applied there. Other replicas that still reach
Redis are unaffected; the README's Guarantees section says what holds for them during an outage.
With ``CACHE_INVALIDATION_JOURNAL`` each kept item is also written to disk before the removal
returns (``journal.py``), and the layer's start applies what earlier processes left there before
anything is read from Redis: a stop or a crash during the outage loses nothing. Without
a journal, a process that starts while Redis does not answer keeps a flush of the whole prefix
(``CACHE_FLUSH_AFTER_DEGRADED_START``): it may follow one that stopped during the same outage
with invalidations nobody can now name.
Behind Sentinel, an invalidation that no replica confirmed (the store's ``WAIT``) fails the same
way: the master that acknowledged it may be replaced by a replica without it, so it is kept and
applied again, on whichever server is then the master, before Redis is read again. The master
did answer, though: while that is all the layer is degraded for, later removals still go to
Redis before they return (and are kept as well when unconfirmed), so other processes see them
at once rather than at the next probe's replay.

Once started, an invalidation runs to its end even if its caller is cancelled (a client that hung
up, a timeout around the call): applied or kept, never dropped half-way. A burst of invalidations
that finds every pooled connection in use waits for one (up to a command timeout): a busy process
is no outage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any

from commons.cache.backends.base import CacheStore, LocalStore
from commons.cache.background_removal import BackgroundRemovals
from commons.cache.breaker import Breaker
from commons.cache.errors import BackendError, BackendUnavailableError, BackendUnconfirmedError
from commons.cache.events import CacheEvents
from commons.cache.journal import InvalidationJournal
from commons.cache.pending import PendingInvalidations, PendingItem
from commons.cache.scope import CacheScope, InvalidationTarget, tag_namespace
from commons.cache.settings import CacheSettings
from commons.cache.status import CacheState

__all__ = ["INVALIDATION_CLOCK_MAX_NAMESPACES", "InvalidationClock", "Removals"]

logger = logging.getLogger("commons.cache")


#: Namespaces (tags' included) whose last invalidation the clock remembers, at most: tags are
#: meant to be one per item, so a service may invalidate millions of distinct ones.
INVALIDATION_CLOCK_MAX_NAMESPACES = 16_384


class InvalidationClock:
    """This process's invalidations as a clock: a fill stores its value only if the clock of its
    namespace has not moved since its read (the layer's fill tokens).

    Bounded: past :data:`INVALIDATION_CLOCK_MAX_NAMESPACES` it forgets every namespace at once
    and counts as an invalidation of everything at that moment, so a fill read before it is
    refused (a miss), as it would have been had its namespace been invalidated: the clock only
    ever errs towards refusing a fill.
    """

    def __init__(self) -> None:
        self._clock = 0
        self._invalidated_at: dict[str, int] = {}
        self._cleared_at = 0

    def __len__(self) -> int:
        """The namespaces remembered."""
        return len(self._invalidated_at)

    def mark(self, namespace: str | None) -> None:
        """Records an invalidation of ``namespace`` (``None``: of everything)."""
        self._clock += 1
        if namespace is None:
            self._cleared_at = self._clock
        elif (
            len(self._invalidated_at) >= INVALIDATION_CLOCK_MAX_NAMESPACES
            and namespace not in self._invalidated_at
        ):
            self._invalidated_at.clear()
            self._cleared_at = self._clock
        else:
            self._invalidated_at[namespace] = self._clock

    def stamp(self, scope: CacheScope) -> int:
        """The clock of the last invalidation in this process of the scope's namespace or of
        one of its tags (a tag's targets are namespaced by :func:`tag_namespace`)."""
        invalidated_at = self._invalidated_at.get(scope.namespace, 0)
        for tag in scope.tags:
            tagged_at = self._invalidated_at.get(tag_namespace(tag), 0)
            if tagged_at > invalidated_at:
                invalidated_at = tagged_at
        # Not max(): it would build an iterator on every request.
        return invalidated_at if invalidated_at > self._cleared_at else self._cleared_at


class Removals:
    """Applies removals to the in-memory tier and to Redis, and keeps for Redis (in memory, and
    on disk with a journal) what could not reach it (see the module docstring)."""

    def __init__(
        self,
        settings: CacheSettings,
        events: CacheEvents,
        breaker: Breaker,
        *,
        redis: CacheStore | None,
        memory: LocalStore,
    ) -> None:
        self._settings = settings
        self._events = events
        self._breaker = breaker
        self._redis = redis
        self._memory = memory
        #: Bumped by every removal, before it is applied anywhere.
        self.clock = InvalidationClock()
        self.pending = PendingInvalidations(settings.CACHE_PENDING_INVALIDATIONS_MAX)
        journal_dir = settings.CACHE_INVALIDATION_JOURNAL
        self._journal = (
            InvalidationJournal(Path(journal_dir), settings.CACHE_PREFIX)
            if journal_dir is not None and redis is not None and settings.CACHE_ENABLED
            else None
        )
        # Removals on their way to Redis, which outlive a cancelled caller (see _on_redis).
        self._removals: set[asyncio.Task[int]] = set()
        #: When the breaker degraded because an invalidation went unconfirmed, while the master
        #: answered (``None``: it did not): the degradation that later removals still go to
        #: Redis through (see the module docstring).
        self._unconfirmed_since: datetime | None = None
        # Old entries of invalidations that already hold, removed after they returned.
        self.background = BackgroundRemovals(
            on_removed=events.removed_in_background,
            on_pending=events.removals_pending,
        )

    # -- what is kept ----------------------------------------------------------------------

    async def open_journal(self) -> None:
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
            self.pending.add_item(item)
        if items:
            logger.warning("invalidation journal: %d kept invalidations to apply", len(items))

    def keep_a_flush_nobody_vouches_for(self, exc: BackendError) -> bool:
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
            or not self._settings.CACHE_FLUSH_AFTER_DEGRADED_START
            or not isinstance(exc, BackendUnavailableError)
        ):
            return False
        self.pending.add_everything()
        self._events.start_flush_kept()
        return True

    async def forget_applied(self) -> None:
        """The journal keeps only what is still pending (nothing, once a replay succeeded)."""
        if self._journal is not None:
            await self._journal.rewrite(self.pending.items)

    async def _keep(self, item: PendingItem) -> None:
        """Keeps a removal for Redis: in memory at once, on disk before returning."""
        self.pending.add_item(item)
        if self._journal is not None:
            await self._journal.append(item)

    # -- applying --------------------------------------------------------------------------

    async def delete(self, key: str, scope: CacheScope) -> int:
        """Removes the entry under ``key`` from every tier."""
        return await self._remove(
            scope.namespace,
            lambda store: store.delete(key, scope),
            (key, scope),
            operation="delete",
            what="a deletion",
        )

    async def invalidate(self, target: InvalidationTarget) -> int:
        """Makes the invalidation of ``target`` hold on every tier; the in-memory tier's count
        of entries removed."""
        removed = await self._remove(
            target.namespace,
            lambda store: self._invalidate_on(store, target),
            target,
            operation="invalidate",
            what="an invalidation",
        )
        if self._breaker.enabled:
            self._events.invalidated(target.reported_namespace, removed)
        return removed

    async def clear(self) -> int:
        """Removes every entry of the prefix from every tier."""
        return await self._remove(
            None, lambda store: store.clear(), None, operation="clear", what="a flush"
        )

    async def _invalidate_on(self, store: CacheStore, target: InvalidationTarget) -> int:
        removed, removal = await store.invalidate_effective(target)
        if removal is not None:
            self.background.start(target, target.reported_namespace, removal)
        return removed

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
        if not self._breaker.enabled:
            return 0
        self.clock.mark(namespace)
        removed = await removal(self._memory)
        if self._redis is None:
            return removed
        if self._breaker.state is not CacheState.REDIS and not self._master_answers():
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
                self._events.backend_error(namespace, operation)
                was_on_redis = self._breaker.state is CacheState.REDIS
                self._breaker.degrade(f"{what} could not reach Redis: {exc}")
                unconfirmed = isinstance(exc, BackendUnconfirmedError)
                if unconfirmed and (was_on_redis or self._master_answers()):
                    self._unconfirmed_since = self._breaker.since
                elif not unconfirmed:
                    self._unconfirmed_since = None
                await self._keep(item)
                return 0

        task = asyncio.ensure_future(apply())
        self._removals.add(task)
        task.add_done_callback(self._removal_done)
        return await asyncio.shield(task)

    def _master_answers(self) -> bool:
        """Whether the layer is degraded only because an invalidation went unconfirmed (the
        same degradation since: a recovery and a new outage end it)."""
        return (
            self._unconfirmed_since is not None
            and self._breaker.state is CacheState.DEGRADED
            and self._breaker.since == self._unconfirmed_since
        )

    def _removal_done(self, task: asyncio.Task[int]) -> None:
        self._removals.discard(task)
        if not task.cancelled():
            task.exception()  # seen, even when its caller gave up waiting

    async def release_all(self) -> None:
        """Frees what the outage's kept set let go of (once Redis is back, at once)."""
        await self.pending.release_all()

    async def replay(self, redis: CacheStore) -> int:
        """Applies what is kept to ``redis``; how many items were kept when it began.

        Raises:
            BackendError: Redis failed; what was not applied stays kept.
        """
        applied = len(self.pending)
        await self.pending.apply_to(redis)
        return applied

    async def settled(self) -> None:
        """Returns once every removal under way (their callers may have given up) has been
        applied to Redis or kept for it."""
        while self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)

    async def aclose(self) -> None:
        """Waits for the removals under way, stops the background ones, closes the journal."""
        # Each ends within the Redis timeouts; cut short, one could be neither applied nor kept
        # (a process shutting down still owes Redis the invalidations it acknowledged).
        await self.settled()
        # Unlike the invalidations above, these only free memory: cancelled, not waited for.
        await self.background.aclose()
        if self._journal is not None:
            # What is still kept stays on disk for the next process.
            await self._journal.aclose()
