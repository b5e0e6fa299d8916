"""``commons.cache.cache``: fastapi-cache2's parameters, the same keys, and failing closed.

HTTP semantics (ETag, 304, Cache-Control, HEAD, Response objects) and single-flight have their own
test modules; this one covers what a route author relies on when writing ``@cache(...)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from fastapi_cache.coder import JsonCoder, PickleCoder
from fastapi_cache.decorator import cache as fastapi_cache_decorator
from pydantic import BaseModel
from redis.asyncio import Redis
from starlette.requests import Request

from commons.cache import (
    CacheSettings,
    cache,
    cache_status,
    close_cache,
    global_cache_key_builder,
    init_cache,
    invalidate_namespace,
    tenant_cache_key_builder,
    tenant_user_cache_key_builder,
)
from commons.testing.entries import stored_payload
from commons.utilities.context import get_tenant_id, get_user_id

from _support import client_for

MD5_OF_A1_B2 = "ed04c91cf6f6ab5a01a31c0295c5da34"  # md5(b"a=1&b=2")
MD5_OF_NOTHING = "d41d8cd98f00b204e9800998ecf8427e"  # md5(b"")
ACME = {"X-Test-Tenant": "acme"}

RedisKeys = Callable[[], Awaitable[set[str]]]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def stored(key: str) -> tuple[int, bytes | None]:
    """The remaining seconds and bytes of the entry under exactly ``key``, on whatever backend."""
    return await stored_payload(key)


async def redis_pttl_ms(settings: CacheSettings, key: str) -> int:
    assert settings.REDIS_URL is not None
    client = Redis.from_url(settings.REDIS_URL)
    try:
        return int(await client.pttl(key))
    finally:
        await client.aclose()


async def nothing_is_stored(redis_keys: RedisKeys) -> bool:
    entries = {key for key in await redis_keys() if ":#" not in key}
    return cache_status().memory_entries == 0 and entries == set()


@pytest.fixture
def counting_app(make_identity_app: Callable[[], FastAPI]) -> tuple[FastAPI, list[str]]:
    """``GET /config`` cached in namespace ``cfg``; the list records each handler run's tenant."""
    app = make_identity_app()
    runs: list[str] = []

    @app.get("/config")
    @cache(namespace="cfg")
    async def config() -> dict[str, Any]:
        runs.append(str(get_tenant_id()))
        return {"tenant": get_tenant_id(), "run": len(runs)}

    return app, runs


# -- hits, misses and keys ------------------------------------------------------------------------


async def test_first_request_misses_and_the_next_one_hits_with_the_same_body(
    backend: CacheSettings, counting_app: tuple[FastAPI, list[str]]
) -> None:
    app, runs = counting_app
    async with client_for(app) as client:
        first = await client.get("/config", headers=ACME)
        second = await client.get("/config", headers=ACME)

    assert first.headers["X-FastAPI-Cache"] == "MISS"
    assert second.headers["X-FastAPI-Cache"] == "HIT"
    assert first.json() == second.json() == {"tenant": "acme", "run": 1}
    assert runs == ["acme"]


async def test_the_default_key_is_the_tenant_key_of_the_route_and_namespace(
    backend: CacheSettings, counting_app: tuple[FastAPI, list[str]], redis_keys: RedisKeys
) -> None:
    app, _ = counting_app
    async with client_for(app) as client:
        response = await client.get("/config?b=2&a=1", headers=ACME)

    key = f"{backend.CACHE_PREFIX}:cfg:tenant_acme:/config:{MD5_OF_A1_B2}"
    _, body = await stored(key)
    assert body == response.content
    if backend.REDIS_URL is not None:
        assert {k for k in await redis_keys() if ":#" not in k} == {key}


