"""Single-flight: concurrent misses of one key run the handler once per process.

The first request to miss a key becomes its leader and computes; the others wait on the leader's
future, up to a bounded time, and then compute themselves rather than hang. A leader that raises
passes the same exception to every waiter and nothing is cached. A leader that is cancelled (its
client went away) releases the waiters at once: they compute for themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

T = TypeVar("T")


class _LeaderGone(Exception):
    """The leader was cancelled before it had a result."""


class SingleFlight(Generic[T]):
    """Coalesces concurrent computations of the same key."""

    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    async def run(self, key: str, compute: Callable[[], Awaitable[T]], wait_seconds: float) -> T:
        """Runs ``compute`` unless another call for ``key`` already does, then shares its result."""
        flight = self._flights.get(key)
        if flight is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(flight), wait_seconds)
            except (TimeoutError, _LeaderGone):
                return await compute()
        flight = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        try:
            result = await compute()
        except asyncio.CancelledError:
            flight.set_exception(_LeaderGone())
            raise
        except BaseException as exc:
            flight.set_exception(exc)
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
