"""The store contract every backend implements.

A store only ever sees keys and bytes. It knows nothing of FastAPI, of the decorator or of how keys
are built; the scope passed with each write is all it needs to find the entries an invalidation
targets. Stores raise :class:`~commons.cache.errors.BackendError` subclasses and nothing else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from commons.cache.scope import CacheScope, InvalidationTarget

__all__ = ["CacheStore"]


class CacheStore(ABC):
    """A key-value store of bytes with expiry, indexed by scope for invalidation."""

    #: Short name, reported by ``cache_status()``.
    name: str

    @abstractmethod
    async def get_with_ttl(self, key: str) -> tuple[int, bytes | None]:
        """The value under ``key`` and its remaining time to live in whole seconds (0 if absent)."""

    @abstractmethod
    async def set(self, key: str, value: bytes, ttl_seconds: int, scope: CacheScope) -> None:
        """Stores ``value`` under ``key`` for ``ttl_seconds``, indexed under ``scope``."""

    @abstractmethod
    async def delete(self, key: str) -> int:
        """Removes one key; returns how many were removed (0 or 1)."""

    @abstractmethod
    async def invalidate(self, target: InvalidationTarget) -> int:
        """Removes every entry under ``target``; returns how many entries were removed."""

    @abstractmethod
    async def clear(self) -> int:
        """Removes every key of this store's prefix; returns how many were removed."""

    @abstractmethod
    async def add_if_absent(self, key: str, value: bytes, ttl_ms: int) -> bool:
        """Stores ``value`` only when ``key`` is absent (a lock); True when it was stored."""

    @abstractmethod
    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        """Removes ``key`` only while it still holds ``value`` (releasing one's own lock)."""

    @abstractmethod
    async def ping(self) -> None:
        """Returns when the store answers; raises BackendError otherwise."""

    @abstractmethod
    async def aclose(self) -> None:
        """Releases connections. Safe to call more than once."""
