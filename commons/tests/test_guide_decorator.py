"""The caching guide's own route, unchanged: fastapi-cache2's decorator over our backends.

The service below is written exactly as the guide's section 4 shows it: configuration from the
environment, ``init_cache()`` / ``close_cache()`` in the lifespan, and the route decorated with
``fastapi_cache.decorator.cache`` and ``tenant_cache_key_builder``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI

from commons.cache import CacheSettings, cache_status, invalidate_namespace
from commons.testing.entries import stored_payload
from commons.utilities.context import get_tenant_id

MD5_OF_A1_B2 = "ed04c91cf6f6ab5a01a31c0295c5da34"  # md5(b"a=1&b=2")
MD5_OF_NOTHING = "d41d8cd98f00b204e9800998ecf8427e"  # md5(b"")

RedisKeys = Callable[[], Awaitable[set[str]]]


def build_guide_service(make_identity_app: Callable[[], FastAPI]) -> tuple[FastAPI, list[str]]:
    """The guide's service; returns the app and the tenants its handler ran for, in order."""
    # --- the guide, section 4, steps 2 and 3 -------------------------------------------------
    from fastapi_cache.decorator import cache

    from commons.cache import cache_settings, close_cache, init_cache, tenant_cache_key_builder

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await init_cache()  # picks Redis or InMemory automatically
        try:
            yield
        finally:
            await close_cache()

    router = APIRouter()

    @router.get("/tenant/config")
    @cache(
        expire=cache_settings().CACHE_TTL_SECONDS,
        namespace="tenant_config",
        key_builder=tenant_cache_key_builder,
    )
    async def get_tenant_config() -> dict[str, Any]:
        handler_runs.append(str(get_tenant_id()))
        return {"tenant": get_tenant_id(), "theme": "dark", "computed": len(handler_runs)}

    # ------------------------------------------------------------------------------------------
    handler_runs: list[str] = []
    app = make_identity_app()
    app.router.lifespan_context = lifespan
    app.include_router(router)
    return app, handler_runs


@pytest.fixture
def guide_environment(
    backend: CacheSettings, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., CacheSettings]:
    """``guide_environment(**overrides)``: puts the backend's settings in the environment (the
    guide configures through env vars) and returns the settings ``init_cache()`` will read."""
    from commons.cache import cache_settings

    def export(**overrides: str) -> CacheSettings:
        values = {
            "CACHE_PREFIX": backend.CACHE_PREFIX,
            "CACHE_TTL_SECONDS": str(backend.CACHE_TTL_SECONDS),
            "CACHE_RECOVERY_INTERVAL_SECONDS": str(backend.CACHE_RECOVERY_INTERVAL_SECONDS),
            **({"REDIS_URL": backend.REDIS_URL} if backend.REDIS_URL else {}),
            **overrides,
        }
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        cache_settings.cache_clear()
        return cache_settings()

    return export


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and a client for it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def as_tenant(tenant: str) -> dict[str, str]:
    return {"X-Test-Tenant": tenant}


async def entry_keys(redis_keys: RedisKeys) -> set[str]:
    """The entry keys in Redis (helper keys such as indexes hold a ``#`` segment)."""
    return {key for key in await redis_keys() if ":#" not in key}


async def test_first_request_misses_and_the_next_one_hits(
    guide_environment: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
) -> None:
    settings = guide_environment()
    app, handler_runs = build_guide_service(make_identity_app)
    async with running(app) as client:
        assert cache_status().backend == ("redis" if settings.REDIS_URL else "memory")
        first = await client.get("/tenant/config", headers=as_tenant("acme"))
        second = await client.get("/tenant/config", headers=as_tenant("acme"))

    assert first.headers["X-FastAPI-Cache"] == "MISS"
    assert second.headers["X-FastAPI-Cache"] == "HIT"
    assert second.json() == first.json() == {"tenant": "acme", "theme": "dark", "computed": 1}
    assert handler_runs == ["acme"]


async def test_each_tenant_gets_its_own_entry(
    guide_environment: Callable[..., CacheSettings], make_identity_app: Callable[[], FastAPI]
) -> None:
    guide_environment()
    app, handler_runs = build_guide_service(make_identity_app)
    async with running(app) as client:
        for tenant in ["acme", "globex", "acme", "globex"]:
            response = await client.get("/tenant/config", headers=as_tenant(tenant))
            assert response.json()["tenant"] == tenant
    assert handler_runs == ["acme", "globex"]


