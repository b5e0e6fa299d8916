"""Single-flight: concurrent misses of one key run the handler once per process.

The first request to miss a key becomes its *leader* and computes; the others wait on the leader's
future, up to a bounded time, and then compute themselves rather than hang.

- A leader that raises passes the same exception to every waiter. (The decorator's leaders never
  raise: an exception is the computing request's own, and its waiters compute again, see
  ``fill.py``.)
- A leader that is cancelled (its client went away) does not strand its waiters: they wake at once
  and elect a new leader among themselves, so the handler still runs once for all of them.
- The wait is bounded by one deadline per request (``CACHE_LOCK_TIMEOUT_SECONDS``) however many
  leaders come and go; past it a waiter computes on its own.
- :meth:`SingleFlight.run_if_idle` is for background refreshes (stale-while-revalidate): it
  computes only when nobody computes the key already, and never waits.

Everything runs on the event loop's thread, and a flight is registered before the leader's first
``await``, so checking for a flight and starting one cannot interleave with another request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

T = TypeVar("T")


class _LeaderGone(Exception):
    """The leader was cancelled (or interrupted) before it had a result."""


class SingleFlight(Generic[T]):
    """Coalesces concurrent computations of the same key."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, key: object) -> bool:
        return key in self._flights

    async def run(
        self,
        key: Hashable,
        compute: Callable[[], Awaitable[T]],
        wait_seconds: float,
        compute_after_waiting: Callable[[], Awaitable[T]] | None = None,
    ) -> T:
        """Runs ``compute`` unless another call for ``key`` already does, then shares its result.

        Args:
            key: What is computed; calls with equal keys share one computation.
            compute: Produces the result; called at most once by this call.
            wait_seconds: Longest this call waits for other leaders before computing itself.
            compute_after_waiting: What this call computes once it waited ``wait_seconds`` in
                vain (``compute`` by default): a computation that would wait again (for
                another replica's lock, say) must not.

        Returns:
            The leader's result (this call's own when it leads or gave up waiting).

        Raises:
            Exception: Whatever the leader raised.
        """
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            flight = self._flights.get(key)
            if flight is None:
                return await self._lead(key, compute)
            if deadline is None:
                deadline = loop.time() + wait_seconds
            try:
                return await asyncio.wait_for(
                    asyncio.shield(flight), max(deadline - loop.time(), 0.0)
                )
            except _LeaderGone:
                continue  # the first waiter to wake leads the next flight
            except TimeoutError:
                if flight.done():
                    raise  # the leader's own TimeoutError, shared like any other exception
                return await (compute_after_waiting or compute)()

    async def run_if_idle(self, key: Hashable, compute: Callable[[], Awaitable[T]]) -> T | None:
        """Runs ``compute`` as leader of ``key``, or returns ``None`` at once if one computes."""
        if key in self._flights:
            return None
        return await self._lead(key, compute)

    async def _lead(self, key: Hashable, compute: Callable[[], Awaitable[T]]) -> T:
        flight: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        try:
            result = await compute()
        except Exception as exc:
            flight.set_exception(exc)
            raise
        except BaseException:
            # Cancelled (client gone) or interrupted: no result to share; waiters elect anew.
            flight.set_exception(_LeaderGone())
            raise
        else:
            flight.set_result(result)
            return result
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            # Marks the exception as retrieved when nobody was waiting for it.
            if flight.done() and not flight.cancelled():
                flight.exception()
