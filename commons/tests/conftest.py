"""Fixtures: real redis-server processes started here, and the cache initialised on each backend.

- ``redis_server``: one private server for the whole session (fast); ``redis_url`` empties it
  before each test.
- ``own_redis``: a server of the test's own, for tests that stop, kill or reconfigure it.
- ``backend``: parametrized over ``memory`` and ``redis``; initialises the cache with the settings
  the test gets back, and closes it afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from commons.cache import CacheSettings, close_cache, init_cache
from commons.cache.settings import cache_settings
from commons.testing.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.command("FLUSHALL")
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def settings_for_tests(redis_url: str | None = None, **overrides: object) -> CacheSettings:
    """Settings for a test, independent of the environment the suite runs in."""
    values: dict[str, object] = {
        "CACHE_PREFIX": "test-cache",
        "CACHE_TTL_SECONDS": 60,
        "REDIS_URL": redis_url,
        "CACHE_RECOVERY_INTERVAL_SECONDS": 0.2,
        **overrides,
    }
    return CacheSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def make_settings() -> Callable[..., CacheSettings]:
    """``make_settings(redis_url=None, **overrides)``: settings for one test."""
    return settings_for_tests


@pytest.fixture(params=["memory", "redis"])
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def backend(
    backend_name: str, request: pytest.FixtureRequest
) -> AsyncIterator[CacheSettings]:
    """The cache, initialised on the parametrized backend; yields its settings."""
    url = request.getfixturevalue("redis_url") if backend_name == "redis" else None
    settings = settings_for_tests(url)
    await init_cache(settings)
    try:
        yield settings
    finally:
        await close_cache()


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees the cache variables of the shell that runs the suite."""
    for name in CacheSettings.model_fields:
        monkeypatch.delenv(name, raising=False)
    cache_settings.cache_clear()
    yield
    cache_settings.cache_clear()
