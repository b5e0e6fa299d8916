"""One computation across replicas: a short lock in Redis around a miss (``distributed_lock``).

The holder computes and stores; the others poll for the entry while the lock is held, take the
lock over if it is released without an entry (the holder failed), and compute on their own once
``CACHE_LOCK_TIMEOUT_SECONDS`` has passed. The lock is ``SET NX PX`` with a random token under a
key the layer mints (``layer.lock_key``); only the holder's token releases it, and it expires by
itself after the same time if its holder dies. Without a shared store (the memory backend, or
Redis unavailable) the request just computes: single-flight still holds per process.

A holder that is cancelled (its client went away, a deadline around the call) still releases the
lock at once, even when cancelled while the lock is being taken (Redis took it, its reply was
on its way), so the others take over instead of waiting for it to expire. An anyio deadline
(``fail_after``, a task group: what middleware uses) cancels every ``await`` again until its scope
is left, the release in a ``finally`` included; so the release runs shielded, bounded by one
connect and one reply timeout of Redis.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from commons.cache.layer import CacheLayer

__all__ = ["under_replica_lock"]

T = TypeVar("T")

#: How often a replica waiting for another's computation looks for its entry.
_POLL_SECONDS = 0.02


async def under_replica_lock(
    layer: CacheLayer,
    key: str,
    compute: Callable[[], Awaitable[T]],
    stored: Callable[[], Awaitable[T | None]],
    *,
    wait: bool = True,
    wait_seconds: float | None = None,
) -> T | None:
    """``compute()`` under the replicas' lock for ``key``, or what another replica stored.

    Args:
        compute: Computes and stores the entry.
        stored: The fresh entry stored right now, if any.
        wait: Wait for another replica's computation; when false, give up at once (``None``) if
            another replica holds the lock (a background refresh someone else already runs).
        wait_seconds: The longest to wait for it (``CACHE_LOCK_TIMEOUT_SECONDS`` by default:
            a request that waited already waits only what is left of it).

    Returns:
        The outcome; ``None`` only when ``wait`` is false and another replica holds the lock.
    """
    lock_key = layer.lock_key(key)
    token = secrets.token_bytes(16)
    lock_seconds = layer.settings.CACHE_LOCK_TIMEOUT_SECONDS
    lock_ms = max(int(lock_seconds * 1000), 1)
    acquired = await _try_lock(layer, lock_key, token, lock_ms)
    if acquired is False:
        if not wait:
            return None
        wait_for = lock_seconds if wait_seconds is None else wait_seconds
        found, acquired = await _wait_for_holder(layer, lock_key, token, lock_ms, wait_for, stored)
        if found is not None:
            return found
    try:
        if acquired:
            # The previous holder may have stored the entry just before releasing the lock.
            found = await stored()
            if found is not None:
                return found
        return await compute()
    finally:
        if acquired:
            await _release(layer, lock_key, token)


async def _try_lock(layer: CacheLayer, lock_key: str, token: bytes, lock_ms: int) -> bool | None:
    """``layer.try_lock``; cancelled while it is under way (Redis may have taken the lock, its
    reply not yet read), the lock is released before the cancellation goes on: only this token
    releases it, so one never taken is left as it is."""
    try:
        return await layer.try_lock(lock_key, token, lock_ms)
    except BaseException:
        await _release(layer, lock_key, token)
        raise


async def _release(layer: CacheLayer, lock_key: str, token: bytes) -> None:
    """Releases the lock even while the holder is being cancelled (see the module docstring)."""
    settings = layer.settings
    bound = settings.REDIS_CONNECT_TIMEOUT_SECONDS + settings.REDIS_SOCKET_TIMEOUT_SECONDS
    with anyio.move_on_after(bound, shield=True):
        await layer.unlock(lock_key, token)


async def _wait_for_holder(
    layer: CacheLayer,
    lock_key: str,
    token: bytes,
    lock_ms: int,
    wait_seconds: float,
    stored: Callable[[], Awaitable[T | None]],
) -> tuple[T | None, bool | None]:
    """Polls while another replica holds the lock, for at most ``wait_seconds``: (its stored
    entry, None) when it appears, else (None, whether this replica took the lock over) once it
    is released or the wait is over."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    while loop.time() < deadline:
        await asyncio.sleep(_POLL_SECONDS)
        found = await stored()
        if found is not None:
            return found, None
        acquired = await _try_lock(layer, lock_key, token, lock_ms)
        if acquired is not False:
            return None, acquired
    return None, False