async def test_the_entry_is_stored_under_the_documented_key(
    guide_environment: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
    redis_keys: RedisKeys,
) -> None:
    settings = guide_environment()
    app, _ = build_guide_service(make_identity_app)
    expected = f"{settings.CACHE_PREFIX}:tenant_config:tenant_acme:/tenant/config:{MD5_OF_A1_B2}"
    async with running(app) as client:
        response = await client.get("/tenant/config?b=2&a=1", headers=as_tenant("acme"))
        ttl, stored = await stored_payload(expected)

    assert stored is not None
    assert response.json() == httpx.Response(200, content=stored).json()
    assert settings.CACHE_TTL_SECONDS - 2 <= ttl <= settings.CACHE_TTL_SECONDS
    if settings.REDIS_URL is not None:
        assert await entry_keys(redis_keys) == {expected}


async def test_invalidate_namespace_reaches_the_guide_routes_entries(
    guide_environment: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
    invalidate: Callable[..., Awaitable[int]],
) -> None:
    guide_environment()
    app, handler_runs = build_guide_service(make_identity_app)
    async with running(app) as client:
        for tenant in ["acme", "globex"]:
            await client.get("/tenant/config", headers=as_tenant(tenant))
        removed = await invalidate("tenant_config")
        after = [
            (await client.get("/tenant/config", headers=as_tenant(tenant))).headers[
                "X-FastAPI-Cache"
            ]
            for tenant in ["acme", "globex"]
        ]

    assert removed == 2
    assert after == ["MISS", "MISS"]
    assert handler_runs == ["acme", "globex", "acme", "globex"]


async def test_invalidating_one_tenant_leaves_the_other_tenants_cached(
    guide_environment: Callable[..., CacheSettings], make_identity_app: Callable[[], FastAPI]
) -> None:
    guide_environment()
    app, handler_runs = build_guide_service(make_identity_app)
    async with running(app) as client:
        for tenant in ["acme", "globex"]:
            await client.get("/tenant/config", headers=as_tenant(tenant))
        await invalidate_namespace("tenant_config", tenant_id="acme")
        acme = await client.get("/tenant/config", headers=as_tenant("acme"))
        globex = await client.get("/tenant/config", headers=as_tenant("globex"))

    assert acme.headers["X-FastAPI-Cache"] == "MISS"
    assert globex.headers["X-FastAPI-Cache"] == "HIT"
    assert handler_runs == ["acme", "globex", "acme"]


async def test_a_request_without_a_tenant_is_served_uncached_with_a_warning(
    guide_environment: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
    redis_keys: RedisKeys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    guide_environment()
    app, handler_runs = build_guide_service(make_identity_app)
    with caplog.at_level(logging.WARNING, logger="commons.cache"):
        async with running(app) as client:
            responses = [await client.get("/tenant/config") for _ in range(3)]
            memory_entries = cache_status().memory_entries

    assert [r.status_code for r in responses] == [200, 200, 200]
    assert all(r.headers.get("X-FastAPI-Cache") != "HIT" for r in responses)
    assert handler_runs == ["None", "None", "None"]
    assert memory_entries == 0
    assert await redis_keys() == set()
    assert any("no tenant" in record.getMessage() for record in caplog.records)


async def test_cache_enabled_false_runs_the_handler_every_time_and_stores_nothing(
    guide_environment: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
    redis_keys: RedisKeys,
) -> None:
    guide_environment(CACHE_ENABLED="false")
    app, handler_runs = build_guide_service(make_identity_app)
    async with running(app) as client:
        assert cache_status().backend == "disabled"
        responses = [
            await client.get("/tenant/config", headers=as_tenant("acme")) for _ in range(3)
        ]
        memory_entries = cache_status().memory_entries

    assert [r.json()["computed"] for r in responses] == [1, 2, 3]
    assert all("X-FastAPI-Cache" not in r.headers for r in responses)
    assert handler_runs == ["acme", "acme", "acme"]
    assert memory_entries == 0
    assert await redis_keys() == set()


async def test_its_default_key_builder_never_shares_an_entry_between_tenants_and_warns_once(
    backend: CacheSettings,
    make_identity_app: Callable[[], FastAPI],
    redis_keys: RedisKeys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fastapi_cache import default_key_builder
    from fastapi_cache.decorator import cache

    app = make_identity_app()

    @app.get("/catalogue")
    @cache(namespace="catalogue", key_builder=default_key_builder)  # no tenant in its keys
    async def catalogue() -> dict[str, Any]:
        return {"tenant": get_tenant_id()}

    transport = httpx.ASGITransport(app=app)
    with caplog.at_level(logging.WARNING, logger="commons.cache"):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            acme = [await client.get("/catalogue", headers=as_tenant("acme")) for _ in range(2)]
            globex = await client.get("/catalogue", headers=as_tenant("globex"))

    assert [r.json()["tenant"] for r in (*acme, globex)] == ["acme", "acme", "globex"]
    assert all(r.headers.get("X-FastAPI-Cache") != "HIT" for r in (*acme, globex))
    assert await entry_keys(redis_keys) == set()
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "'catalogue'" in warning
    assert "key_builder=tenant_cache_key_builder" in warning
