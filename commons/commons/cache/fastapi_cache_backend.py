"""A fastapi-cache2 ``Backend`` that delegates to the current cache layer.

It lets the guide's own ``from fastapi_cache.decorator import cache`` keep working unchanged: same
keys, same stores, same fallback, and ``invalidate_namespace()`` reaches its entries too.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi_cache.backends import Backend

from commons.cache.layer import CacheLayer
from commons.cache.scope import InvalidationTarget

__all__ = ["LayerBackend"]


class LayerBackend(Backend):
    """fastapi-cache2 backend over whichever layer ``init_cache()`` installed last."""

    def __init__(self, layer: Callable[[], CacheLayer | None]) -> None:
        self._layer = layer

    async def get_with_ttl(self, key: str) -> tuple[int, bytes | None]:
        layer = self._layer()
        return (0, None) if layer is None else await layer.get_with_ttl(key)

    async def get(self, key: str) -> bytes | None:
        return (await self.get_with_ttl(key))[1]

    async def set(self, key: str, value: bytes, expire: int | None = None) -> None:
        layer = self._layer()
        if layer is not None:
            await layer.set(key, value, expire or layer.settings.CACHE_TTL_SECONDS)

    async def clear(self, namespace: str | None = None, key: str | None = None) -> int:
        layer = self._layer()
        if layer is None:
            return 0
        if key is not None:
            return await layer.delete(key)
        # fastapi-cache2 passes "{prefix}" or "{prefix}:{namespace}".
        _, separator, bare_namespace = (namespace or "").partition(":")
        if not separator:
            return await layer.clear()
        return await layer.invalidate(InvalidationTarget(bare_namespace))
