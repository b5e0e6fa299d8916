"""The Redis store: one server, Sentinel or Cluster, and what it reads and tracks with."""

from commons.cache.backends.redis.store import RedisStore

__all__ = ["RedisStore"]
