"""pytest fixtures for a service's cache tests; enable with ``-p commons.testing.pytest_plugin``
(``addopts`` in ``pyproject.toml``) or ``pytest_plugins = ["commons.testing.pytest_plugin"]`` in
the top ``conftest.py``. The async fixtures need pytest-asyncio.

- ``memory_cache``: the cache on memory under a private prefix for one test; its settings.
- ``redis_cache``: the cache on a private ``redis-server`` (one per session, started on a free
  port, nothing on disk) under a private prefix for one test; its settings.
- ``no_cache``: the cache initialised but disabled: every request runs its handler.
- ``cache_redis_server``: that private server itself (``url``, ``command()``, ``kill()``...).

None of them reads or changes the environment (see ``commons.testing.kit``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from commons.cache.settings import CacheSettings
from commons.testing.kit import cache_for_test
from commons.testing.redis_server import RedisServer

__all__ = ["cache_redis_server", "memory_cache", "no_cache", "redis_cache"]


@pytest.fixture(scope="session")
def cache_redis_server() -> Iterator[RedisServer]:
    """A private ``redis-server`` for the session, stopped at its end."""
    with RedisServer() as server:
        yield server


@pytest_asyncio.fixture
async def memory_cache() -> AsyncIterator[CacheSettings]:
    """The cache on memory, under a private prefix, for one test."""
    async with cache_for_test() as settings:
        yield settings


@pytest_asyncio.fixture
async def redis_cache(cache_redis_server: RedisServer) -> AsyncIterator[CacheSettings]:
    """The cache on the session's private ``redis-server``, under a private prefix."""
    async with cache_for_test(redis_url=cache_redis_server.url) as settings:
        yield settings


@pytest_asyncio.fixture
async def no_cache() -> AsyncIterator[CacheSettings]:
    """The cache off: every request runs its handler, nothing is stored."""
    async with cache_for_test(enabled=False) as settings:
        yield settings
