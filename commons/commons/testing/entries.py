"""What the cache stores, seen from a test: the payload under a key, and entries aged on purpose.

Testing only: these read and write the tier the current cache layer uses, bypassing its rules.
"""

from __future__ import annotations

import inspect

from fastapi import FastAPI
from fastapi.routing import APIRoute

from commons.cache.cached_route import PRODUCER
from commons.cache.entry import BODY, parse_any, route_fingerprint
from commons.cache.layer import CacheLayer
from commons.cache.lifecycle import current_layer
from commons.cache.scope import CacheScope

__all__ = [
    "TEST_FINGERPRINT",
    "age_entry",
    "fill",
    "route_fingerprint_of",
    "served",
    "stored_payload",
    "stored_value",
    "write_raw",
]


def _layer(layer: CacheLayer | None = None) -> CacheLayer:
    layer = layer or current_layer()
    if layer is None:
        raise RuntimeError("init_cache() has not run")
    return layer


async def stored_value(key: str, *, layer: CacheLayer | None = None) -> tuple[int, bytes | None]:
    """The remaining seconds and the raw stored bytes under exactly ``key``, in the tier the
    layer (by default the current one) uses, whatever their format, fingerprint or generation.
    Failures raise :class:`~commons.cache.errors.BackendError`."""
    layer = _layer(layer)
    read = await layer.store_in_use.read(key, layer.scope_of(key) or CacheScope(""))
    return read.remaining, read.value


async def stored_payload(key: str) -> tuple[int, bytes | None]:
    """The remaining seconds and the payload (the body, or the envelope) stored under ``key``."""
    remaining, raw = await stored_value(key)
    parsed = parse_any(raw) if raw is not None else None
    return remaining, parsed[2].payload if parsed is not None else None


async def age_entry(key: str, remaining_seconds: float) -> None:
    """Makes the entry under ``key`` as old as one with ``remaining_seconds`` left to live."""
    _, raw = await stored_value(key)
    if raw is None:
        raise LookupError(f"nothing is stored under {key!r}")
    await write_raw(key, raw, remaining_seconds)


async def write_raw(
    key: str, value: bytes, ttl_seconds: float, *, layer: CacheLayer | None = None
) -> None:
    """Writes exactly ``value`` under ``key`` for ``ttl_seconds`` in the tier the layer (by
    default the current one) uses, bypassing every rule (to age or forge an entry). Failures
    raise :class:`~commons.cache.errors.BackendError`."""
    layer = _layer(layer)
    scope = layer.scope_of(key) or CacheScope("")
    await layer.store_in_use.write(key, value, ttl_seconds, scope)


#: The fingerprint of the entries :func:`fill` writes and :func:`served` reads.
TEST_FINGERPRINT = b"7e577e577e577e57"


async def fill(
    key: str, body: bytes, ttl_seconds: int, *, fingerprint: bytes = TEST_FINGERPRINT
) -> bytes | None:
    """Reads ``key`` and stores ``body`` under it as a route would on a miss, by the layer's
    rules (fill token, generation, degraded cap); returns what was stored, if anything."""
    layer = _layer()
    lookup = await layer.lookup(key, fingerprint)
    if lookup is None:
        return None
    return await layer.store(
        key,
        body,
        kind=BODY,
        expire=ttl_seconds,
        stale_seconds=0,
        fingerprint=fingerprint,
        token=lookup.token,
    )


async def served(key: str) -> bytes | None:
    """The body a request for ``key`` would be served from right now (``None``: a miss)."""
    lookup = await _layer().lookup(key, TEST_FINGERPRINT)
    if lookup is None or lookup.value is None:
        return None
    return lookup.value.payload


def route_fingerprint_of(app: FastAPI, path: str, *, producer: str = PRODUCER) -> bytes:
    """The fingerprint ``@cache`` gives the entries of ``app``'s GET route at ``path`` (or, with
    ``producer="fastapi-cache2"``, fastapi-cache2's decorator through our backend)."""
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path == path and "GET" in (route.methods or ()):
            handler = inspect.unwrap(route.endpoint)
            return route_fingerprint(route, handler, producer=producer)
    raise LookupError(f"no GET route at {path}")
