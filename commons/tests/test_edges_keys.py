"""Keys: two requests for different resources never share an entry, whatever their paths hold.

A path segment may carry any character once decoded (``?``, ``#``, ``\\``, ``%``). Two paths that
decode to different text are different resources, so they must get different keys, on both
decorators. An ordinary path keeps exactly the documented key format.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi_cache.decorator import cache as guide_cache
from redis.asyncio import Redis

from commons.cache import CacheSettings, cache, close_cache, init_cache, tenant_cache_key_builder

ACME = {"X-Test-Tenant": "acme"}

#: Pairs of (request path, the name it decodes to) whose names differ.
DISTINCT_PATHS = {
    "question-mark": (("/items/a%3Fb", "a?b"), ("/items/a%253Fb", "a%3Fb")),
    "hash": (("/items/a%23b", "a#b"), ("/items/a%2523b", "a%23b")),
    "backslash": (("/items/a%5Cb", "a\\b"), ("/items/a%255Cb", "a%5Cb")),
}
DECORATORS = ["commons_cache", "guide_cache"]


def build_app(make_identity_app: Callable[[], FastAPI], decorator: str) -> FastAPI:
    """``GET /items/{name:path}`` cached in namespace ``items``; it echoes the decoded name."""
    app = make_identity_app()
    cached: Callable[[Any], Any] = (
        cache(namespace="items")
        if decorator == "commons_cache"
        else guide_cache(namespace="items", key_builder=tenant_cache_key_builder)
    )

    @app.get("/items/{name:path}")
    @cached
    async def item(name: str) -> dict[str, str]:
        return {"name": name}

    return app


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.parametrize("decorator", DECORATORS)
@pytest.mark.parametrize("paths", DISTINCT_PATHS.values(), ids=list(DISTINCT_PATHS))
async def test_paths_that_decode_differently_never_share_an_entry(
    backend: CacheSettings,
    make_identity_app: Callable[[], FastAPI],
    decorator: str,
    paths: tuple[tuple[str, str], tuple[str, str]],
) -> None:
    """The second path is a different resource: a miss answered with its own name."""
    (first_path, first_name), (second_path, second_name) = paths
    app = build_app(make_identity_app, decorator)

    async with client_for(app) as client:
        first = await client.get(first_path, headers=ACME)
        second = await client.get(second_path, headers=ACME)
        first_again = await client.get(first_path, headers=ACME)

    assert first.status_code == second.status_code == 200
    assert (first.headers["X-FastAPI-Cache"], first.json()) == ("MISS", {"name": first_name})
    assert (second.headers["X-FastAPI-Cache"], second.json()) == ("MISS", {"name": second_name})
    assert (first_again.headers["X-FastAPI-Cache"], first_again.json()) == (
        "HIT",
        {"name": first_name},
    )


@pytest.mark.parametrize("decorator", DECORATORS)
async def test_an_ordinary_path_keeps_the_documented_key_format(
    redis_url: str,
    make_settings: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
    decorator: str,
) -> None:
    """``/items/plain?x=1`` is stored under ``{prefix}:items:tenant_acme:/items/plain:{md5}``."""
    settings = make_settings(redis_url)
    await init_cache(settings)
    try:
        app = build_app(make_identity_app, decorator)
        async with client_for(app) as client:
            response = await client.get("/items/plain?x=1", headers=ACME)
    finally:
        await close_cache()

    md5 = hashlib.md5(b"x=1").hexdigest()
    expected = f"{settings.CACHE_PREFIX}:items:tenant_acme:/items/plain:{md5}"
    raw = Redis.from_url(redis_url)
    try:
        entries = {key.decode() async for key in raw.scan_iter(count=1000) if b":#" not in key}
    finally:
        await raw.aclose()
    assert response.json() == {"name": "plain"}
    assert entries == {expected}
