"""``invalidate_namespace()``: exactly the entries it names, on both backends, and cheap on Redis.

Entries are written through the current cache layer under keys in the builders' real format
(``{prefix}:{namespace}:tenant_{t}[:user_{u}]:{path}:{md5}``), or through a FastAPI route.

Invalidation: once ``invalidate_namespace()`` (or a flush) returns, no request gets the old data.

- Helper keys (``{prefix}:#...``: indexes, registries) can disappear: deleted by hand, or evicted
  by Redis under memory pressure. Losing them must never let an invalidated entry be served.
- A request that starts after an invalidation returned never receives a value computed before it,
  not even by joining a computation (a miss's, or a stale entry's refresh) already under way.
- A flush that runs while the service reads and writes leaves nothing of the old data, and the
  invalidations after it still reach every entry.

Two replicas on one Redis: once a write has returned on one, no replica answers older data.

Each replica is a uvicorn process serving ``replica_app.py``; both share one Redis and one SQLite
file. A GET on replica A reads v1 and is still computing when replica B commits v2 and
invalidates; A's answer (v1, read before the write) must not become the cached answer that every
later GET receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi_cache import FastAPICache
from redis.asyncio import Redis

from commons.cache import CacheSettings, cache, close_cache, init_cache, invalidate_namespace
from commons.cache.backends.redis import RedisStore
from commons.cache.backends.redis import store as redis_backend
from commons.cache.layer import CacheLayer
from commons.cache.lifecycle import cache_status
from commons.cache.scope import CacheScope, InvalidationTarget, ScopedKey
from commons.testing import current_layer
from commons.testing.entries import fill, served
from commons.testing.redis_server import RedisServer
from commons.utilities.context import get_tenant_id, set_tenant_id, set_user_id

from _support import as_tenant, client_for

MD5_OF_NO_QUERY = "d41d8cd98f00b204e9800998ecf8427e"


def layer() -> CacheLayer:
    current = current_layer()
    assert current is not None, "init_cache() has not run"
    return current


def entry_key(
    namespace: str, tenant: str | None = None, user: str | None = None, path: str = "/v1/r"
) -> ScopedKey:
    """The key a key builder produces for this scope (an unscoped key has no tenant part)."""
    parts = [layer().prefix, namespace]
    if tenant is not None:
        parts.append(f"tenant_{tenant}")
    if user is not None:
        parts.append(f"user_{user}")
    parts += [path, MD5_OF_NO_QUERY]
    return ScopedKey(":".join(parts), CacheScope(namespace, tenant, user))


async def store(
    namespace: str,
    tenant: str | None = None,
    user: str | None = None,
    path: str = "/v1/r",
    ttl: int = 60,
) -> ScopedKey:
    key = entry_key(namespace, tenant, user, path)
    await fill(key, f"body of {key}".encode(), ttl)
    return key


async def is_cached(key: ScopedKey) -> bool:
    return await served(key) is not None


async def cached(*keys: ScopedKey) -> set[ScopedKey]:
    return {key for key in keys if await is_cached(key)}


# -- exactly the named scope -----------------------------------------------------------------------


async def test_namespace_tenant_never_clears_tenant_config_and_vice_versa(
    backend: CacheSettings, invalidate: Callable[..., Awaitable[int]]
) -> None:
    tenant = await store("tenant", "t1")
    tenant_config = await store("tenant_config", "t1")

    assert await invalidate("tenant") == 1
    assert await cached(tenant, tenant_config) == {tenant_config}

    tenant = await store("tenant", "t1")
    assert await invalidate("tenant_config") == 1
    assert await cached(tenant, tenant_config) == {tenant}


async def test_invalidating_a_namespace_removes_every_tenants_entries(
    backend: CacheSettings, invalidate: Callable[..., Awaitable[int]]
) -> None:
    keys = [await store("reports", f"t{n}", path=f"/v1/reports/{n}") for n in range(5)]
    keys.append(await store("reports", "t0", "u1", path="/v1/me"))
    keys.append(await store("reports", None, path="/v1/public"))

    assert await invalidate("reports") == 7
    assert await cached(*keys) == set()


async def test_invalidating_one_tenant_leaves_the_others_cached(
    backend: CacheSettings, invalidate: Callable[..., Awaitable[int]]
) -> None:
    acme = await store("tenant_config", "acme")
    acme_list = await store("tenant_config", "acme", path="/v1/items")
    globex = await store("tenant_config", "globex")
    initech = await store("tenant_config", "initech")

    assert await invalidate("tenant_config", tenant_id="acme") == 2
    assert await cached(acme, acme_list, globex, initech) == {globex, initech}


async def test_invalidating_one_user_leaves_the_tenants_other_users_and_shared_entries(
    backend: CacheSettings, invalidate: Callable[..., Awaitable[int]]
) -> None:
    alice = await store("profile", "acme", "alice", path="/v1/users/me")
    bob = await store("profile", "acme", "bob", path="/v1/users/me")
    acme_shared = await store("profile", "acme", path="/v1/users")
    other_alice = await store("profile", "globex", "alice", path="/v1/users/me")

    assert await invalidate("profile", tenant_id="acme", user_id="alice") == 1
    assert await cached(alice, bob, acme_shared, other_alice) == {bob, acme_shared, other_alice}


async def test_invalidating_a_tenant_also_removes_its_users_entries(
    backend: CacheSettings, invalidate: Callable[..., Awaitable[int]]
) -> None:
    alice = await store("profile", "acme", "alice", path="/v1/users/me")
    acme_shared = await store("profile", "acme", path="/v1/users")
    globex_bob = await store("profile", "globex", "bob", path="/v1/users/me")

    assert await invalidate("profile", tenant_id="acme") == 2
    assert await cached(alice, acme_shared, globex_bob) == {globex_bob}


async def test_integer_ids_name_the_same_scope_as_their_text(
    backend: CacheSettings, invalidate: Callable[..., Awaitable[int]]
) -> None:
    tenant_42 = await store("tenant_config", "42")
    user_7 = await store("profile", "42", "7")

    assert await invalidate("profile", tenant_id=42, user_id=7) == 1
    assert await invalidate("tenant_config", tenant_id=42) == 1
    assert await cached(tenant_42, user_7) == set()


async def test_a_user_without_a_tenant_is_refused(backend: CacheSettings) -> None:
    kept = await store("profile", "acme", "alice")

    with pytest.raises(ValueError, match="tenant_id"):
        await invalidate_namespace("profile", user_id="alice")

    assert await is_cached(kept)


async def test_invalidating_what_is_not_cached_removes_nothing(
    backend: CacheSettings, invalidate: Callable[..., Awaitable[int]]
) -> None:
    kept = await store("tenant_config", "acme")

    assert await invalidate("never-used") == 0
    assert await invalidate("tenant_config", tenant_id="nobody") == 0
    assert await invalidate("tenant_config", tenant_id="acme", user_id="nobody") == 0
    assert await is_cached(kept)


async def test_without_init_cache_invalidation_is_a_no_op_that_warns_naming_init_cache(
    caplog: pytest.LogCaptureFixture,
) -> None:
    await close_cache()

    with caplog.at_level(logging.WARNING, logger="commons.cache"):
        assert await invalidate_namespace("tenant_config", tenant_id="acme") == 0

    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "'tenant_config'" in warning
    assert "init_cache()" in warning
    assert "with TestClient(app)" in warning


@pytest.mark.parametrize("namespace", ["a:b", ":", "tenant_config:"])
async def test_a_namespace_no_route_can_have_is_refused_as_the_decorator_refuses_it(
    backend: CacheSettings, namespace: str
) -> None:
    with pytest.raises(ValueError, match="':'") as refused:
        await invalidate_namespace(namespace)
    with pytest.raises(ValueError, match="':'") as decorating:
        cache(namespace=namespace)

    assert str(refused.value) == str(decorating.value)


# -- namespaces and ids are literal text -----------------------------------------------------------

ODD_TEXTS = [
    "a*",
    "*",
    "a?",
    "[ab]",
    "a]",
    "{hash-tag}",
    "it's",
    'say "cheese"',
    "back\\slash",
    "with space",
    "tab\tand\nnewline",
    "%2A",
    "ünïcødé テナント 🚀",
    "]]) redis.call('FLUSHALL') --",
    "\"]]) redis.call('FLUSHALL') --",
    "x'); redis.call('FLUSHALL'); --",
]


@pytest.mark.parametrize("odd", ODD_TEXTS)
async def test_an_odd_namespace_is_literal_text(
    backend: CacheSettings, odd: str, invalidate: Callable[..., Awaitable[int]]
) -> None:
    odd_entries = [await store(odd, "t1"), await store(odd, None, path="/public")]
    neighbours = [
        await store("a", "t1"),
        await store("ab", "t1"),
        await store(f"{odd}x", "t1"),
        await store(f"{odd}:sub", "t1"),
        await store("plain", "t1"),
    ]

    assert await invalidate(odd) == 2
    assert await cached(*odd_entries, *neighbours) == set(neighbours)


@pytest.mark.parametrize("odd", ODD_TEXTS)
async def test_odd_tenant_and_user_ids_are_literal_text(
    backend: CacheSettings, odd: str, invalidate: Callable[..., Awaitable[int]]
) -> None:
    odd_tenant = await store("ns", odd)
    odd_user = await store("ns", "t1", odd)
    plain_tenant = await store("ns", "t1")
    other_user = await store("ns", "t1", "u1")
    near_tenant = await store("ns", f"{odd}x")

    assert await invalidate("ns", tenant_id="t1", user_id=odd) == 1
    assert await invalidate("ns", tenant_id=odd) == 1
    assert await cached(odd_tenant, odd_user, plain_tenant, other_user, near_tenant) == {
        plain_tenant,
        other_user,
        near_tenant,
    }


async def test_a_glob_namespace_beside_a_matching_one_takes_only_itself(
    backend: CacheSettings, invalidate: Callable[..., Awaitable[int]]
) -> None:
    star = await store("a*", "t1")
    ab = await store("ab", "t1")
    question = await store("a?", "t1")
    bracket = await store("[a]", "t1")
    a = await store("a", "t1")

    assert await invalidate("a*") == 1
    assert await invalidate("a?") == 1
    assert await invalidate("[a]") == 1
    assert await cached(star, ab, question, bracket, a) == {ab, a}


# -- through a FastAPI route -----------------------------------------------------------------------


async def identity_from_test_headers(request: Request) -> None:
    """Test-only: binds the tenant and user named in headers (a real service verifies a token).

    ``async``: a plain function would run in a worker thread, whose context the route never sees.
    """
    set_tenant_id(request.headers.get("x-test-tenant"))
    set_user_id(request.headers.get("x-test-user"))


@pytest.fixture
async def client(backend: CacheSettings) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI(dependencies=[Depends(identity_from_test_headers)])
    calls = {"count": 0}

    @app.get("/v1/tenant/config")
    @cache(namespace="tenant_config")
    async def tenant_config(request: Request) -> dict[str, int]:
        calls["count"] += 1
        return {"computed": calls["count"]}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


async def test_a_route_is_served_fresh_for_the_invalidated_tenant_only(
    client: httpx.AsyncClient, invalidate: Callable[..., Awaitable[int]]
) -> None:
    acme_first = await client.get("/v1/tenant/config", headers={"x-test-tenant": "acme"})
    globex_first = await client.get("/v1/tenant/config", headers={"x-test-tenant": "globex"})
    assert acme_first.headers["x-fastapi-cache"] == "MISS"

    assert await invalidate("tenant_config", tenant_id="acme") == 1

    acme_again = await client.get("/v1/tenant/config", headers={"x-test-tenant": "acme"})
    globex_again = await client.get("/v1/tenant/config", headers={"x-test-tenant": "globex"})
    assert acme_again.headers["x-fastapi-cache"] == "MISS"
    assert acme_again.json() != acme_first.json()
    assert globex_again.headers["x-fastapi-cache"] == "HIT"
    assert globex_again.json() == globex_first.json()


# -- Redis: prefixes, helper keys, no KEYS, bounded indexes ----------------------------------------


async def all_keys(client: Redis) -> list[str]:
    """Every key in the test's own server."""
    return [key.decode() async for key in client.scan_iter(count=1_000)]


