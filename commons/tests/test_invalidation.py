"""``invalidate_namespace()``: exactly the entries it names, on both backends, and cheap on Redis.

Entries are written through the current cache layer under keys in the builders' real format
(``{prefix}:{namespace}:tenant_{t}[:user_{u}]:{path}:{md5}``), or through a FastAPI route.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from redis.asyncio import Redis

from commons.cache import CacheSettings, cache, close_cache, init_cache, invalidate_namespace
from commons.cache.backends.redis import RedisStore
from commons.cache.backends.redis import store as redis_backend
from commons.cache.layer import CacheLayer
from commons.cache.lifecycle import cache_status
from commons.cache.scope import CacheScope, InvalidationTarget, ScopedKey
from commons.testing import current_layer
from commons.testing.entries import fill, served
from commons.utilities.context import set_tenant_id, set_user_id

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


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    """A client of the test's own, for looking at what the cache left in Redis."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def on_redis(
    redis_url: str, make_settings: Callable[..., CacheSettings]
) -> AsyncIterator[CacheSettings]:
    """The cache initialised on the session's Redis (prefix ``test-cache``)."""
    settings = make_settings(redis_url)
    await init_cache(settings)
    assert layer().state.value == "redis"
    try:
        yield settings
    finally:
        await close_cache()


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
    on_redis: CacheSettings, redis_client: Redis
) -> None:
    for odd in ["tenant", "tenant_config", "a*", "{tag}", "ünï", "]]) redis.call('FLUSHALL') --"]:
        await store(odd, "t1")
        await store(odd, "t1", "u1")
        await store(odd, None)
    await invalidate_namespace("tenant", tenant_id="t1", user_id="u1")

    keys = await all_keys(redis_client)

    assert len(keys) > 18  # the entries and their indexes
    assert all(key.startswith("test-cache:") for key in keys), keys


async def test_invalidation_never_issues_keys_or_scan(
    on_redis: CacheSettings, redis_client: Redis
) -> None:
    for tenant in ("t1", "t2"):
        await store("tenant_config", tenant)
        await store("tenant_config", tenant, "u1")
    await store("tenant_config", None)
    await redis_client.config_resetstat()

    await invalidate_namespace("tenant_config", tenant_id="t1", user_id="u1")
    await invalidate_namespace("tenant_config", tenant_id="t1")
    await invalidate_namespace("tenant_config")
    await invalidate_namespace("never-used")

    stats = await redis_client.info("commandstats")
    assert "cmdstat_unlink" in stats  # the invalidations did reach Redis
    assert "cmdstat_keys" not in stats
    assert "cmdstat_scan" not in stats


async def test_invalidating_a_namespace_ignores_unrelated_keys(
    on_redis: CacheSettings, redis_client: Redis, invalidate: Callable[..., Awaitable[int]]
) -> None:
    await redis_client.execute_command("DEBUG", "POPULATE", 20_000, "unrelated")
    await redis_client.set("test-cache-other:reports:tenant_t1:/v1/r:x", b"similar prefix")
    entries = [await store("reports", f"t{n % 10}", path=f"/v1/r/{n}") for n in range(100)]
    before = await redis_client.dbsize()
    await redis_client.config_resetstat()

    assert await invalidate("reports") == 100

    stats = await redis_client.info("commandstats")
    assert "cmdstat_keys" not in stats
    assert "cmdstat_scan" not in stats
    assert await cached(*entries) == set()
    # Only the 100 entries and their index keys are gone; every unrelated key is still there.
    assert await redis_client.exists("unrelated:0", "unrelated:19999") == 2
    assert await redis_client.get("test-cache-other:reports:tenant_t1:/v1/r:x") == b"similar prefix"
    assert before - await redis_client.dbsize() < 100 + 20


