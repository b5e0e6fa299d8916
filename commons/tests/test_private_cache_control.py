"""PrivateCacheControlMiddleware keeps every cached answer out of shared caches."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi_cache.decorator import cache as guide_cache

from commons.cache import (
    CacheSettings,
    PrivateCacheControlMiddleware,
    cache,
    tenant_cache_key_builder,
)
from commons.utilities.context import RequestContextMiddleware, set_tenant_id


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
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


async def test_the_guide_decorator_alone_lets_shared_caches_store_tenant_answers(
    backend: CacheSettings,
) -> None:
    transport = httpx.ASGITransport(app=build_app(private_middleware=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.get("/guide", headers={"X-Test-Tenant": "a"})
    assert response.headers["cache-control"] == "max-age=60"
    assert "vary" not in response.headers


async def test_with_the_middleware_guide_answers_are_private_and_vary_on_authorization(
    client: httpx.AsyncClient,
) -> None:
    for expected in ("MISS", "HIT"):
        response = await client.get("/guide", headers={"X-Test-Tenant": "a"})
        assert response.headers["x-fastapi-cache"] == expected
        assert response.headers["cache-control"].startswith("private, max-age=")
        assert response.headers["vary"] == "Authorization"


async def test_answers_of_our_decorator_are_left_as_they_are(client: httpx.AsyncClient) -> None:
    response = await client.get("/ours", headers={"X-Test-Tenant": "a"})
    assert response.headers["cache-control"] == "private, max-age=60"
    assert response.headers["vary"] == "Authorization"


async def test_responses_that_did_not_go_through_the_cache_are_untouched(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/uncached")
    assert response.headers["cache-control"] == "max-age=60"
    assert "vary" not in response.headers
