"""The caching guide's own route, unchanged: fastapi-cache2's decorator over our backends.

The service below is written exactly as the guide's section 4 shows it: configuration from the
environment, ``init_cache()`` / ``close_cache()`` in the lifespan, and the route decorated with
``fastapi_cache.decorator.cache`` and ``tenant_cache_key_builder``.

The guide's API over our backend keeps the library's promises.

Services that keep ``fastapi_cache.decorator.cache`` (with ``tenant_cache_key_builder``) and
``FastAPICache`` go through the backend ``init_cache()`` installs, so:

- ``FastAPICache.clear(...)`` never removes a key outside the service's own prefix;
- ``coder=PickleCoder`` never puts a pickle in Redis and never unpickles what Redis holds (one
  warning per namespace says pickle is refused; answers stay correct);
- with ``PrivateCacheControlMiddleware`` (as ``insights_backend`` adds it), answers carry the same
  ETag as ``commons.cache.cache`` (a digest of the body, the same in every process), and a
  matching ``If-None-Match`` gets ``304`` with no body, on a hit and on a miss.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import pickle
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi_cache import FastAPICache
from fastapi_cache.coder import PickleCoder
from fastapi_cache.decorator import cache as guide_cache
from redis.asyncio import Redis

from commons.cache import (
    CacheSettings,
    PrivateCacheControlMiddleware,
    cache_status,
    close_cache,
    init_cache,
    invalidate_namespace,
    tenant_cache_key_builder,
)
from commons.testing.entries import fill, route_fingerprint_of, stored_payload, stored_value
from commons.utilities.context import get_tenant_id

from _support import as_tenant, client_for

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
    async with app.router.lifespan_context(app), client_for(app) as client:
        yield client


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


async def _invalidate_acme(how: str) -> None:
    if how == "invalidate_namespace":
        await invalidate_namespace("tenant_config", tenant_id="acme")
    else:
        # The per-tenant clear fastapi-cache2's own backends honour (every key under that text).
        await FastAPICache.clear(namespace="tenant_config:tenant_acme")


@pytest.mark.parametrize("how", ["invalidate_namespace", "FastAPICache.clear"])
async def test_invalidating_one_tenant_leaves_the_other_tenants_cached(
    guide_environment: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
    how: str,
) -> None:
    guide_environment()
    app, handler_runs = build_guide_service(make_identity_app)
    async with running(app) as client:
        for tenant in ["acme", "globex"]:
            await client.get("/tenant/config", headers=as_tenant(tenant))
        await _invalidate_acme(how)
        acme = await client.get("/tenant/config", headers=as_tenant("acme"))
        globex = await client.get("/tenant/config", headers=as_tenant("globex"))

    assert acme.headers["X-FastAPI-Cache"] == "MISS"
    assert globex.headers["X-FastAPI-Cache"] == "HIT"
    assert handler_runs == ["acme", "globex", "acme"]


async def test_fastapicache_clear_of_one_users_namespace_clears_that_user_only(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    from commons.cache import tenant_user_cache_key_builder
    from commons.utilities.context import get_user_id

    app = make_identity_app()
    runs: list[str] = []

    @app.get("/me")
    @guide_cache(namespace="me", key_builder=tenant_user_cache_key_builder)
    async def me() -> dict[str, Any]:
        runs.append(f"{get_tenant_id()}/{get_user_id()}")
        return {"user": get_user_id()}

    alice = {**as_tenant("acme"), "X-Test-User": "alice"}
    bob = {**as_tenant("acme"), "X-Test-User": "bob"}
    async with client_for(app) as client:
        for user in (alice, bob):
            await client.get("/me", headers=user)
        await FastAPICache.clear(namespace="me:tenant_acme:user_alice")
        after = [
            (await client.get("/me", headers=u)).headers["X-FastAPI-Cache"] for u in (alice, bob)
        ]

    assert after == ["MISS", "HIT"]
    assert runs == ["acme/alice", "acme/bob", "acme/alice"]


@pytest.mark.parametrize(
    "namespace",
    ["tenant_config:/tenant/config", "tenant_config:tenant_acme:/tenant/config", "#tag:x", "a:b"],
)
async def test_fastapicache_clear_of_a_namespace_no_entry_can_have_is_refused(
    guide_environment: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
    namespace: str,
) -> None:
    """A namespace text that is neither a namespace nor one tenant's or user's part of one would
    clear nothing: refused, saying what ``clear()`` takes, and the entries stay."""
    guide_environment()
    app, handler_runs = build_guide_service(make_identity_app)
    async with running(app) as client:
        await client.get("/tenant/config", headers=as_tenant("acme"))
        with pytest.raises(ValueError, match="tenant_<id>"):
            await FastAPICache.clear(namespace=namespace)
        after = await client.get("/tenant/config", headers=as_tenant("acme"))

    assert after.headers["X-FastAPI-Cache"] == "HIT"
    assert handler_runs == ["acme"]


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

    with caplog.at_level(logging.WARNING, logger="commons.cache"):
        async with client_for(app) as client:
            acme = [await client.get("/catalogue", headers=as_tenant("acme")) for _ in range(2)]
            globex = await client.get("/catalogue", headers=as_tenant("globex"))

    assert [r.json()["tenant"] for r in (*acme, globex)] == ["acme", "acme", "globex"]
    assert all(r.headers.get("X-FastAPI-Cache") != "HIT" for r in (*acme, globex))
    assert await entry_keys(redis_keys) == set()
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "'catalogue'" in warning
    assert "key_builder=tenant_cache_key_builder" in warning


# -- the guide's API over our backend keeps the library's promises ---------------------------------


ACME = {"X-Test-Tenant": "acme"}
REPO_ROOT = Path(__file__).resolve().parents[2]


# -- FastAPICache.clear stays within the prefix --------------------------------------------------

OTHER_SERVICE_KEYS = {
    "other-svc:ns:tenant_1:/x:abc": b"other service's entry",
    "other-svc:ns:tenant_2:/y:def": b"another entry of theirs",
    "other-svc:#idx:{ns}:t:1": b"their index",
    "other-svc": b"a key named like their prefix",
}
CLEARS: dict[str, dict[str, str]] = {
    "key-of-another-prefix": {"key": "other-svc:ns:tenant_1:/x:abc"},
    "namespace-of-another-prefix": {"namespace": "other-svc:ns"},
    "key-without-a-prefix": {"key": "other-svc"},
}


@pytest.mark.parametrize("clear", CLEARS.values(), ids=list(CLEARS))
async def test_fastapicache_clear_never_removes_another_services_keys(
    redis_url: str,
    raw_redis: Redis,
    make_settings: Callable[..., CacheSettings],
    clear: dict[str, str],
) -> None:
    """With ``CACHE_PREFIX=sectest``, no ``FastAPICache.clear(...)`` call touches a key of the
    ``other-svc`` prefix sharing the Redis."""
    for key, value in OTHER_SERVICE_KEYS.items():
        await raw_redis.set(key, value)
    await init_cache(make_settings(redis_url, CACHE_PREFIX="sectest"))
    try:
        if "namespace" in clear:
            # No entry of this service can be in that namespace: refused (see below).
            with pytest.raises(ValueError, match="names no entries"):
                await FastAPICache.clear(**clear)
        else:
            await FastAPICache.clear(**clear)
    finally:
        await close_cache()

    left = {key: await raw_redis.get(key) for key in OTHER_SERVICE_KEYS}
    assert left == OTHER_SERVICE_KEYS


# -- PickleCoder is refused ----------------------------------------------------------------------

PICKLE_NAMESPACES = ["pickled_a", "pickled_b"]


def build_pickle_app(make_identity_app: Callable[[], FastAPI]) -> FastAPI:
    """Two routes on the guide's decorator with ``coder=PickleCoder``, one namespace each."""
    app = make_identity_app()

    @app.get("/pickled_a")
    @guide_cache(namespace="pickled_a", key_builder=tenant_cache_key_builder, coder=PickleCoder)
    async def pickled_a() -> dict[str, Any]:
        return {"route": "a", "tenant": get_tenant_id()}

    @app.get("/pickled_b")
    @guide_cache(namespace="pickled_b", key_builder=tenant_cache_key_builder, coder=PickleCoder)
    async def pickled_b() -> dict[str, Any]:
        return {"route": "b", "tenant": get_tenant_id()}

    return app