async def test_two_prefixes_on_one_redis_never_see_or_invalidate_each_others_entries(
    redis_url: str,
    make_settings: Callable[..., CacheSettings],
    invalidate: Callable[..., Awaitable[int]],
) -> None:
    await init_cache(make_settings(redis_url, CACHE_PREFIX="ib-cache"))
    ib_entries = [await store("tenant_config", "acme"), await store("tenant_config", None)]
    try:
        await init_cache(make_settings(redis_url, CACHE_PREFIX="am-cache"))
        am_acme = await store("tenant_config", "acme")

        assert await invalidate("tenant_config") == 1
        assert await invalidate("tenant_config", tenant_id="acme") == 0
        assert not await is_cached(am_acme)

        await init_cache(make_settings(redis_url, CACHE_PREFIX="ib-cache"))
        assert await cached(*ib_entries) == set(ib_entries)
        assert await invalidate("tenant_config") == 2
    finally:
        await close_cache()


async def test_a_prefix_never_reads_another_prefixs_entry_under_the_same_path(
    redis_url: str, make_settings: Callable[..., CacheSettings]
) -> None:
    await init_cache(make_settings(redis_url, CACHE_PREFIX="ib-cache"))
    await store("tenant_config", "acme")
    try:
        await init_cache(make_settings(redis_url, CACHE_PREFIX="am-cache"))

        assert not await is_cached(entry_key("tenant_config", "acme"))
    finally:
        await close_cache()


