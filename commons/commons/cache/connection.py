"""Builds the Redis client from the settings, with an explicit time budget.

redis-py's asyncio client otherwise waits 5 s for each reply and retries with backoff, so a
black-holed Redis would cost a request many seconds. Here every connection attempt and every
command is bounded by the settings' timeouts, and only a dropped connection is retried, once and
at once: that covers a pooled connection that a restarted server closed, without multiplying the
wait when the server is unreachable.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from commons.cache.settings import CacheSettings

__all__ = ["create_redis_client"]


def create_redis_client(settings: CacheSettings) -> Redis:
    """A client for ``settings.REDIS_URL`` with the configured timeouts and retry policy."""
    if settings.REDIS_URL is None:
        raise ValueError("REDIS_URL is not set")
    return Redis.from_url(
        settings.REDIS_URL,
        socket_connect_timeout=settings.REDIS_CONNECT_TIMEOUT_SECONDS,
        socket_timeout=settings.REDIS_SOCKET_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,)),
        retry_on_timeout=False,
        health_check_interval=0,
        decode_responses=False,
    )