def entry_key(settings: CacheSettings, namespace: str) -> str:
    return f"{settings.CACHE_PREFIX}:{namespace}:tenant_acme:/{namespace}:{MD5_OF_NOTHING}"


async def stored_values(settings: CacheSettings) -> list[bytes]:
    """Every string value the cache holds: all of Redis, or the routes' entries in memory."""
    if settings.REDIS_URL is None:
        found = [(await stored_value(entry_key(settings, ns)))[1] for ns in PICKLE_NAMESPACES]
        return [value for value in found if value is not None]
    client = Redis.from_url(settings.REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(count=1000)]
        return [await client.get(key) for key in keys if await client.type(key) == b"string"]
    finally:
        await client.aclose()


async def test_pickle_coder_is_refused_once_per_namespace_and_answers_stay_correct(
    backend: CacheSettings,
    make_identity_app: Callable[[], FastAPI],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each route answers its handler's body every time, no pickle is ever stored, and one
    warning per namespace says pickle is refused."""
    app = build_pickle_app(make_identity_app)

    with caplog.at_level(logging.WARNING):
        async with client_for(app, raise_app_exceptions=False) as client:
            answers = {
                namespace: [await client.get(f"/{namespace}", headers=ACME) for _ in range(3)]
                for namespace in PICKLE_NAMESPACES
            }
        values = await stored_values(backend)

    for namespace, route in zip(PICKLE_NAMESPACES, ["a", "b"], strict=True):
        assert [(r.status_code, r.json()) for r in answers[namespace]] == [
            (200, {"route": route, "tenant": "acme"})
        ] * 3
    assert [value for value in values if value.startswith(b"\x80")] == []
    refusals = [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and "pickle" in record.getMessage().lower()
    ]
    assert len(refusals) == len(PICKLE_NAMESPACES), refusals
    for namespace in PICKLE_NAMESPACES:
        assert sum(namespace in message for message in refusals) == 1, refusals


async def test_a_pickle_planted_in_redis_is_never_unpickled_into_an_answer(
    redis_url: str,
    raw_redis: Redis,
    make_settings: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
) -> None:
    """Whoever can write to Redis cannot make a ``PickleCoder`` route answer their object."""
    settings = make_settings(redis_url)
    await init_cache(settings)
    app = build_pickle_app(make_identity_app)
    try:
        async with client_for(app, raise_app_exceptions=False) as client:
            first = await client.get("/pickled_a", headers=ACME)
            await raw_redis.set(
                entry_key(settings, "pickled_a"), pickle.dumps({"pwned": True}), ex=60
            )
            after_plant = [await client.get("/pickled_a", headers=ACME) for _ in range(2)]
    finally:
        await close_cache()

    expected = (200, {"route": "a", "tenant": "acme"})
    assert (first.status_code, first.json()) == expected
    assert [(r.status_code, r.json()) for r in after_plant] == [expected] * 2


class _RunsCode:
    """A pickle that, unpickled, creates a directory: what an attacker's would run instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.makedirs, (str(self.path),)


async def test_a_pickle_planted_as_a_valid_entry_is_never_unpickled(
    redis_url: str,
    make_settings: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
    tmp_path: Path,
) -> None:
    # Whoever can write to Redis can also read the route's fingerprint and the scope's
    # generation off any entry, and write an entry in the right form whose payload is a pickle.
    settings = make_settings(redis_url)
    await init_cache(settings)
    app = build_pickle_app(make_identity_app)
    ran = tmp_path / "ran"
    try:
        async with client_for(app, raise_app_exceptions=False) as client:
            await client.get("/pickled_a", headers=ACME)
            fingerprint = route_fingerprint_of(app, "/pickled_a", producer="fastapi-cache2")
            planted = await fill(
                entry_key(settings, "pickled_a"),
                pickle.dumps(_RunsCode(ran)),
                60,
                fingerprint=fingerprint,
            )
            answers = [await client.get("/pickled_a", headers=ACME) for _ in range(2)]
    finally:
        await close_cache()

    assert planted is not None  # in the form a hit reads
    assert not ran.exists()
    assert [(r.status_code, r.json()) for r in answers] == [
        (200, {"route": "a", "tenant": "acme"})
    ] * 2


# -- bodies fastapi-cache2's decoder cannot read back --------------------------------------------

#: Bodies whose JSON fastapi-cache2's decoder turns into an exception: it reads every object with
#: a ``_spec_type`` key as a date, datetime or decimal.
UNDECODABLE_BODIES: dict[str, dict[str, Any]] = {
    "an-unknown-spec-type": {"meta": {"_spec_type": "custom", "val": 1}},
    "a-datetime-that-does-not-parse": {"when": {"_spec_type": "datetime", "val": "soon"}},
    "a-decimal-that-does-not-parse": {"price": {"_spec_type": "decimal", "val": "ten"}},
    "a-spec-type-without-its-value": {"meta": {"_spec_type": "date"}},
}


def build_meta_app(make_identity_app: Callable[[], FastAPI], body: dict[str, Any]) -> FastAPI:
    app = make_identity_app()

    @app.get("/meta")
    @guide_cache(namespace="meta", key_builder=tenant_cache_key_builder)
    async def meta() -> dict[str, Any]:
        return body

    return app


@pytest.mark.parametrize("body", UNDECODABLE_BODIES.values(), ids=list(UNDECODABLE_BODIES))
async def test_a_body_fastapi_cache2_cannot_decode_is_answered_every_time_never_a_500(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI], body: dict[str, Any]
) -> None:
    async with client_for(
        build_meta_app(make_identity_app, body), raise_app_exceptions=False
    ) as client:
        answers = [await client.get("/meta", headers=ACME) for _ in range(4)]

    assert [(r.status_code, r.json()) for r in answers] == [(200, body)] * 4