async def test_every_key_the_cache_writes_starts_with_its_prefix(
    on_redis: CacheSettings, raw_redis: Redis
) -> None:
    for odd in ["tenant", "tenant_config", "a*", "{tag}", "ünï", "]]) redis.call('FLUSHALL') --"]:
        await store(odd, "t1")
        await store(odd, "t1", "u1")
        await store(odd, None)
    await invalidate_namespace("tenant", tenant_id="t1", user_id="u1")

    keys = await all_keys(raw_redis)

    assert len(keys) > 18  # the entries and their indexes
    assert all(key.startswith("test-cache:") for key in keys), keys


async def test_invalidation_never_issues_keys_or_scan(
    on_redis: CacheSettings, raw_redis: Redis
) -> None:
    for tenant in ("t1", "t2"):
        await store("tenant_config", tenant)
        await store("tenant_config", tenant, "u1")
    await store("tenant_config", None)
    await raw_redis.config_resetstat()

    await invalidate_namespace("tenant_config", tenant_id="t1", user_id="u1")
    await invalidate_namespace("tenant_config", tenant_id="t1")
    await invalidate_namespace("tenant_config")
    await invalidate_namespace("never-used")

    stats = await raw_redis.info("commandstats")
    assert "cmdstat_unlink" in stats  # the invalidations did reach Redis
    assert "cmdstat_keys" not in stats
    assert "cmdstat_scan" not in stats


