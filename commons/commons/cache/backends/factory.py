"""The one place that builds stores from the settings (the service, the CLI and the benchmarks).

A Redis store gets the client of the configured topology with its time budget
(``redis/connection.py``) and picks the object of that topology from it (``redis/topology.py``);
with ``REDIS_CLUSTER=auto`` it also gets the means to switch to the cluster client when its first
contact finds a cluster node.
"""

from __future__ import annotations

from commons.cache.backends.base import OperatorCommands
from commons.cache.backends.memory import MemoryStore
from commons.cache.backends.redis import RedisStore
from commons.cache.backends.redis.connection import cluster_client_factory, create_redis_client
from commons.cache.backends.redis.near import NearCache
from commons.cache.backends.redis.operations import RedisOperations
from commons.cache.events import CacheEvents
from commons.cache.settings import CacheSettings

__all__ = ["memory_store", "operator_commands", "redis_store"]


def redis_store(settings: CacheSettings, *, serving: CacheEvents | None = None) -> RedisStore:
    """The Redis store of ``REDIS_URL`` (and the topology settings), under ``CACHE_PREFIX``.

    Nothing is sent to Redis until the store is used.

    Args:
        serving: The events of a service that answers requests with this store: it then gets
            the near cache (unless ``CACHE_NEAR_CACHE`` is false), which reports to them. The
            CLI and the benchmarks' inspection clients go without.

    Raises:
        ValueError: REDIS_URL is not set.
    """
    near = None
    if serving is not None and settings.CACHE_NEAR_CACHE:
        near = NearCache(
            max_entries=settings.CACHE_NEAR_CACHE_MAX_ENTRIES,
            max_bytes=settings.CACHE_NEAR_CACHE_MAX_BYTES,
            events=serving,
            max_age_seconds=settings.CACHE_NEAR_CACHE_MAX_AGE_SECONDS,
            verify_share=settings.CACHE_NEAR_CACHE_VERIFY_SHARE,
        )
    return RedisStore(
        create_redis_client(settings),
        settings.CACHE_PREFIX,
        cluster_factory=cluster_client_factory(settings),
        near_cache=near,
    )


def memory_store(settings: CacheSettings) -> MemoryStore:
    """The in-memory store, bounded by ``CACHE_MEMORY_MAX_ENTRIES`` and ``..._MAX_BYTES``."""
    return MemoryStore(settings.CACHE_MEMORY_MAX_ENTRIES, max_bytes=settings.CACHE_MEMORY_MAX_BYTES)


def operator_commands(settings: CacheSettings) -> OperatorCommands:
    """The operator commands on the settings' Redis (what ``commons-cache`` runs).

    Raises:
        ValueError: REDIS_URL is not set.
    """
    return RedisOperations(redis_store(settings))
