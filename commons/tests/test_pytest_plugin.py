"""``commons.testing.pytest_plugin``: the fixtures a service's tests use (this suite loads the
plugin as a service does, with ``-p commons.testing.pytest_plugin``)."""

from __future__ import annotations

from commons.cache import CacheSettings, cache_status


async def test_memory_cache_is_the_memory_backend_under_a_private_prefix(
    memory_cache: CacheSettings,
) -> None:
    assert cache_status().backend == "memory"
    assert memory_cache.CACHE_PREFIX.startswith("test-")


async def test_redis_cache_is_a_private_redis_server_under_a_private_prefix(
    redis_cache: CacheSettings,
) -> None:
    assert cache_status().backend == "redis"
    assert redis_cache.REDIS_URL is not None
    assert redis_cache.REDIS_URL.startswith("redis://127.0.0.1:")


async def test_no_cache_is_the_cache_disabled(no_cache: CacheSettings) -> None:
    assert cache_status().backend == "disabled"
    assert not no_cache.CACHE_ENABLED