async def test_invalidating_a_namespace_ignores_unrelated_keys(
    on_redis: CacheSettings, raw_redis: Redis, invalidate: Callable[..., Awaitable[int]]
) -> None:
    await raw_redis.execute_command("DEBUG", "POPULATE", 20_000, "unrelated")
    await raw_redis.set("test-cache-other:reports:tenant_t1:/v1/r:x", b"similar prefix")
    entries = [await store("reports", f"t{n % 10}", path=f"/v1/r/{n}") for n in range(100)]
    before = await raw_redis.dbsize()
    await raw_redis.config_resetstat()

    assert await invalidate("reports") == 100

    stats = await raw_redis.info("commandstats")
    assert "cmdstat_keys" not in stats
    assert "cmdstat_scan" not in stats
    assert await cached(*entries) == set()
    # Only the 100 entries and their index keys are gone; every unrelated key is still there.
    assert await raw_redis.exists("unrelated:0", "unrelated:19999") == 2
    assert await raw_redis.get("test-cache-other:reports:tenant_t1:/v1/r:x") == b"similar prefix"
    assert before - await raw_redis.dbsize() < 100 + 20


async def test_every_index_key_expires_by_itself(
    on_redis: CacheSettings, raw_redis: Redis, invalidate: Callable[..., Awaitable[int]]
) -> None:
    for n in range(20):
        await store("tenant_config", f"t{n % 4}", path=f"/v1/r/{n}", ttl=30 + n)
        await store("profile", f"t{n % 4}", f"u{n}", path="/v1/me", ttl=30)
    await store("tenant_config", None, ttl=30)
    await invalidate("profile", tenant_id="t0")

    helper_keys = [key for key in await all_keys(raw_redis) if "#" in key]

    assert any("#reg" in key for key in helper_keys)
    assert any("#idx" in key for key in helper_keys)
    assert any("#gen" in key for key in helper_keys)
    for key in helper_keys:
        assert await raw_redis.pttl(key) > 0, key