async def test_expire_defaults_to_cache_ttl_seconds(
    backend: CacheSettings, counting_app: tuple[FastAPI, list[str]]
) -> None:
    app, _ = counting_app
    async with client_for(app) as client:
        await client.get("/config", headers=ACME)

    key = f"{backend.CACHE_PREFIX}:cfg:tenant_acme:/config:{MD5_OF_NOTHING}"
    ttl, _ = await stored(key)
    assert backend.CACHE_TTL_SECONDS - 2 <= ttl <= backend.CACHE_TTL_SECONDS
    if backend.REDIS_URL is not None:
        pttl = await redis_pttl_ms(backend, key)
        assert (backend.CACHE_TTL_SECONDS - 2) * 1000 < pttl <= backend.CACHE_TTL_SECONDS * 1000


async def test_expire_sets_the_lifetime_of_the_entry(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    app = make_identity_app()

    @app.get("/short")
    @cache(expire=7, namespace="short")
    async def short() -> dict[str, str]:
        return {"ok": "yes"}

    async with client_for(app) as client:
        await client.get("/short", headers=ACME)

    key = f"{backend.CACHE_PREFIX}:short:tenant_acme:/short:{MD5_OF_NOTHING}"
    ttl, _ = await stored(key)
    assert 5 <= ttl <= 7
    if backend.REDIS_URL is not None:
        assert 5000 < await redis_pttl_ms(backend, key) <= 7000


async def test_namespaces_keep_entries_apart(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    app = make_identity_app()
    runs: list[str] = []

    @app.get("/one")
    @cache(namespace="first")
    async def one() -> dict[str, int]:
        runs.append("first")
        return {"n": 1}

    async with client_for(app) as client:
        await client.get("/one", headers=ACME)
        await invalidate_namespace("second")
        kept = await client.get("/one", headers=ACME)
        await invalidate_namespace("first")
        dropped = await client.get("/one", headers=ACME)

    assert kept.headers["X-FastAPI-Cache"] == "HIT"
    assert dropped.headers["X-FastAPI-Cache"] == "MISS"
    assert runs == ["first", "first"]


async def test_key_builder_chooses_the_scope_of_the_entry(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    app = make_identity_app()

    @app.get("/me")
    @cache(namespace="me", key_builder=tenant_user_cache_key_builder)
    async def me() -> dict[str, str | None]:
        return {"user": get_user_id()}

    async with client_for(app) as client:
        alice = await client.get("/me", headers={**ACME, "X-Test-User": "alice"})
        bob = await client.get("/me", headers={**ACME, "X-Test-User": "bob"})
        alice_again = await client.get("/me", headers={**ACME, "X-Test-User": "alice"})

    assert (alice.json(), bob.json(), alice_again.json()) == (
        {"user": "alice"},
        {"user": "bob"},
        {"user": "alice"},
    )
    assert [r.headers["X-FastAPI-Cache"] for r in (alice, bob, alice_again)] == [
        "MISS",
        "MISS",
        "HIT",
    ]
    key = f"{backend.CACHE_PREFIX}:me:tenant_acme:user_alice:/me:{MD5_OF_NOTHING}"
    assert (await stored(key))[1] == alice.content


def language_key_builder(
    func: Callable[..., Any], namespace: str = "", *, request: Request | None = None, **_: Any
) -> str:
    """A team's own builder: its own key text, with the request's language and no tenant."""
    assert request is not None
    return f"{namespace}:{request.headers.get('accept-language')}:{request.url.path}"


def language_user_key_builder(
    func: Callable[..., Any], namespace: str = "", *, request: Request | None = None, **_: Any
) -> str:
    """A team's builder that wraps ours, adding the language to a user's key."""
    assert request is not None
    built = tenant_user_cache_key_builder(func, namespace, request=request)
    return f"{built}:{request.headers.get('accept-language')}"


@pytest.fixture
def language_app(make_identity_app: Callable[[], FastAPI]) -> tuple[FastAPI, dict[str, int]]:
    """``GET /items`` cached in namespace ``items`` by :func:`language_key_builder`; answers
    ``{"tenant", "lang", "version"}`` from the dict returned beside the app."""
    app = make_identity_app()
    version = {"n": 1}

    @app.get("/items")
    @cache(namespace="items", key_builder=language_key_builder)
    async def items(request: Request) -> dict[str, Any]:
        lang = request.headers.get("accept-language")
        return {"tenant": get_tenant_id(), "lang": lang, "version": version["n"]}

    return app, version


async def test_a_custom_key_builders_entries_are_removed_by_invalidating_their_tenant(
    backend: CacheSettings,
    language_app: tuple[FastAPI, dict[str, int]],
    invalidate: Callable[..., Awaitable[int]],
) -> None:
    app, version = language_app
    french = {**ACME, "Accept-Language": "fr"}
    async with client_for(app) as client:
        first = await client.get("/items", headers=french)
        hit = await client.get("/items", headers=french)
        version["n"] = 2
        removed = await invalidate("items", tenant_id="acme")
        after = await client.get("/items", headers=french)

    assert [r.headers["X-FastAPI-Cache"] for r in (first, hit, after)] == ["MISS", "HIT", "MISS"]
    assert removed == 1
    assert after.json() == {"tenant": "acme", "lang": "fr", "version": 2}


async def test_a_custom_key_builder_that_omits_the_tenant_never_serves_one_tenant_to_another(
    backend: CacheSettings, language_app: tuple[FastAPI, dict[str, int]], redis_keys: RedisKeys
) -> None:
    app, _ = language_app
    async with client_for(app) as client:
        acme = await client.get("/items", headers={**ACME, "Accept-Language": "fr"})
        globex = await client.get(
            "/items", headers={"X-Test-Tenant": "globex", "Accept-Language": "fr"}
        )
        nobody = await client.get("/items", headers={"Accept-Language": "fr"})

    assert (acme.json()["tenant"], globex.json()["tenant"]) == ("acme", "globex")
    assert globex.headers["X-FastAPI-Cache"] == "MISS"
    assert nobody.json()["tenant"] is None
    assert nobody.headers["cache-status"].endswith("fwd=bypass")
    if backend.REDIS_URL is not None:
        entries = {key for key in await redis_keys() if ":#" not in key}
        prefix = f"{backend.CACHE_PREFIX}:items"
        assert entries == {
            f"{prefix}:tenant_acme:~{prefix}:fr:/items",
            f"{prefix}:tenant_globex:~{prefix}:fr:/items",
        }


async def test_a_builder_wrapping_ours_keeps_its_user_scope_for_invalidation(
    backend: CacheSettings,
    make_identity_app: Callable[[], FastAPI],
    invalidate: Callable[..., Awaitable[int]],
) -> None:
    app = make_identity_app()
    runs: list[str] = []

    @app.get("/prefs")
    @cache(namespace="prefs", key_builder=language_user_key_builder)
    async def prefs() -> dict[str, int]:
        runs.append(str(get_user_id()))
        return {"run": len(runs)}

    alice = {**ACME, "X-Test-User": "alice", "Accept-Language": "fr"}
    bob = {**ACME, "X-Test-User": "bob", "Accept-Language": "fr"}
    async with client_for(app) as client:
        await client.get("/prefs", headers=alice)
        await client.get("/prefs", headers=bob)
        removed = await invalidate("prefs", tenant_id="acme", user_id="alice")
        alice_after = await client.get("/prefs", headers=alice)
        bob_after = await client.get("/prefs", headers=bob)

    assert removed == 1
    assert (alice_after.headers["X-FastAPI-Cache"], bob_after.headers["X-FastAPI-Cache"]) == (
        "MISS",
        "HIT",
    )


def hashed_user_key_builder(
    func: Callable[..., Any], namespace: str = "", *, request: Request | None = None, **_: Any
) -> str:
    """A team's builder that wraps ours and hashes its key (its text no longer says anything)."""
    assert request is not None
    built = tenant_user_cache_key_builder(func, namespace, request=request)
    return f"{namespace}:{hashlib.sha256(str(built).encode()).hexdigest()}"


@pytest.mark.parametrize(
    "builder", [language_user_key_builder, hashed_user_key_builder], ids=["appends", "hashes"]
)
async def test_a_builder_wrapping_ours_stays_uncached_when_ours_finds_no_user(
    backend: CacheSettings,
    make_identity_app: Callable[[], FastAPI],
    builder: Callable[..., str],
) -> None:
    # The user is known to the handler but not bound (bound in a sync dependency, say): our
    # builder refuses to build a key; whatever the wrapper makes of that refusal, the answer is
    # served uncached, never stored under the tenant for its other users to read.
    app = make_identity_app()

    @app.get("/profile")
    @cache(namespace="profile", key_builder=builder)
    async def profile(request: Request) -> dict[str, str]:
        return {"user": request.headers["X-Who"]}

    async with client_for(app) as client:
        answers = [
            await client.get("/profile", headers={**ACME, "X-Who": who, "Accept-Language": "fr"})
            for who in ("alice", "bob", "alice")
        ]

    assert [a.json()["user"] for a in answers] == ["alice", "bob", "alice"]
    assert [a.headers["cache-status"].rpartition("; ")[2] for a in answers] == ["fwd=bypass"] * 3


@pytest.fixture
def catalogue_app(make_identity_app: Callable[[], FastAPI]) -> tuple[FastAPI, list[str]]:
    """``GET /catalogue`` cached for everyone (``global_cache_key_builder``), namespace
    ``catalogue``; the list records each handler run's tenant."""
    app = make_identity_app()
    runs: list[str] = []

    @app.get("/catalogue")
    @cache(namespace="catalogue", key_builder=global_cache_key_builder)
    async def catalogue() -> dict[str, int]:
        runs.append(str(get_tenant_id()))
        return {"version": len(runs)}

    return app, runs


async def test_a_route_opting_in_to_global_entries_shares_one_between_tenants_and_anonymous(
    backend: CacheSettings, catalogue_app: tuple[FastAPI, list[str]]
) -> None:
    app, runs = catalogue_app
    async with client_for(app) as client:
        acme = await client.get("/catalogue", headers=ACME)
        globex = await client.get("/catalogue", headers={"X-Test-Tenant": "globex"})
        anonymous = await client.get("/catalogue")

    assert [r.headers["X-FastAPI-Cache"] for r in (acme, globex, anonymous)] == [
        "MISS",
        "HIT",
        "HIT",
    ]
    assert runs == ["acme"]
    assert anonymous.headers["cache-control"] == "no-cache"
    assert "vary" not in anonymous.headers
    key = f"{backend.CACHE_PREFIX}:catalogue:/catalogue:{MD5_OF_NOTHING}"
    assert (await stored(key))[1] == acme.content


async def test_a_global_entry_is_removed_by_invalidating_its_namespace_not_a_tenant(
    backend: CacheSettings,
    catalogue_app: tuple[FastAPI, list[str]],
    invalidate: Callable[..., Awaitable[int]],
) -> None:
    app, _ = catalogue_app
    async with client_for(app) as client:
        await client.get("/catalogue", headers=ACME)
        kept = await invalidate("catalogue", tenant_id="acme")
        hit = await client.get("/catalogue", headers=ACME)
        removed = await invalidate("catalogue")
        fresh = await client.get("/catalogue", headers=ACME)

    assert (kept, removed) == (0, 1)
    assert (hit.headers["X-FastAPI-Cache"], fresh.headers["X-FastAPI-Cache"]) == ("HIT", "MISS")
    assert fresh.json() == {"version": 2}


async def test_a_custom_coder_renders_the_stored_body(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    class EnvelopeCoder(JsonCoder):
        @classmethod
        def encode(cls, value: Any) -> bytes:
            return json.dumps({"data": value}).encode()

    app = make_identity_app()

    @app.get("/wrapped")
    @cache(namespace="wrapped", coder=EnvelopeCoder)
    async def wrapped() -> dict[str, int]:
        return {"n": 1}

    async with client_for(app) as client:
        miss = await client.get("/wrapped", headers=ACME)
        hit = await client.get("/wrapped", headers=ACME)

    assert miss.json() == hit.json() == {"data": {"n": 1}}
    assert hit.headers["X-FastAPI-Cache"] == "HIT"
    key = f"{backend.CACHE_PREFIX}:wrapped:tenant_acme:/wrapped:{MD5_OF_NOTHING}"
    assert (await stored(key))[1] == EnvelopeCoder.encode({"n": 1})


async def test_the_response_model_of_the_return_annotation_shapes_hits_too(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    class Config(BaseModel):
        theme: str

    app = make_identity_app()

    @app.get("/typed")
    @cache(namespace="typed")
    async def typed() -> Config:
        return Config(theme="dark")

    async with client_for(app) as client:
        miss = await client.get("/typed", headers=ACME)
        hit = await client.get("/typed", headers=ACME)

    assert miss.json() == hit.json() == {"theme": "dark"}
    assert hit.headers["X-FastAPI-Cache"] == "HIT"


async def test_keys_are_identical_to_the_fastapi_cache2_decorators_but_entries_are_not_shared(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    """Same key; but the two decorators store different things (a rendered answer, a coder's
    encoding), so each one's entry carries another fingerprint and is a miss for the other."""
    ours, theirs = make_identity_app(), make_identity_app()
    ours_runs: list[str] = []

    @ours.get("/tenant/config")
    @cache(namespace="tenant_config")
    async def ours_config() -> dict[str, str]:
        ours_runs.append("ours")
        return {"theme": "dark"}

    @theirs.get("/tenant/config")
    @fastapi_cache_decorator(namespace="tenant_config", key_builder=tenant_cache_key_builder)
    async def theirs_config() -> dict[str, str]:
        return {"theme": "light"}

    key = f"{backend.CACHE_PREFIX}:tenant_config:tenant_acme:/tenant/config:{MD5_OF_A1_B2}"
    async with client_for(ours) as ours_client, client_for(theirs) as theirs_client:
        await theirs_client.get("/tenant/config?a=1&b=2", headers=ACME)
        stored_by_theirs = (await stored(key))[1]
        await invalidate_namespace("tenant_config")
        await ours_client.get("/tenant/config?b=2&a=1", headers=ACME)
        stored_by_ours = (await stored(key))[1]
        # neither serves what the other stored
        from_ours = await theirs_client.get("/tenant/config?a=1&b=2", headers=ACME)

    assert stored_by_theirs is not None
    assert json.loads(stored_by_theirs) == {"theme": "light"}
    assert stored_by_ours is not None
    assert json.loads(stored_by_ours) == {"theme": "dark"}
    assert from_ours.headers["X-FastAPI-Cache"] == "MISS"
    assert from_ours.json() == {"theme": "light"}


# -- failing closed and turning off ---------------------------------------------------------------


async def test_requests_without_a_tenant_are_served_uncached_with_one_warning_naming_the_cause(
    backend: CacheSettings,
    counting_app: tuple[FastAPI, list[str]],
    redis_keys: RedisKeys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, runs = counting_app
    with caplog.at_level(logging.WARNING, logger="commons.cache"):
        async with client_for(app) as client:
            responses = [await client.get("/config") for _ in range(3)]

    assert runs == ["None", "None", "None"]
    assert [r.json()["run"] for r in responses] == [1, 2, 3]
    assert all(r.headers.get("X-FastAPI-Cache") != "HIT" for r in responses)
    assert await nothing_is_stored(redis_keys)
    [warning] = warnings_of(caplog)
    assert "GET /config" in warning
    assert "no tenant bound" in warning
    assert "bind it in an `async def` dependency" in warning


async def test_a_request_without_a_user_is_served_uncached_by_a_user_scoped_route(
    backend: CacheSettings,
    make_identity_app: Callable[[], FastAPI],
    redis_keys: RedisKeys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_identity_app()
    runs: list[str] = []

    @app.get("/me")
    @cache(namespace="me", key_builder=tenant_user_cache_key_builder)
    async def me() -> dict[str, int]:
        runs.append("me")
        return {"run": len(runs)}

    with caplog.at_level(logging.WARNING, logger="commons.cache"):
        async with client_for(app) as client:
            responses = [await client.get("/me", headers=ACME) for _ in range(2)]

    assert [r.json()["run"] for r in responses] == [1, 2]
    assert await nothing_is_stored(redis_keys)
    assert any("no user" in record.getMessage() for record in caplog.records)


async def test_cache_enabled_false_runs_the_handler_every_time_and_stores_nothing(
    backend: CacheSettings,
    make_settings: Callable[..., CacheSettings],
    counting_app: tuple[FastAPI, list[str]],
    redis_keys: RedisKeys,
) -> None:
    await init_cache(make_settings(backend.REDIS_URL, CACHE_ENABLED=False))
    app, runs = counting_app
    async with client_for(app) as client:
        responses = [await client.get("/config", headers=ACME) for _ in range(3)]

    assert cache_status().backend == "disabled"
    assert [r.json()["run"] for r in responses] == [1, 2, 3]
    assert all("X-FastAPI-Cache" not in r.headers for r in responses)
    assert runs == ["acme", "acme", "acme"]
    assert await nothing_is_stored(redis_keys)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_other_methods_than_get_are_never_cached(
    backend: CacheSettings,
    make_identity_app: Callable[[], FastAPI],
    redis_keys: RedisKeys,
    method: str,
) -> None:
    app = make_identity_app()
    runs: list[str] = []

    @app.api_route("/action", methods=[method])
    @cache(namespace="action")
    async def action() -> dict[str, int]:
        runs.append(method)
        return {"run": len(runs)}

    async with client_for(app) as client:
        responses = [await client.request(method, "/action", headers=ACME) for _ in range(2)]

    assert [r.json()["run"] for r in responses] == [1, 2]
    assert all("X-FastAPI-Cache" not in r.headers for r in responses)
    assert await nothing_is_stored(redis_keys)


async def test_a_cached_route_that_answers_post_warns_once_naming_the_route_and_the_fix(
    backend: CacheSettings,
    make_identity_app: Callable[[], FastAPI],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_identity_app()

    @app.post("/orders")
    @cache(namespace="orders")
    async def create_order() -> dict[str, str]:
        return {"id": "1"}

    with caplog.at_level(logging.WARNING, logger="commons.cache"):
        async with client_for(app) as client:
            for _ in range(3):
                await client.post("/orders", headers=ACME)

    [warning] = warnings_of(caplog)
    assert "POST /orders" in warning
    assert "only GET and HEAD" in warning
    assert "remove @cache" in warning


async def test_without_init_cache_a_cached_route_warns_once_naming_init_cache(
    make_identity_app: Callable[[], FastAPI], caplog: pytest.LogCaptureFixture
) -> None:
    await close_cache()
    app = make_identity_app()
    runs: list[int] = []

    @app.get("/config")
    @cache(namespace="cfg")
    async def config() -> dict[str, int]:
        runs.append(1)
        return {"run": len(runs)}

    with caplog.at_level(logging.WARNING, logger="commons.cache"):
        async with client_for(app) as client:
            responses = [await client.get("/config", headers=ACME) for _ in range(3)]

    assert [r.json()["run"] for r in responses] == [1, 2, 3]
    [warning] = warnings_of(caplog)
    assert "GET /config" in warning
    assert "init_cache() has not run" in warning
    assert "with TestClient(app)" in warning


# -- refused at decoration time -------------------------------------------------------------------


@pytest.mark.parametrize("namespace", ["a:b", ":", "tenant_config:"])
def test_a_namespace_holding_a_colon_is_refused_when_decorating(namespace: str) -> None:
    with pytest.raises(ValueError, match="namespace"):
        cache(namespace=namespace)


def test_a_pickle_coder_is_refused_when_decorating() -> None:
    class MyPickleCoder(PickleCoder):
        pass

    for coder in (PickleCoder, MyPickleCoder):
        with pytest.raises(ValueError, match="PickleCoder"):
            cache(namespace="ok", coder=coder)


# -- logging --------------------------------------------------------------------------------------


async def test_each_cached_request_logs_one_debug_line_with_namespace_key_and_outcome(
    backend: CacheSettings,
    counting_app: tuple[FastAPI, list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = counting_app
    key = f"{backend.CACHE_PREFIX}:cfg:tenant_acme:/config:{MD5_OF_NOTHING}"
    lines: list[list[str]] = []
    async with client_for(app) as client:
        for _ in range(2):
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="commons.cache"):
                await client.get("/config", headers=ACME)
            lines.append(
                [
                    r.getMessage()
                    for r in caplog.records
                    if r.name == "commons.cache"
                    and r.levelno == logging.DEBUG
                    and ("HIT" in r.getMessage() or "MISS" in r.getMessage())
                ]
            )

    assert [len(request_lines) for request_lines in lines] == [1, 1]
    (miss,), (hit,) = lines
    for line, outcome in ((miss, "MISS"), (hit, "HIT")):
        assert outcome in line
        assert key in line
        assert "namespace=cfg" in line


# -- handlers of every shape ----------------------------------------------------------------------


async def test_a_sync_handler_is_cached(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    app = make_identity_app()
    runs: list[str] = []

    @app.get("/sync")
    @cache(namespace="sync")
    def sync_handler() -> dict[str, int]:
        runs.append("sync")
        return {"run": len(runs)}

    async with client_for(app) as client:
        miss = await client.get("/sync", headers=ACME)
        hit = await client.get("/sync", headers=ACME)

    assert miss.json() == hit.json() == {"run": 1}
    assert [miss.headers["X-FastAPI-Cache"], hit.headers["X-FastAPI-Cache"]] == ["MISS", "HIT"]


async def test_a_handler_that_takes_the_request_itself_still_gets_it(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    app = make_identity_app()
    runs: list[str] = []

    @app.get("/echo")
    @cache(namespace="echo")
    async def echo(request: Request, page: int = 1) -> dict[str, Any]:
        runs.append(request.url.path)
        return {"path": request.url.path, "page": page, "q": request.query_params.get("q")}

    async with client_for(app) as client:
        miss = await client.get("/echo?page=2&q=x", headers=ACME)
        hit = await client.get("/echo?q=x&page=2", headers=ACME)
        other = await client.get("/echo?page=3&q=x", headers=ACME)

    assert miss.json() == hit.json() == {"path": "/echo", "page": 2, "q": "x"}
    assert hit.headers["X-FastAPI-Cache"] == "HIT"
    assert other.json() == {"path": "/echo", "page": 3, "q": "x"}
    assert runs == ["/echo", "/echo"]


async def test_a_handler_that_raises_an_http_error_is_not_cached(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI], redis_keys: RedisKeys
) -> None:
    app = make_identity_app()
    runs: list[str] = []

    @app.get("/flaky")
    @cache(namespace="flaky")
    async def flaky() -> dict[str, int]:
        runs.append("flaky")
        if len(runs) == 1:
            raise HTTPException(status_code=503, detail="upstream down")
        return {"run": len(runs)}

    async with client_for(app) as client:
        failed = await client.get("/flaky", headers=ACME)
        assert await nothing_is_stored(redis_keys)
        recovered = await client.get("/flaky", headers=ACME)
        cached = await client.get("/flaky", headers=ACME)

    assert failed.status_code == 503
    assert (recovered.status_code, recovered.headers["X-FastAPI-Cache"]) == (200, "MISS")
    assert (cached.json(), cached.headers["X-FastAPI-Cache"]) == ({"run": 2}, "HIT")


async def test_a_handler_that_crashes_is_not_cached(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI], redis_keys: RedisKeys
) -> None:
    app = make_identity_app()
    runs: list[str] = []

    @app.get("/crashy")
    @cache(namespace="crashy")
    async def crashy() -> dict[str, int]:
        runs.append("crashy")
        if len(runs) == 1:
            raise RuntimeError("bug")
        return {"run": len(runs)}

    async with client_for(app, raise_app_exceptions=False) as client:
        crashed = await client.get("/crashy", headers=ACME)
        assert await nothing_is_stored(redis_keys)
        recovered = await client.get("/crashy", headers=ACME)

    assert crashed.status_code == 500
    assert (recovered.status_code, recovered.json()) == (200, {"run": 2})


def test_an_expire_of_zero_is_refused_when_decorating() -> None:
    # Read as "the default" it cached for CACHE_TTL_SECONDS, whatever the author meant.
    with pytest.raises(ValueError, match="expire=0 would cache for CACHE_TTL_SECONDS"):
        cache(expire=0)


def returns_a_number(func: Callable[..., Any], namespace: str = "", **_: Any) -> Any:
    return 42


async def returns_a_number_later(func: Callable[..., Any], namespace: str = "", **_: Any) -> Any:
    return b"bytes"


@pytest.mark.parametrize(
    ("builder", "returned"), [(returns_a_number, "int"), (returns_a_number_later, "bytes")]
)
async def test_a_key_builder_that_returns_no_str_serves_uncached_and_says_what_it_returned(
    backend: CacheSettings,
    make_identity_app: Callable[[], FastAPI],
    caplog: pytest.LogCaptureFixture,
    builder: Callable[..., Any],
    returned: str,
) -> None:
    app = make_identity_app()
    runs: list[int] = []

    @app.get("/odd")
    @cache(namespace="odd", key_builder=builder)
    async def odd() -> dict[str, int]:
        runs.append(1)
        return {"runs": len(runs)}

    with caplog.at_level(logging.WARNING, logger="commons.cache"):
        async with client_for(app) as client:
            answers = [await client.get("/odd", headers=ACME) for _ in range(2)]

    assert [(a.status_code, a.json()) for a in answers] == [(200, {"runs": 1}), (200, {"runs": 2})]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"the key builder returned {returned}, not a str" in warnings[0]


@pytest.mark.parametrize("backend_name", ["redis"])  # generations live in Redis
async def test_a_generation_key_of_another_type_is_replaced_not_a_failure_on_every_request(
    backend: CacheSettings,
    counting_app: tuple[FastAPI, list[str]],
    redis_keys: RedisKeys,
) -> None:
    # What Redis holds under our names may be anything (an operator's mistake, another tool): a
    # generation that is a hash made every fill fail with WRONGTYPE, for as long as it stayed.
    assert backend.REDIS_URL is not None
    app, runs = counting_app
    async with client_for(app) as client:
        await client.get("/config", headers=ACME)
        generations = sorted(key for key in await redis_keys() if ":#gen:" in key)
        outside = Redis.from_url(backend.REDIS_URL)
        try:
            for key in generations:
                await outside.delete(key)
                await outside.hset(key, "operator", "was here")
        finally:
            await outside.aclose()

        answers = [await client.get("/config", headers=ACME) for _ in range(3)]

    assert generations
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert [answer.headers["X-FastAPI-Cache"] for answer in answers] == ["MISS", "HIT", "HIT"]
    assert runs == ["acme", "acme"]
    assert cache_status().backend == "redis"
