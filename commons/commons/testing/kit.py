"""Testing a service's caching: the cache on or off, on a private prefix, and what an answer was.

Nothing here reads or changes the environment: each helper passes its settings explicitly, so a
test never needs ``cache_settings.cache_clear()`` and never leaks into the next one; a service's
lifespan that the test runs (``with TestClient(app)``) gets the same settings from its
``init_cache()``::

    async with cache_for_test() as settings:                # memory, a prefix of its own
        ...
    async with cache_for_test(enabled=False):               # the cache off: handlers answer
        ...
    async with cache_for_test(redis_url=server.url):        # a private redis-server
        ...

    assert_hit(response)      # served from the cache (HIT, or a 304 from a stored entry)
    assert_miss(response)     # computed by the handler, through the cache
    assert_bypassed(response) # the cache took no part (no identity bound, caching disabled)

The pytest fixtures built on these are in ``commons.testing.pytest_plugin``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Protocol

from commons.cache.lifecycle import close_cache, init_cache, use_test_settings
from commons.cache.settings import CacheSettings

__all__ = [
    "assert_bypassed",
    "assert_hit",
    "assert_miss",
    "cache_for_test",
    "private_prefix",
]


class _Answer(Protocol):
    """What the assertions read: an httpx or a starlette ``TestClient`` response."""

    @property
    def headers(self) -> Mapping[str, str]: ...


def private_prefix() -> str:
    """A ``CACHE_PREFIX`` no other test uses (``test-<12 hex digits>``)."""
    return f"test-{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def cache_for_test(
    *,
    enabled: bool = True,
    redis_url: str | None = None,
    prefix: str | None = None,
    ttl_seconds: int = 60,
) -> AsyncIterator[CacheSettings]:
    """``init_cache()`` with these settings only (none from the environment), closed after.

    Args:
        enabled: ``False``: the cache takes no part; every request runs its handler.
        redis_url: A Redis to use (a private ``RedisServer``'s ``url``); ``None``: memory.
        prefix: ``CACHE_PREFIX``; a private one (:func:`private_prefix`) by default.
        ttl_seconds: ``CACHE_TTL_SECONDS``.

    Yields:
        The settings the cache runs with.
    """
    settings = CacheSettings(
        CACHE_ENABLED=enabled,
        CACHE_PREFIX=prefix or private_prefix(),
        CACHE_TTL_SECONDS=ttl_seconds,
        REDIS_URL=redis_url,
        CACHE_FAIL_FAST=redis_url is not None,
    )
    await init_cache(settings)
    # A lifespan the test runs calls init_cache() with no settings: it gets these.
    use_test_settings(settings)
    try:
        yield settings
    finally:
        use_test_settings(None)
        await close_cache()


def _served(response: _Answer) -> tuple[str, str]:
    return response.headers.get("x-fastapi-cache", ""), response.headers.get("cache-status", "")


def _fail(expected: str, response: _Answer) -> AssertionError:
    status, detail = _served(response)
    return AssertionError(
        f"expected {expected}; the answer says X-FastAPI-Cache: {status or '(none)'}, "
        f"Cache-Status: {detail or '(none)'}"
    )


def assert_hit(response: _Answer) -> None:
    """The answer came from a stored entry (a HIT, or a ``304`` for the client's copy)."""
    if _served(response)[0] != "HIT":
        raise _fail("a HIT", response)


def assert_miss(response: _Answer) -> None:
    """The handler computed the answer, and the cache took part (it may have stored it)."""
    if _served(response)[0] != "MISS":
        raise _fail("a MISS", response)


def assert_bypassed(response: _Answer) -> None:
    """The cache took no part: no identity bound, or caching disabled (``fwd=bypass``)."""
    status, detail = _served(response)
    if status or not detail.endswith("fwd=bypass"):
        raise _fail("a bypass (fwd=bypass)", response)