async def test_expired_entries_leave_no_index_garbage_behind(
    on_redis: CacheSettings, raw_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The index keeps members for a grace period past their expiry; shorten it to wait less.
    monkeypatch.setattr(redis_backend, "INDEX_GRACE_MS", 200)
    for n in range(200):
        await store("reports", f"t{n % 100}", path=f"/v1/r/{n}", ttl=1)

    # A generation outlives its scope's last entry by at most that entry's lifetime plus the
    # grace (re-armed to twice it, once per lifetime): 2 x 1.2 s here.
    await asyncio.sleep(2.6)
    survivor = await store("reports", "t0", path="/v1/r/new")
    newcomer = await store("reports", "t-new", path="/v1/r/new")

    keys = await all_keys(raw_redis)
    entries = [key for key in keys if "#" not in key]
    leaves = [key for key in keys if "#idx" in key]
    registries = [key for key in keys if "#reg" in key]
    assert sorted(entries) == sorted([survivor, newcomer])
    generations = [key for key in keys if "#gen" in key]
    # the two entries, a leaf index and a generation for each tenant, the namespace's registry
    # and generation
    assert len(keys) == 8
    assert len(generations) == 3
    assert [await raw_redis.zcard(leaf) for leaf in leaves] == [1, 1]
    assert [await raw_redis.zcard(registry) for registry in registries] == [2]


async def test_a_short_lived_entry_does_not_hide_a_long_lived_one_from_invalidation(
    on_redis: CacheSettings,
    monkeypatch: pytest.MonkeyPatch,
    invalidate: Callable[..., Awaitable[int]],
) -> None:
    monkeypatch.setattr(redis_backend, "INDEX_GRACE_MS", 200)
    long_lived = await store("tenant_config", "acme", path="/v1/config", ttl=3_600)
    await store("tenant_config", "acme", path="/v1/flags", ttl=1)

    await asyncio.sleep(1.4)
    await store("tenant_config", "globex")  # another write to the namespace prunes its indexes

    assert await is_cached(long_lived)
    assert await invalidate("tenant_config") == 2
    assert not await is_cached(long_lived)


async def test_an_entry_written_during_an_invalidation_is_found_by_the_next_one(
    raw_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica may write while a namespace is being invalidated: whether that entry goes
    with this invalidation or not, it must stay reachable by the next one."""
    redis_store = RedisStore(raw_redis, "test-cache")
    scope = CacheScope("tenant_config", "acme")
    await redis_store.set("test-cache:tenant_config:tenant_acme:/v1/a:0", b"old", 60, scope)
    written_meanwhile = "test-cache:tenant_config:tenant_acme:/v1/b:0"
    drain_leaf = redis_store._drain_leaf

    async def drain_then_another_replica_writes(leaf: str) -> int:
        removed = await drain_leaf(leaf)
        if not await raw_redis.exists(written_meanwhile):
            await redis_store.set(written_meanwhile, b"new", 60, scope)
        return removed

    try:
        with monkeypatch.context() as patch:
            patch.setattr(redis_store, "_drain_leaf", drain_then_another_replica_writes)
            await redis_store.invalidate(InvalidationTarget("tenant_config"))

        assert await raw_redis.get(written_meanwhile) == b"new"
        assert await redis_store.invalidate(InvalidationTarget("tenant_config")) == 1
        assert await raw_redis.get(written_meanwhile) is None
    finally:
        await redis_store.aclose()


# -- the caller waits for the generation, not for the removal ------------------------------------


async def many_entries(namespace: str, tenants: int) -> list[ScopedKey]:
    """Two entries for each of ``tenants`` tenants: a removal of many index leaves."""
    return [
        await store(namespace, f"t{n}", path=f"/v1/r/{copy}")
        for n in range(tenants)
        for copy in (1, 2)
    ]


async def test_an_invalidation_returns_before_its_old_entries_are_removed_and_none_is_served(
    on_redis: CacheSettings, raw_redis: Redis
) -> None:
    keys = await many_entries("reports", 50)

    await invalidate_namespace("reports")

    # The old entries, which only cost memory now, are removed after it returned ...
    assert await raw_redis.exists(*keys) > 0
    assert cache_status().removals_pending == 1
    # ... and it holds at once: none of them is served meanwhile.
    assert not await is_cached(keys[-1])
    await layer().background_removals_settled()
    assert await cached(*keys) == set()
    assert await raw_redis.exists(*keys) == 0
    assert cache_status().removals_pending == 0


async def test_close_cache_does_not_wait_for_a_removal_that_cannot_progress(
    on_redis: CacheSettings, raw_redis: Redis, invalidate: Callable[..., Awaitable[int]]
) -> None:
    keys = await many_entries("reports", 50)
    await invalidate_namespace("reports")
    # Writes held: the removal's next page cannot be applied.
    await raw_redis.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
    try:
        await asyncio.wait_for(close_cache(), 3)
    finally:
        await raw_redis.execute_command("CLIENT", "UNPAUSE")

    # What the cancelled removal left is still indexed: the next invalidation finds it.
    left = await raw_redis.exists(*keys)
    assert left > 0
    await init_cache(on_redis)
    assert await invalidate("reports") == left
    assert await raw_redis.exists(*keys) == 0


# -- no old data once an invalidation or a flush returned ------------------------------------------


REPO_ROOT = Path(__file__).resolve().parents[2]


class Data:
    """The service's data: one version per tenant (1 until changed)."""

    def __init__(self) -> None:
        self.versions: defaultdict[str, int] = defaultdict(lambda: 1)

    def change_all(self, version: int, tenants: list[str]) -> None:
        for tenant in tenants:
            self.versions[tenant] = version


def build_reports_app(make_identity_app: Callable[[], FastAPI], data: Data) -> FastAPI:
    """``GET /reports/{n}``: tenant-scoped, namespace ``reports``, answers the tenant's version."""
    app = make_identity_app()

    @app.get("/reports/{n}")
    @cache(namespace="reports")
    async def report(n: int) -> dict[str, object]:
        tenant = str(get_tenant_id())
        return {"tenant": tenant, "n": n, "version": data.versions[tenant], "pad": "x" * 400}

    return app


async def get_in_chunks(
    client: httpx.AsyncClient, urls: list[tuple[str, str]], chunk_size: int
) -> list[httpx.Response]:
    """GETs every ``(tenant, url)``, ``chunk_size`` requests at once, in order."""
    responses: list[httpx.Response] = []
    for start in range(0, len(urls), chunk_size):
        chunk = urls[start : start + chunk_size]
        responses += await asyncio.gather(
            *(client.get(url, headers=as_tenant(tenant)) for tenant, url in chunk)
        )
    return responses


# -- losing helper keys ---------------------------------------------------------------------------


async def test_invalidation_works_after_every_helper_key_is_deleted(
    on_redis: CacheSettings, raw_redis: Redis, make_identity_app: Callable[[], FastAPI]
) -> None:
    """With every ``{prefix}:#...`` key gone, invalidating a tenant still removes its entries:
    the next GET is a miss with the new data."""
    data = Data()
    app = build_reports_app(make_identity_app, data)

    async with client_for(app, timeout=30) as client:
        miss = await client.get("/reports/1", headers=as_tenant("acme"))
        hit = await client.get("/reports/1", headers=as_tenant("acme"))
        helper_keys = [
            key async for key in raw_redis.scan_iter(match=f"{on_redis.CACHE_PREFIX}:#*")
        ]
        for key in helper_keys:
            await raw_redis.delete(key)
        data.versions["acme"] = 2
        await invalidate_namespace("reports", tenant_id="acme")
        after = await client.get("/reports/1", headers=as_tenant("acme"))

    assert (miss.headers["X-FastAPI-Cache"], miss.json()["version"]) == ("MISS", 1)
    assert (hit.headers["X-FastAPI-Cache"], hit.json()["version"]) == ("HIT", 1)
    assert (after.headers["X-FastAPI-Cache"], after.json()["version"]) == ("MISS", 2)


EVICTION_TENANTS = [f"t{n:03d}" for n in range(100)]
EVICTION_PATHS = range(10)
EVICTED_AT_LEAST = 100


async def evicted_keys(client: Redis) -> int:
    return int((await client.info("stats"))["evicted_keys"])


async def test_no_old_version_is_served_after_redis_evicted_under_memory_pressure(
    own_redis: RedisServer,
    make_settings: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
) -> None:
    """Redis full under ``allkeys-lru`` evicts what was least recently used: entries that are
    read often outlive the helper keys written with them. Invalidating every tenant afterwards
    still means no GET returns the old version (a miss is fine)."""
    raw = Redis.from_url(own_redis.url)
    await raw.config_set("maxmemory-policy", "allkeys-lru")
    await raw.config_set("maxmemory", 8 * 1024 * 1024)
    await init_cache(make_settings(own_redis.url))
    data = Data()
    app = build_reports_app(make_identity_app, data)
    urls = [(tenant, f"/reports/{n}") for tenant in EVICTION_TENANTS for n in EVICTION_PATHS]

    def get_all() -> Awaitable[list[httpx.Response]]:
        return get_in_chunks(client, urls, 50)

    try:
        async with client_for(app, timeout=30) as client:
            filled = await get_all()
            # Redis keeps idle times in whole seconds: reads from now on are more recent than
            # the writes of the fill, helper keys included.
            await asyncio.sleep(1.5)
            for _ in range(2):
                read = await get_all()
            junk = 0
            # Well past the first eviction: about a tenth of the keys go.
            while await evicted_keys(raw) < EVICTED_AT_LEAST:
                pipe = raw.pipeline(transaction=False)
                for _ in range(20):
                    pipe.set(f"junk:{junk}", os.urandom(8 * 1024))
                    junk += 1
                await pipe.execute()
                assert junk < 5000, "Redis did not evict as expected"
            data.change_all(2, EVICTION_TENANTS)
            await invalidate_namespace("reports")
            after = await get_all()
    finally:
        await close_cache()
        await raw.aclose()

    assert {r.json()["version"] for r in filled} == {1}
    assert {r.headers["X-FastAPI-Cache"] for r in read} == {"HIT"}
    old = [(r.json()["tenant"], r.json()["n"]) for r in after if r.json()["version"] != 2]
    assert old == [], f"{len(old)} GETs returned the invalidated version"


# -- read your writes -----------------------------------------------------------------------------


class SlowData:
    """One version, read at the start of each computation, which then takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.version = 1
        self.seconds = seconds
        self.reads: list[int] = []
        self.started = asyncio.Event()

    async def read(self) -> dict[str, int]:
        version = self.version
        self.reads.append(version)
        self.started.set()
        await asyncio.sleep(self.seconds)
        return {"version": version}


def build_slow_app(
    make_identity_app: Callable[[], FastAPI], data: SlowData, *, stale_ttl: int | None = None
) -> FastAPI:
    app = make_identity_app()

    @app.get("/slow")
    @cache(namespace="slow", expire=1 if stale_ttl else None, stale_ttl=stale_ttl)
    async def slow() -> dict[str, int]:
        return await data.read()

    return app


async def test_a_request_after_an_invalidation_never_joins_a_computation_started_before_it(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    """R1 misses and computes v1; the data changes to v2 and the invalidation returns; R2,
    starting after that, gets v2 rather than R1's v1, and so does every later GET."""
    data = SlowData(seconds=0.5)
    app = build_slow_app(make_identity_app, data)

    async with client_for(app, timeout=30) as client:
        first = asyncio.create_task(client.get("/slow", headers=as_tenant("acme")))
        await asyncio.wait_for(data.started.wait(), 5)
        data.version = 2
        await invalidate_namespace("slow", tenant_id="acme")
        second = await client.get("/slow", headers=as_tenant("acme"))
        first_response = await first
        later = await client.get("/slow", headers=as_tenant("acme"))

    assert first_response.json() == {"version": 1}
    assert (second.headers["X-FastAPI-Cache"], second.json()) == ("MISS", {"version": 2})
    assert later.json() == {"version": 2}


async def test_a_request_after_an_invalidation_never_joins_a_stale_entrys_refresh(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    """R1 gets a stale v1 and starts the refresh, which reads v1; the data changes to v2 and the
    invalidation returns; R2, starting after that, gets v2 (a miss), and so does every later GET."""
    data = SlowData(seconds=0.5)
    app = build_slow_app(make_identity_app, data, stale_ttl=60)

    async with client_for(app, timeout=30) as client:
        filled = await client.get("/slow", headers=as_tenant("acme"))
        await asyncio.sleep(1.2)  # past the entry's 1 s of freshness, well within its stale_ttl
        data.started.clear()
        # The client returns once the refresh (a background task of R1's response) is done.
        first = asyncio.create_task(client.get("/slow", headers=as_tenant("acme")))
        await asyncio.wait_for(data.started.wait(), 5)
        data.version = 2
        await invalidate_namespace("slow", tenant_id="acme")
        second = await client.get("/slow", headers=as_tenant("acme"))
        first_response = await first
        later = await client.get("/slow", headers=as_tenant("acme"))

    assert (filled.headers["X-FastAPI-Cache"], filled.json()) == ("MISS", {"version": 1})
    assert (first_response.headers["X-FastAPI-Cache"], first_response.json()) == (
        "STALE",
        {"version": 1},
    )
    assert data.reads[:2] == [1, 1], "the refresh was expected to read v1"
    assert (second.headers["X-FastAPI-Cache"], second.json()) == ("MISS", {"version": 2})
    assert later.json() == {"version": 2}


# -- a flush while the service writes ------------------------------------------------------------

FLUSH_TENANTS = [f"f{n:02d}" for n in range(20)]
FLUSH_PATHS = range(100)
FOREIGN_KEYS = 200_000


async def flush_through_the_guide_api(settings: CacheSettings) -> None:
    await FastAPICache.clear()


async def flush_through_the_cli(settings: CacheSettings) -> None:
    assert settings.REDIS_URL is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHE_", "REDIS_"))}
    env.update(REDIS_URL=settings.REDIS_URL, CACHE_PREFIX=settings.CACHE_PREFIX)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "commons.cache",
        "flush",
        "--yes",
        env=env,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, (stdout + stderr).decode()


FLUSHES: dict[str, Callable[[CacheSettings], Awaitable[None]]] = {
    "FastAPICache.clear": flush_through_the_guide_api,
    "commons-cache-flush": flush_through_the_cli,
}


@pytest.mark.parametrize("flush", FLUSHES.values(), ids=list(FLUSHES))
async def test_a_flush_during_reads_and_writes_leaves_no_old_data_and_later_invalidations_work(
    on_redis: CacheSettings,
    raw_redis: Redis,
    make_identity_app: Callable[[], FastAPI],
    flush: Callable[[CacheSettings], Awaitable[None]],
) -> None:
    """2,000 entries hold v1; the data changes to v2 without invalidating; requests keep reading
    (v1) and filling (v2) while the flush runs. Once it returns every GET answers v2; and once the
    data changes to v3 and the namespace is invalidated, every GET answers v3: the entries written
    while the flush ran are still reached by invalidations."""
    # Other services' keys share the Redis: the flush walks past them for a while, as it would
    # in production, while this service keeps writing.
    await raw_redis.execute_command("DEBUG", "POPULATE", FOREIGN_KEYS, "other-svc:junk")
    data = Data()
    app = build_reports_app(make_identity_app, data)
    urls = [(t, f"/reports/{n}") for t in FLUSH_TENANTS for n in FLUSH_PATHS]

    def get_all() -> Awaitable[list[httpx.Response]]:
        return get_in_chunks(client, urls, 100)

    def not_at(version: int, responses: list[httpx.Response]) -> list[str]:
        return [
            f"{r.json()['tenant']}{r.url.path}" for r in responses if r.json()["version"] != version
        ]

    async with client_for(app, timeout=30) as client:
        filled = await get_all()
        data.change_all(2, FLUSH_TENANTS)
        flushed = asyncio.Event()

        async def keep_requesting(share: list[tuple[str, str]]) -> int:
            sent = 0
            while not flushed.is_set():
                for tenant, url in share:
                    await client.get(url, headers=as_tenant(tenant))
                    sent += 1
                    # A hit answered from memory (the near cache) never waits for I/O: without
                    # a pause, sixteen workers would leave the flush no time to run.
                    await asyncio.sleep(0.001)
                    if flushed.is_set():
                        break
            return sent

        # A few keys of every tenant, requested again and again: each is refilled soon after the
        # flush removed it, while the flush still runs.
        busy = [(tenant, f"/reports/{n}") for tenant in FLUSH_TENANTS for n in range(10)]
        workers = [asyncio.create_task(keep_requesting(busy[i::16])) for i in range(16)]
        await asyncio.sleep(0.05)
        try:
            await flush(on_redis)
        finally:
            flushed.set()
        after_flush = await get_all()
        sent_during_flush = sum(await asyncio.gather(*workers))
        data.change_all(3, FLUSH_TENANTS)
        await invalidate_namespace("reports")
        after_invalidation = await get_all()

    assert {r.json()["version"] for r in filled} == {1}
    assert sent_during_flush > 0
    assert not_at(2, after_flush) == [], "answers from before the flush outlived it"
    assert not_at(3, after_invalidation) == [], "entries written during the flush were missed"


# -- two replicas: no answer older than a write that returned --------------------------------------


ROUNDS = 5
#: When B's write starts, after A's GET (which reads at once, then takes 1 s to answer).
WRITE_AFTER_SECONDS = 0.3


@pytest.fixture
def replicas(redis_url: str, start_replicas: Callable[..., list[str]], tmp_path: Path) -> list[str]:
    """Two replicas of ``replica_app`` on the session's Redis; their base URLs."""
    database = tmp_path / "replicas.sqlite"
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.execute("CREATE TABLE IF NOT EXISTS res (tenant TEXT PRIMARY KEY, version INTEGER)")
    return start_replicas(
        REDIS_URL=redis_url, CACHE_PREFIX="replica-test", REPLICA_DB=str(database)
    )


@pytest.mark.slow
async def test_after_a_write_returns_no_replica_caches_the_answer_computed_before_it(
    replicas: list[str],
) -> None:
    """Per round (a fresh tenant each): A's GET reads v1 and is computing; 0.3 s later B's PUT
    commits v2, invalidates and returns; once A's GET has answered, a GET on A and a GET on B
    both answer v2. Five rounds."""
    replica_a, replica_b = replicas
    rounds: list[dict[str, object]] = []
    async with (
        httpx.AsyncClient(base_url=replica_a, timeout=30) as a,
        httpx.AsyncClient(base_url=replica_b, timeout=30) as b,
    ):
        for _ in range(ROUNDS):
            tenant = {"X-Test-Tenant": f"t-{uuid.uuid4().hex[:12]}"}
            first = asyncio.create_task(a.get("/res", headers=tenant))
            await asyncio.sleep(WRITE_AFTER_SECONDS)
            write = await b.put("/res", headers=tenant)
            during_write = await first
            on_a, on_b = await asyncio.gather(
                a.get("/res", headers=tenant), b.get("/res", headers=tenant)
            )
            rounds.append(
                {
                    "write": write.json(),
                    "during_write": during_write.json(),
                    "after": (on_a.json(), on_b.json()),
                }
            )

    assert [r["write"] for r in rounds] == [{"version": 2}] * ROUNDS
    assert [r["during_write"] for r in rounds] == [{"version": 1}] * ROUNDS
    stale = sum(r["after"] != ({"version": 2}, {"version": 2}) for r in rounds)
    assert [r["after"] for r in rounds] == [({"version": 2}, {"version": 2})] * ROUNDS, (
        f"{stale} of {ROUNDS} rounds answered old data after the write"
    )
