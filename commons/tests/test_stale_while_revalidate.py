"""stale_ttl: an entry past its freshness is served at once (X-FastAPI-Cache: STALE) while one
background refresh recomputes it; the next request gets the fresh value.

Stale-while-revalidate keeps its meaning while Redis is unavailable.

Degraded, the cache serves from its in-memory tier and keeps entries there only briefly
(``CACHE_DEGRADED_TTL_SECONDS``). An entry just computed is still fresh for its route's ``expire``
seconds: it is a HIT, not a STALE answer that recomputes on every request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi_cache.decorator import cache as fastapi_cache_decorator

from commons.cache import (
    CacheSettings,
    cache,
    cache_status,
    close_cache,
    init_cache,
    tenant_cache_key_builder,
)
from commons.testing import entries
from commons.testing.entries import stored_value
from commons.testing.redis_server import RedisServer, free_port

from _support import acme_get_scope, client_for

TENANT = {"X-Test-Tenant": "acme"}
KEY = f"test-cache:prices:tenant_acme:/prices:{hashlib.md5(b'').hexdigest()}"
EXPIRE, STALE_TTL = 60, 300


class Prices:
    def __init__(self) -> None:
        self.version = 1
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def compute(self) -> dict[str, int]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("upstream down")
        return {"version": self.version}


@pytest.fixture
def prices() -> Prices:
    return Prices()


@pytest.fixture
def app(make_identity_app: Callable[[], FastAPI], prices: Prices) -> FastAPI:
    app = make_identity_app()

    @app.get("/prices")
    @cache(namespace="prices", expire=EXPIRE, stale_ttl=STALE_TTL, client_max_age=3600)
    async def get_prices() -> dict[str, int]:
        return await prices.compute()

    return app


async def age_entry(remaining_seconds: int) -> None:
    """Makes the stored entry as old as one with ``remaining_seconds`` left to live."""
    await entries.age_entry(KEY, remaining_seconds)


async def send_raw(app: FastAPI, body_sent: asyncio.Event) -> list[dict[str, Any]]:
    """Runs one GET /prices through the ASGI app; ``body_sent`` is set once the body is out."""
    scope = acme_get_scope("/prices")
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.body":
            body_sent.set()

    await app(scope, receive, send)
    return messages


async def test_a_fresh_entry_is_a_hit_whose_max_age_is_its_freshness_not_the_stale_window(
    backend: CacheSettings, client: httpx.AsyncClient, prices: Prices
) -> None:
    miss = await client.get("/prices", headers=TENANT)
    hit = await client.get("/prices", headers=TENANT)

    assert (miss.headers["x-fastapi-cache"], hit.headers["x-fastapi-cache"]) == ("MISS", "HIT")
    assert miss.headers["cache-control"] == f"private, max-age={EXPIRE}"
    reusable_for = int(hit.headers["cache-control"].rpartition("=")[2]) - int(hit.headers["age"])
    assert EXPIRE - 2 <= reusable_for <= EXPIRE
    assert prices.calls == 1


async def test_the_entry_lives_for_its_freshness_plus_the_stale_window(
    backend: CacheSettings, client: httpx.AsyncClient
) -> None:
    await client.get("/prices", headers=TENANT)
    remaining, _ = await stored_value(KEY)

    assert EXPIRE + STALE_TTL - 2 <= remaining <= EXPIRE + STALE_TTL


async def test_a_stale_entry_is_served_and_the_next_request_gets_the_refreshed_value(
    backend: CacheSettings, client: httpx.AsyncClient, prices: Prices
) -> None:
    await client.get("/prices", headers=TENANT)
    await age_entry(STALE_TTL - 10)
    prices.version = 2

    stale = await client.get("/prices", headers=TENANT)
    fresh = await client.get("/prices", headers=TENANT)

    assert stale.headers["x-fastapi-cache"] == "STALE"
    assert stale.json() == {"version": 1}
    # Not reusable at all: max-age is the age it is sent with (RFC 9111 counts from Age).
    assert stale.headers["cache-control"] == f"private, max-age={stale.headers['age']}"
    assert fresh.headers["x-fastapi-cache"] == "HIT"
    assert fresh.json() == {"version": 2}
    assert prices.calls == 2


async def test_the_stale_answer_is_sent_before_the_refresh_finishes(
    backend: CacheSettings, app: FastAPI, client: httpx.AsyncClient, prices: Prices
) -> None:
    await client.get("/prices", headers=TENANT)
    await age_entry(STALE_TTL - 10)
    prices.version, prices.gate = 2, asyncio.Event()
    body_sent = asyncio.Event()

    request = asyncio.create_task(send_raw(app, body_sent))
    # The gate is closed, so the refresh cannot finish: the body goes out before it does.
    await asyncio.wait_for(body_sent.wait(), 5)
    while prices.calls < 2:  # noqa: ASYNC110 - then the refresh calls the handler
        await asyncio.sleep(0.01)
    assert not request.done()
    prices.gate.set()
    messages = await request

    start, body = messages[0], messages[1]
    assert (b"x-fastapi-cache", b"STALE") in start["headers"]
    assert json.loads(body["body"]) == {"version": 1}


async def test_concurrent_stale_requests_trigger_exactly_one_refresh(
    backend: CacheSettings, client: httpx.AsyncClient, prices: Prices
) -> None:
    await client.get("/prices", headers=TENANT)
    await age_entry(STALE_TTL - 10)
    prices.version, prices.gate = 2, asyncio.Event()

    first = asyncio.create_task(client.get("/prices", headers=TENANT))
    while prices.calls < 2:  # noqa: ASYNC110 - the refresh has started once it called the handler
        await asyncio.sleep(0.01)
    others = await asyncio.gather(*(client.get("/prices", headers=TENANT) for _ in range(10)))
    prices.gate.set()
    await first
    fresh = await client.get("/prices", headers=TENANT)

    assert {r.headers["x-fastapi-cache"] for r in others} == {"STALE"}
    assert {r.content for r in others} == {b'{"version":1}'}
    assert prices.calls == 2
    assert fresh.json() == {"version": 2}


async def test_a_failed_refresh_keeps_serving_the_stale_entry(
    backend: CacheSettings, client: httpx.AsyncClient, prices: Prices
) -> None:
    await client.get("/prices", headers=TENANT)
    await age_entry(STALE_TTL - 10)
    prices.fail = True

    first = await client.get("/prices", headers=TENANT)
    second = await client.get("/prices", headers=TENANT)

    assert [first.status_code, second.status_code] == [200, 200]
    assert {first.headers["x-fastapi-cache"], second.headers["x-fastapi-cache"]} == {"STALE"}
    assert second.json() == {"version": 1}


async def test_a_stale_entry_really_expires_after_its_freshness(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI], prices: Prices
) -> None:
    app = make_identity_app()

    @app.get("/quick")
    @cache(namespace="quick", expire=1, stale_ttl=30)
    async def quick() -> dict[str, int]:
        return await prices.compute()

    async with client_for(app) as client:
        await client.get("/quick", headers=TENANT)
        prices.version = 2
        await asyncio.sleep(1.1)
        stale = await client.get("/quick", headers=TENANT)
        fresh = await client.get("/quick", headers=TENANT)

    assert (stale.headers["x-fastapi-cache"], stale.json()) == ("STALE", {"version": 1})
    assert (fresh.headers["x-fastapi-cache"], fresh.json()) == ("HIT", {"version": 2})


async def test_an_entry_of_the_fastapi_cache2_decorator_is_a_miss_not_a_stale_answer(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI], prices: Prices
) -> None:
    """The other decorator's entry carries another fingerprint: a miss, computed and stored."""
    guide_app, our_app = make_identity_app(), make_identity_app()

    @guide_app.get("/prices")
    @fastapi_cache_decorator(
        namespace="prices", expire=EXPIRE, key_builder=tenant_cache_key_builder
    )
    async def guide_prices() -> dict[str, int]:
        return {"version": 7}

    @our_app.get("/prices")
    @cache(namespace="prices", expire=EXPIRE, stale_ttl=STALE_TTL)
    async def our_prices() -> dict[str, int]:
        return await prices.compute()

    for app in (guide_app, our_app):
        async with client_for(app) as client:
            response = await client.get("/prices", headers=TENANT)

    assert response.headers["x-fastapi-cache"] == "MISS"
    assert response.json() == {"version": 1}
    assert prices.calls == 1


# -- stale_ttl while Redis is unavailable ----------------------------------------------------------


ACME = {"X-Test-Tenant": "acme"}
FAST_FAILING = {"REDIS_SOCKET_TIMEOUT_SECONDS": 0.2, "REDIS_CONNECT_TIMEOUT_SECONDS": 0.2}


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
