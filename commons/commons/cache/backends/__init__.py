"""Storage backends: bytes in, bytes out. Policy (fallback, keys, HTTP) lives above them."""

from commons.cache.backends.base import CacheStore
from commons.cache.backends.memory import MemoryStore
from commons.cache.backends.redis import RedisStore

__all__ = ["CacheStore", "MemoryStore", "RedisStore"]
