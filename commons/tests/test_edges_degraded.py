"""Stale-while-revalidate keeps its meaning while Redis is unavailable.

Degraded, the cache serves from its in-memory tier and keeps entries there only briefly
(``CACHE_DEGRADED_TTL_SECONDS``). An entry just computed is still fresh for its route's ``expire``
seconds: it is a HIT, not a STALE answer that recomputes on every request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import FastAPI

from commons.cache import CacheSettings, cache, cache_status, close_cache, init_cache
from commons.testing.redis_server import RedisServer, free_port

ACME = {"X-Test-Tenant": "acme"}
FAST_FAILING = {"REDIS_SOCKET_TIMEOUT_SECONDS": 0.2, "REDIS_CONNECT_TIMEOUT_SECONDS": 0.2}


class Prices:
    def __init__(self) -> None:
        self.calls = 0


def build_app(make_identity_app: Callable[[], FastAPI], prices: Prices) -> FastAPI:
    app = make_identity_app()

    @app.get("/prices")
    @cache(namespace="prices", expire=60, stale_ttl=300)
    async def get_prices() -> dict[str, int]:
        prices.calls += 1
        return {"calls": prices.calls}

    @app.get("/other")
    @cache(namespace="other")
    async def other() -> dict[str, bool]:
        return {"ok": True}

    return app


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture(params=["unreachable-at-start-up", "killed-while-serving"])
async def degraded_app(
    request: pytest.FixtureRequest,
    make_settings: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
) -> AsyncIterator[tuple[httpx.AsyncClient, Prices]]:
    """The app with Redis configured but down, and the cache degraded to its memory tier."""
    prices = Prices()
    app = build_app(make_identity_app, prices)
    server: RedisServer | None = None
    if request.param == "unreachable-at-start-up":
        url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    else:
        server = request.getfixturevalue("own_redis")
        url = server.url
    try:
        await init_cache(make_settings(url, **FAST_FAILING))
        async with client_for(app) as client:
            if server is not None:
                assert cache_status().backend == "redis"
                server.kill()
                # Other requests meet the outage first and open the breaker.
                for _ in range(10):
                    if cache_status().backend == "degraded":
                        break
                    await client.get("/other", headers=ACME)
            assert cache_status().backend == "degraded"
            yield client, prices
    finally:
        await close_cache()


async def test_stale_ttl_routes_hit_while_degraded_and_compute_once(
    degraded_app: tuple[httpx.AsyncClient, Prices],
) -> None:
    """``@cache(expire=60, stale_ttl=300)`` with Redis down: 10 GETs in a row run the handler
    once; the first is a MISS, the nine others are HITs (never STALE)."""
    client, prices = degraded_app

    responses = [await client.get("/prices", headers=ACME) for _ in range(10)]

    assert [r.headers["X-FastAPI-Cache"] for r in responses] == ["MISS"] + ["HIT"] * 9
    assert [r.json() for r in responses] == [{"calls": 1}] * 10
    assert prices.calls == 1
