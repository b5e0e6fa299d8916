"""PrivateCacheControlMiddleware keeps every cached answer out of shared caches."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi_cache.decorator import cache as guide_cache

from commons.cache import (
    CacheSettings,
    PrivateCacheControlMiddleware,
    cache,
    global_cache_key_builder,
    init_cache,
    tenant_cache_key_builder,
)
from commons.testing.kit import assert_bypassed
from commons.utilities.context import RequestContextMiddleware, set_tenant_id

from _support import client_for


async def bind_tenant(request: Request) -> None:
    set_tenant_id(request.headers.get("X-Test-Tenant"))


def build_app(*, private_middleware: bool) -> FastAPI:
    app = FastAPI(dependencies=[Depends(bind_tenant)])

    @app.get("/guide")
    @guide_cache(expire=60, namespace="guide", key_builder=tenant_cache_key_builder)
    async def guide_route() -> dict[str, str]:
        return {"config": "tenant data"}

    @app.get("/ours")
    @cache(expire=60, namespace="ours")
    async def our_route() -> dict[str, str]:
        return {"config": "tenant data"}

    @app.get("/catalogue")
    @cache(expire=60, namespace="catalogue", key_builder=global_cache_key_builder)
    async def catalogue() -> list[str]:
        return ["standard"]

    @app.get("/uncached")
    async def uncached() -> JSONResponse:
        return JSONResponse({"public": True}, headers={"Cache-Control": "max-age=60"})

    app.add_middleware(RequestContextMiddleware)
    if private_middleware:
        app.add_middleware(PrivateCacheControlMiddleware)
    return app


@pytest.fixture
async def client(backend: CacheSettings) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(private_middleware=True)
    async with client_for(app) as http:
        yield http


async def test_the_guide_decorator_alone_lets_shared_caches_store_tenant_answers(
    backend: CacheSettings,
) -> None:
    async with client_for(build_app(private_middleware=False)) as http:
        response = await http.get("/guide", headers={"X-Test-Tenant": "a"})
    assert response.headers["cache-control"] == "max-age=60"
    assert "vary" not in response.headers


async def test_with_the_middleware_guide_answers_are_private_revalidated_and_vary_on_authorization(
    client: httpx.AsyncClient,
) -> None:
    for expected in ("MISS", "HIT"):
        response = await client.get("/guide", headers={"X-Test-Tenant": "a"})
        assert response.headers["x-fastapi-cache"] == expected
        assert response.headers["cache-control"] == "private, no-cache"
        assert response.headers["vary"] == "Authorization"


async def test_with_the_middleware_a_guide_hit_still_says_its_freshness_in_cache_status(
    client: httpx.AsyncClient,
) -> None:
    await client.get("/guide", headers={"X-Test-Tenant": "a"})
    hit = await client.get("/guide", headers={"X-Test-Tenant": "a"})

    assert re.fullmatch(r"test-cache; hit; ttl=(59|60)", hit.headers["cache-status"])


async def test_answers_of_our_decorator_are_left_as_they_are(client: httpx.AsyncClient) -> None:
    response = await client.get("/ours", headers={"X-Test-Tenant": "a"})
    assert response.headers["cache-control"] == "private, no-cache"
    assert response.headers["vary"] == "Authorization"


async def test_global_answers_of_our_decorator_stay_public_and_revalidated(
    client: httpx.AsyncClient,
) -> None:
    for expected in ("MISS", "HIT"):
        response = await client.get("/catalogue")
        assert response.headers["x-fastapi-cache"] == expected
        assert response.headers["cache-control"] == "no-cache"
        assert "vary" not in response.headers


async def test_responses_that_did_not_go_through_the_cache_are_untouched(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/uncached")
    assert response.headers["cache-control"] == "max-age=60"
    assert "vary" not in response.headers


# -- one rule for a client's Cache-Control on both decorators -------------------------------------


def build_counting_app() -> tuple[FastAPI, list[int]]:
    """``/guide`` and ``/ours`` behind the middleware, each answering how many times a handler
    ran so far: a recomputed answer differs from the stored one."""
    app = FastAPI(dependencies=[Depends(bind_tenant)])
    runs = [0]

    @app.get("/guide")
    @guide_cache(expire=60, namespace="guide", key_builder=tenant_cache_key_builder)
    async def guide_route() -> dict[str, int]:
        runs[0] += 1
        return {"run": runs[0]}

    @app.get("/ours")
    @cache(expire=60, namespace="ours")
    async def our_route() -> dict[str, int]:
        runs[0] += 1
        return {"run": runs[0]}

    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(PrivateCacheControlMiddleware)
    return app, runs


DIRECTIVES = ["no-cache", "no-store", "max-age=0, no-cache", "No-Store"]


@pytest.mark.parametrize("path", ["/guide", "/ours"])
@pytest.mark.parametrize("directive", DIRECTIVES)
async def test_by_default_no_client_forces_recomputation_on_either_decorator(
    backend: CacheSettings, path: str, directive: str
) -> None:
    app, runs = build_counting_app()
    async with client_for(app) as http:
        await http.get(path, headers={"X-Test-Tenant": "a"})
        forced = [
            await http.get(path, headers={"X-Test-Tenant": "a", "Cache-Control": directive})
            for _ in range(3)
        ]

    assert [(r.headers.get("x-fastapi-cache"), r.json()) for r in forced] == [
        ("HIT", {"run": 1})
    ] * 3
    assert runs == [1]


@pytest.mark.parametrize("path", ["/guide", "/ours"])
@pytest.mark.parametrize("directive", DIRECTIVES)
async def test_honouring_clients_recomputes_and_stores_on_either_decorator(
    backend: CacheSettings,
    make_settings: Callable[..., CacheSettings],
    path: str,
    directive: str,
) -> None:
    await init_cache(make_settings(backend.REDIS_URL, CACHE_HONOR_CLIENT_NO_CACHE=True))
    app, _ = build_counting_app()
    async with client_for(app) as http:
        await http.get(path, headers={"X-Test-Tenant": "a"})
        forced = await http.get(path, headers={"X-Test-Tenant": "a", "Cache-Control": directive})
        after = await http.get(path, headers={"X-Test-Tenant": "a"})

    assert (forced.headers.get("x-fastapi-cache"), forced.json()) == ("MISS", {"run": 2})
    assert (after.headers.get("x-fastapi-cache"), after.json()) == ("HIT", {"run": 2})


async def test_with_the_middleware_guide_answers_carry_cache_status_too(
    client: httpx.AsyncClient,
) -> None:
    miss = await client.get("/guide", headers={"X-Test-Tenant": "a"})
    hit = await client.get("/guide", headers={"X-Test-Tenant": "a"})
    ours = await client.get("/ours", headers={"X-Test-Tenant": "a"})

    assert miss.headers["cache-status"] == "test-cache; fwd=miss"
    assert hit.headers["cache-status"] == "test-cache; hit; ttl=60"
    assert ours.headers["cache-status"] == "test-cache; fwd=miss; stored"  # its own, kept


async def test_a_guide_request_with_no_identity_says_bypass_as_ours_does(
    client: httpx.AsyncClient,
) -> None:
    # The fastapi-cache2 decorator labels the uncached answer MISS itself: a fail-closed request
    # would read as a miss, and the testing kit's assert_bypassed would refuse it.
    guide = await client.get("/guide")
    ours = await client.get("/ours")
    later = await client.get("/guide", headers={"X-Test-Tenant": "a"})

    for response in (guide, ours):
        assert response.json() == {"config": "tenant data"}
        assert "x-fastapi-cache" not in response.headers
        assert response.headers["cache-status"] == "test-cache; fwd=bypass"
        assert_bypassed(response)
    assert later.headers["x-fastapi-cache"] == "MISS"  # the note is the request's alone


async def test_an_if_none_match_split_over_two_lines_gets_a_304_on_either_decorator(
    client: httpx.AsyncClient,
) -> None:
    for path in ("/guide", "/ours"):
        etag = (await client.get(path, headers={"X-Test-Tenant": "a"})).headers["etag"]
        asked = [("X-Test-Tenant", "a"), ("If-None-Match", '"other"'), ("If-None-Match", etag)]

        response = await client.get(path, headers=asked)

        assert response.status_code == 304, path
