"""``commons.testing.kit``: the cache for one test, on or off, whatever the environment says, and
assertions that read how an answer was served."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from commons.cache import cache, cache_status, close_cache, init_cache
from commons.testing import current_layer
from commons.testing.kit import (
    assert_bypassed,
    assert_hit,
    assert_miss,
    cache_for_test,
)
from commons.testing.redis_server import RedisServer

from _support import client_for

ACME = {"X-Test-Tenant": "acme"}
MD5_OF_NOTHING = "d41d8cd98f00b204e9800998ecf8427e"


@pytest.fixture
def app(make_identity_app: Callable[[], FastAPI]) -> FastAPI:
    app = make_identity_app()

    @app.get("/config")
    @cache(namespace="config")
    async def config() -> dict[str, str]:
        return {"theme": "dark"}

    return app


async def get_twice(app: FastAPI, headers: dict[str, str]) -> list[httpx.Response]:
    async with client_for(app) as client:
        return [await client.get("/config", headers=headers) for _ in range(2)]


async def test_the_cache_for_a_test_is_memory_under_a_private_prefix_whatever_the_environment(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHE_ENABLED", "false")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("CACHE_PREFIX", "production")

    async with cache_for_test() as settings:
        miss, hit = await get_twice(app, ACME)
        backend = cache_status().backend

    assert backend == "memory"
    assert settings.CACHE_PREFIX.startswith("test-")
    assert_miss(miss)
    assert_hit(hit)


async def test_the_cache_off_for_a_test_lets_every_request_through(app: FastAPI) -> None:
    async with cache_for_test(enabled=False):
        first, second = await get_twice(app, ACME)

    assert_bypassed(first)
    assert_bypassed(second)


async def test_the_cache_for_a_test_on_a_private_redis_server(
    app: FastAPI, redis_server: RedisServer
) -> None:
    async with cache_for_test(redis_url=redis_server.url) as settings:
        miss, hit = await get_twice(app, ACME)
        backend = cache_status().backend

    assert backend == "redis"
    assert_miss(miss)
    assert_hit(hit)
    entry = f"{settings.CACHE_PREFIX}:config:tenant_acme:/config:{MD5_OF_NOTHING}"
    assert redis_server.command("EXISTS", entry) == b":1\r\n"


@pytest.mark.parametrize("enabled", [True, False], ids=["memory", "off"])
async def test_a_lifespan_run_by_the_test_keeps_the_test_s_cache(
    make_identity_app: Callable[[], FastAPI], monkeypatch: pytest.MonkeyPatch, enabled: bool
) -> None:
    # `with TestClient(app)` (or asgi-lifespan) runs the service's lifespan, whose init_cache()
    # reads the environment: the test's own settings must hold all the same.
    monkeypatch.setenv("CACHE_PREFIX", "production")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await init_cache()
        yield
        await close_cache()

    app = make_identity_app()
    app.router.lifespan_context = lifespan
    runs: list[int] = []

    @app.get("/config")
    @cache(namespace="config")
    async def config() -> dict[str, int]:
        runs.append(1)
        return {"runs": len(runs)}

    async with (
        cache_for_test(enabled=enabled) as settings,
        app.router.lifespan_context(app),
        client_for(app) as client,
    ):
        answers = [await client.get("/config", headers=ACME) for _ in range(2)]
        prefix = current_layer_prefix()

    assert prefix == settings.CACHE_PREFIX
    if enabled:
        assert_miss(answers[0])
        assert_hit(answers[1])
        assert len(runs) == 1
    else:
        assert [a.json() for a in answers] == [{"runs": 1}, {"runs": 2}]
        assert_bypassed(answers[1])


def current_layer_prefix() -> str | None:
    layer = current_layer()
    return None if layer is None else layer.prefix


async def test_a_failed_assertion_says_how_the_answer_was_served(app: FastAPI) -> None:
    async with cache_for_test():
        miss, _ = await get_twice(app, ACME)
        [unbound, _] = await get_twice(app, {})

    with pytest.raises(AssertionError, match=r"expected a HIT; .*X-FastAPI-Cache: MISS"):
        assert_hit(miss)
    with pytest.raises(AssertionError, match=r"expected a MISS; .*fwd=bypass"):
        assert_miss(unbound)
    with pytest.raises(AssertionError, match="expected a bypass"):
        assert_bypassed(miss)
