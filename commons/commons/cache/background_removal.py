"""Removing an invalidation's old entries after it returned, bounded and observable.

An invalidation holds once its scope's generation is retired (one command, see
``backends/redis/store.py``): from then on no entry of the old generation is served or stored,
wherever it is read. Removing those entries only frees memory, and on Redis it costs a round trip
per page of an index (9.7 s for a million entries). So ``invalidate_namespace()`` returns once the
generation is retired, and the removal runs here, in the background:

- *Bounded.* At most :data:`MAX_RUNNING` removals run at once (each drains a few index leaves
  at a time, see ``backends/redis/index.py``), so a burst of invalidations never takes every pooled
  connection; at most :data:`MAX_WAITING` wait their turn, and the same target waiting twice is
  one removal. Past that a removal is given up: its entries stay until they expire, as they
  would if Redis had evicted the index (their generation is gone, so they are never served).
- *Observable.* :attr:`BackgroundRemovals.pending` (``cache_status().removals_pending``, the gauge
  ``commons_cache_removals_pending``) says how many are waiting or running; each finished removal
  reports its entries (``commons_cache_invalidated_entries_total``), a given-up one is counted in
  :attr:`BackgroundRemovals.given_up`.
- *Never in the way of a shutdown.* :meth:`BackgroundRemovals.aclose` cancels what runs and drops
  what waits: each step of a removal is atomic on the server, so a cancelled one leaves every
  remaining entry indexed (the next invalidation of its scope finds it) and unreachable.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable

__all__ = ["MAX_RUNNING", "MAX_WAITING", "BackgroundRemovals"]

logger = logging.getLogger("commons.cache")

#: Removals running at once.
MAX_RUNNING = 1
#: Removals waiting for their turn; past this a new one is given up (its entries expire).
MAX_WAITING = 10_000

#: How long closing waits for cancelled removals to end.
CLOSE_WAIT_SECONDS = 1.0
#: How often closing cancels again a removal that has not ended yet.
CANCEL_AGAIN_SECONDS = 0.01

Removal = Callable[[], Awaitable[int]]


class BackgroundRemovals:
    """Runs removals of invalidated entries in the background, a few at a time.

    Args:
        on_removed: Told ``(namespace, entries)`` when a removal finished.
        on_pending: Told the number of removals waiting or running whenever it changes.
        max_running: Removals running at once.
        max_waiting: Removals waiting at most; more are given up.
    """

    def __init__(
        self,
        *,
        on_removed: Callable[[str, int], None],
        on_pending: Callable[[int], None],
        max_running: int = MAX_RUNNING,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self._on_removed = on_removed
        self._on_pending = on_pending
        self._max_running = max_running
        self._max_waiting = max_waiting
        self._waiting: OrderedDict[Hashable, tuple[str, Removal]] = OrderedDict()
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        #: Removals given up because too many were waiting.
        self.given_up = 0

    @property
    def pending(self) -> int:
        """Removals waiting or running."""
        return len(self._waiting) + len(self._running)

    def start(self, target: Hashable, namespace: str, removal: Removal) -> None:
        """Runs ``removal`` (of ``target``'s entries, in ``namespace``) once a turn is free.

        A removal of the same target already waiting covers this one: it has not begun, so it
        will find every entry this one would.
        """
        if self._closed or target in self._waiting:
            return
        if len(self._waiting) >= self._max_waiting:
            self.given_up += 1
            # Said once (then at DEBUG): a burst gives up many, and each only leaves memory used.
            log = logger.warning if self.given_up == 1 else logger.debug
            log(
                "removal of invalidated entries given up: %d removals were waiting (the "
                "invalidation holds; its entries are left to expire)",
                self._max_waiting,
            )
            return
        self._waiting[target] = (namespace, removal)
        self._run_next()
        self._on_pending(self.pending)

    def _run_next(self) -> None:
        while self._waiting and len(self._running) < self._max_running:
            _, (namespace, removal) = self._waiting.popitem(last=False)
            task = asyncio.get_running_loop().create_task(
                self._run(namespace, removal), name="cache-removal"
            )
            self._running.add(task)
            task.add_done_callback(self._finished)

    async def _run(self, namespace: str, removal: Removal) -> None:
        try:
            removed = await removal()
        except Exception:
            # A removal only frees memory: whatever stopped it, the entries expire by themselves.
            logger.exception("removal of invalidated entries failed; they are left to expire")
            return
        self._on_removed(namespace, removed)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not self._closed:
            self._run_next()
        self._on_pending(self.pending)

    async def wait(self) -> None:
        """Returns once nothing waits or runs (tests, benchmarks, a command-line tool)."""
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def aclose(self) -> None:
        """Cancels what runs and drops what waits. Safe to call twice."""
        self._closed = True
        self._waiting.clear()
        running = set(self._running)
        deadline = asyncio.get_running_loop().time() + CLOSE_WAIT_SECONDS
        while running:
            # Again and again: redis-py can swallow a cancellation that lands inside a command
            # (it reconnects and goes on), and a removal's next page would then run, through a
            # client that reconnects by itself, until the whole target is removed.
            for task in running:
                task.cancel()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                logger.warning("a removal of invalidated entries outlived close_cache()")
                break
            _, running = await asyncio.wait(running, timeout=min(CANCEL_AGAIN_SECONDS, left))
        self._on_pending(self.pending)