async def test_every_index_key_expires_by_itself(
    on_redis: CacheSettings, redis_client: Redis, invalidate: Callable[..., Awaitable[int]]
) -> None:
    for n in range(20):
        await store("tenant_config", f"t{n % 4}", path=f"/v1/r/{n}", ttl=30 + n)
        await store("profile", f"t{n % 4}", f"u{n}", path="/v1/me", ttl=30)
    await store("tenant_config", None, ttl=30)
    await invalidate("profile", tenant_id="t0")

    helper_keys = [key for key in await all_keys(redis_client) if "#" in key]

    assert any("#reg" in key for key in helper_keys)
    assert any("#idx" in key for key in helper_keys)
    assert any("#gen" in key for key in helper_keys)
    for key in helper_keys:
        assert await redis_client.pttl(key) > 0, key


async def test_expired_entries_leave_no_index_garbage_behind(
    on_redis: CacheSettings, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
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

    keys = await all_keys(redis_client)
    entries = [key for key in keys if "#" not in key]
    leaves = [key for key in keys if "#idx" in key]
    registries = [key for key in keys if "#reg" in key]
    assert sorted(entries) == sorted([survivor, newcomer])
    generations = [key for key in keys if "#gen" in key]
    # the two entries, a leaf index and a generation for each tenant, the namespace's registry
    # and generation
    assert len(keys) == 8
    assert len(generations) == 3
    assert [await redis_client.zcard(leaf) for leaf in leaves] == [1, 1]
    assert [await redis_client.zcard(registry) for registry in registries] == [2]


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
    redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica may write while a namespace is being invalidated: whether that entry goes
    with this invalidation or not, it must stay reachable by the next one."""
    redis_store = RedisStore(redis_client, "test-cache")
    scope = CacheScope("tenant_config", "acme")
    await redis_store.set("test-cache:tenant_config:tenant_acme:/v1/a:0", b"old", 60, scope)
    written_meanwhile = "test-cache:tenant_config:tenant_acme:/v1/b:0"
    drain_leaf = redis_store._drain_leaf

    async def drain_then_another_replica_writes(leaf: str) -> int:
        removed = await drain_leaf(leaf)
        if not await redis_client.exists(written_meanwhile):
            await redis_store.set(written_meanwhile, b"new", 60, scope)
        return removed

    with monkeypatch.context() as patch:
        patch.setattr(redis_store, "_drain_leaf", drain_then_another_replica_writes)
        await redis_store.invalidate(InvalidationTarget("tenant_config"))

    assert await redis_client.get(written_meanwhile) == b"new"
    assert await redis_store.invalidate(InvalidationTarget("tenant_config")) == 1
    assert await redis_client.get(written_meanwhile) is None


# -- the caller waits for the generation, not for the removal ------------------------------------


async def many_entries(namespace: str, tenants: int) -> list[ScopedKey]:
    """Two entries for each of ``tenants`` tenants: a removal of many index leaves."""
    return [
        await store(namespace, f"t{n}", path=f"/v1/r/{copy}")
        for n in range(tenants)
        for copy in (1, 2)
    ]


async def test_an_invalidation_returns_before_its_old_entries_are_removed_and_none_is_served(
    on_redis: CacheSettings, redis_client: Redis
) -> None:
    keys = await many_entries("reports", 50)

    await invalidate_namespace("reports")

    # The old entries, which only cost memory now, are removed after it returned ...
    assert await redis_client.exists(*keys) > 0
    assert cache_status().removals_pending == 1
    # ... and it holds at once: none of them is served meanwhile.
    assert not await is_cached(keys[-1])
    await layer().background_removals_settled()
    assert await cached(*keys) == set()
    assert await redis_client.exists(*keys) == 0
    assert cache_status().removals_pending == 0


async def test_close_cache_does_not_wait_for_a_removal_that_cannot_progress(
    on_redis: CacheSettings, redis_client: Redis, invalidate: Callable[..., Awaitable[int]]
) -> None:
    keys = await many_entries("reports", 50)
    await invalidate_namespace("reports")
    # Writes held: the removal's next page cannot be applied.
    await redis_client.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
    try:
        await asyncio.wait_for(close_cache(), 3)
    finally:
        await redis_client.execute_command("CLIENT", "UNPAUSE")

    # What the cancelled removal left is still indexed: the next invalidation finds it.
    left = await redis_client.exists(*keys)
    assert left > 0
    await init_cache(on_redis)
    assert await invalidate("reports") == left
    assert await redis_client.exists(*keys) == 0