@pytest.mark.parametrize("body", UNDECODABLE_BODIES.values(), ids=list(UNDECODABLE_BODIES))
async def test_such_a_body_stored_by_an_earlier_deploy_is_a_miss_never_a_500(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI], body: dict[str, Any]
) -> None:
    app = build_meta_app(make_identity_app, body)
    key = f"{backend.CACHE_PREFIX}:meta:tenant_acme:/meta:{MD5_OF_NOTHING}"
    fingerprint = route_fingerprint_of(app, "/meta", producer="fastapi-cache2")
    assert await fill(key, json.dumps(body).encode(), 60, fingerprint=fingerprint) is not None

    async with client_for(app, raise_app_exceptions=False) as client:
        answers = [await client.get("/meta", headers=ACME) for _ in range(2)]

    assert [(r.status_code, r.json()) for r in answers] == [(200, body)] * 2


# -- answers that vary on a request header ------------------------------------------------------


@pytest.mark.parametrize("raw", [False, True], ids=["headers", "raw headers"])
async def test_an_answer_that_says_vary_is_never_served_to_another_value_of_the_header(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI], raw: bool
) -> None:
    app = make_identity_app()
    runs: list[str] = []

    @app.get("/greeting")
    @guide_cache(namespace="greeting", key_builder=tenant_cache_key_builder)
    async def greeting(request: Request, response: Response) -> dict[str, str]:
        language = request.headers.get("Accept-Language", "en")
        runs.append(language)
        if raw:  # spelled as another response had it (Starlette's lookups miss this one)
            response.raw_headers.append((b"Vary", b"Accept-Language"))
        else:
            response.headers["Vary"] = "Accept-Language"
        return {"greeting": {"fr": "Bonjour", "en": "Hello"}[language]}

    async with client_for(app, raise_app_exceptions=False) as client:
        answers = [
            (await client.get("/greeting", headers={**ACME, "Accept-Language": lang})).json()
            for lang in ["fr", "en", "fr", "en"]
        ]

    assert answers == [{"greeting": g} for g in ["Bonjour", "Hello", "Bonjour", "Hello"]]
    assert runs == ["fr", "en", "fr", "en"]


# -- ETag and If-None-Match ------------------------------------------------------------------------


def body_etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def build_etag_app(
    make_identity_app: Callable[[], FastAPI], runs: list[str] | None = None
) -> FastAPI:
    """The guide's route behind ``PrivateCacheControlMiddleware``, as insights_backend has it;
    ``runs`` records each run of the handler."""
    app = make_identity_app()
    app.add_middleware(PrivateCacheControlMiddleware)

    @app.get("/settings")
    @guide_cache(namespace="settings", key_builder=tenant_cache_key_builder)
    async def get_settings() -> dict[str, Any]:
        if runs is not None:
            runs.append(str(get_tenant_id()))
        return {"tenant": get_tenant_id(), "theme": "dark", "limits": [1, 2, 3]}

    return app


async def test_the_guide_decorators_etag_is_the_digest_of_the_body_in_every_app_instance(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    """MISS and HIT carry ``ETag: "<first 32 hex digits of the body's SHA-256>"``, the same for
    two instances of the service."""
    first_app, second_app = build_etag_app(make_identity_app), build_etag_app(make_identity_app)

    async with (
        client_for(first_app, raise_app_exceptions=False) as first,
        client_for(second_app, raise_app_exceptions=False) as second,
    ):
        miss = await first.get("/settings", headers=ACME)
        hit = await first.get("/settings", headers=ACME)
        other_instance = await second.get("/settings", headers=ACME)

    assert [r.headers["X-FastAPI-Cache"] for r in (miss, hit, other_instance)] == [
        "MISS",
        "HIT",
        "HIT",
    ]
    assert miss.content == hit.content == other_instance.content
    expected = body_etag(miss.content)
    assert [r.headers.get("ETag") for r in (miss, hit, other_instance)] == [expected] * 3


#: Serves the guide's route once in a fresh process (memory backend) and prints ETag and body.
ONE_PROCESS = """
import asyncio
import httpx
from fastapi import Depends, FastAPI, Header
from fastapi_cache.decorator import cache
from commons.cache import (
    CacheSettings, PrivateCacheControlMiddleware, close_cache, init_cache,
    tenant_cache_key_builder,
)
from commons.utilities.context import RequestContextMiddleware, get_tenant_id, set_tenant_id

async def bind(x_test_tenant: str = Header()) -> None:
    set_tenant_id(x_test_tenant)

app = FastAPI(dependencies=[Depends(bind)])
app.add_middleware(RequestContextMiddleware)
app.add_middleware(PrivateCacheControlMiddleware)

@app.get("/settings")
@cache(namespace="settings", key_builder=tenant_cache_key_builder)
async def get_settings() -> dict:
    return {"tenant": get_tenant_id(), "theme": "dark", "limits": [1, 2, 3]}

async def main() -> None:
    await init_cache(CacheSettings(CACHE_PREFIX="test-cache"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for _ in range(2):
            response = await client.get("/settings", headers={"X-Test-Tenant": "acme"})
            print(response.headers.get("etag"), response.content.decode())
    await close_cache()

asyncio.run(main())
"""


async def serve_once_in_a_new_process() -> list[tuple[str, bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHE_", "REDIS_"))}
    env.pop("PYTHONHASHSEED", None)  # each process hashes as a fresh service process would
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        ONE_PROCESS,
        env=env,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    lines = [line.split(" ", 1) for line in stdout.decode().splitlines()]
    return [(etag, body.encode()) for etag, body in lines]


async def test_the_guide_decorators_etag_is_the_same_in_separate_processes() -> None:
    """Two service processes answering the same body (MISS, then HIT) send the same ETag, the
    digest of the body."""
    first, second = await asyncio.gather(
        serve_once_in_a_new_process(), serve_once_in_a_new_process()
    )

    assert first == second
    assert [etag for etag, _ in first] == [body_etag(body) for _, body in first]


async def test_a_matching_if_none_match_gets_304_without_a_body_on_a_hit_and_on_a_miss(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    """A client that holds the body sends its digest in ``If-None-Match``: the answer is ``304``
    with no body, whether the entry is stored (HIT) or has just been computed again (MISS)."""
    runs: list[str] = []
    app = build_etag_app(make_identity_app, runs)

    async with client_for(app, raise_app_exceptions=False) as client:
        full = await client.get("/settings", headers=ACME)
        etag = body_etag(full.content)
        on_hit = await client.get("/settings", headers={**ACME, "If-None-Match": etag})
        runs_after_hit = len(runs)
        await invalidate_namespace("settings", tenant_id="acme")
        on_miss = await client.get("/settings", headers={**ACME, "If-None-Match": etag})

    assert (full.status_code, full.headers["X-FastAPI-Cache"]) == (200, "MISS")
    assert (runs_after_hit, len(runs)) == (1, 2), "expected a hit, then a miss"
    assert (on_hit.status_code, on_hit.content) == (304, b"")
    assert (on_miss.status_code, on_miss.content) == (304, b"")
