"""The store contract: one suite, run on every backend (memory, a real Redis, a Redis Cluster).

Whatever a backend does inside, the layer above sees the same thing: bytes in and bytes out, an
expiry, and invalidation by namespace, tenant and user that touches nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from commons.cache.backends.base import CacheStore
from commons.cache.backends.memory import MemoryStore
from commons.cache.backends.redis import RedisStore
from commons.cache.scope import CacheScope, InvalidationTarget

PREFIX = "svc-cache"

StoreFactory = Callable[[str], CacheStore]


@pytest.fixture(params=["memory", "redis", pytest.param("cluster", marks=pytest.mark.slow)])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """``make_store(prefix)``: a new store of the parametrized backend.

    Memory stores are per instance (the prefix is in the keys only); Redis stores share the
    session's server (or the session's 3-primary cluster), each with its own client and prefix.
    """
    stores: list[CacheStore] = []
    redis_url = None
    if request.param == "redis":
        redis_url = request.getfixturevalue("redis_url")
    elif request.param == "cluster":
        redis_url = request.getfixturevalue("redis_cluster_url")

    def make(prefix: str) -> CacheStore:
        store: CacheStore
        if redis_url is None:
            store = MemoryStore(1_000)
        elif request.param == "cluster":
            store = RedisStore(RedisCluster.from_url(redis_url), prefix)
        else:
            store = RedisStore(Redis.from_url(redis_url), prefix)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.aclose()


@pytest.fixture
def store(make_store: StoreFactory) -> CacheStore:
    return make_store(PREFIX)


def key(
    namespace: str, tenant: str | None = None, user: str | None = None, path: str = "/r"
) -> str:
    """A key in the format the key builders produce (the md5 part is fixed here)."""
    scope_text = "" if tenant is None else f":tenant_{tenant}"
    scope_text += "" if user is None else f":user_{user}"
    return f"{PREFIX}:{namespace}{scope_text}:{path}:d41d8cd98f00b204e9800998ecf8427e"


async def put(
    store: CacheStore,
    namespace: str,
    tenant: str | None = None,
    user: str | None = None,
    path: str = "/r",
    ttl: int = 60,
) -> str:
    entry_key = key(namespace, tenant, user, path)
    await store.set(entry_key, entry_key.encode(), ttl, CacheScope(namespace, tenant, user))
    return entry_key


async def cached(store: CacheStore, *keys: str) -> set[str]:
    """Those of ``keys`` that the store still answers."""
    return {k for k in keys if (await store.get_with_ttl(k))[1] is not None}


# -- bytes in, bytes out ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b'{"tenant": "t1", "plan": "pro"}',
        bytes(range(256)),
        b"\xff\xfe\x00\x80 not utf-8 \xc3\x28",
        b"",
        b"x" * 200_000,
    ],
    ids=["json", "every-byte", "invalid-utf8", "empty", "large"],
)
async def test_a_stored_value_comes_back_byte_for_byte(store: CacheStore, value: bytes) -> None:
    await store.set(key("ns", "t1"), value, 60, CacheScope("ns", "t1"))

    _, got = await store.get_with_ttl(key("ns", "t1"))

    assert got == value
    assert type(got) is bytes


async def test_a_missing_key_is_a_miss_with_no_ttl(store: CacheStore) -> None:
    assert await store.get_with_ttl(key("ns", "t1")) == (0, None)


async def test_get_with_ttl_reports_the_remaining_seconds(store: CacheStore) -> None:
    await store.set(key("ns", "t1"), b"v", 300, CacheScope("ns", "t1"))

    ttl, _ = await store.get_with_ttl(key("ns", "t1"))

    assert 299 <= ttl <= 300


async def test_writing_a_key_again_replaces_its_value_and_ttl(store: CacheStore) -> None:
    await store.set(key("ns", "t1"), b"old", 300, CacheScope("ns", "t1"))
    await store.set(key("ns", "t1"), b"new", 30, CacheScope("ns", "t1"))

    ttl, value = await store.get_with_ttl(key("ns", "t1"))

    assert value == b"new"
    assert 29 <= ttl <= 30


async def test_an_expired_entry_is_gone_and_not_counted_by_a_later_invalidation(
    store: CacheStore,
) -> None:
    short = await put(store, "ns", "t1", path="/short", ttl=1)
    long = await put(store, "ns", "t1", path="/long", ttl=60)

    await asyncio.sleep(1.1)

    assert await store.get_with_ttl(short) == (0, None)
    assert await cached(store, short, long) == {long}
    assert await store.invalidate(InvalidationTarget("ns")) == 1


async def test_delete_removes_one_key_and_says_whether_it_was_there(store: CacheStore) -> None:
    kept = await put(store, "ns", "t1", path="/kept")
    gone = await put(store, "ns", "t1", path="/gone")

    assert await store.delete(gone) == 1
    assert await store.delete(gone) == 0
    assert await cached(store, kept, gone) == {kept}


# -- invalidation by scope -------------------------------------------------------------------------


@pytest.fixture
async def entries(store: CacheStore) -> dict[str, str]:
    """Entries of two namespaces (one a textual prefix of the other), two tenants, two users."""
    return {
        "t1": await put(store, "tenant", "t1"),
        "t1-other-path": await put(store, "tenant", "t1", path="/other"),
        "t2": await put(store, "tenant", "t2"),
        "t1-u1": await put(store, "tenant", "t1", "u1", path="/me"),
        "t1-u2": await put(store, "tenant", "t1", "u2", path="/me"),
        "t2-u1": await put(store, "tenant", "t2", "u1", path="/me"),
        "unscoped": await put(store, "tenant", None, path="/public"),
        "config-t1": await put(store, "tenant_config", "t1"),
    }


async def surviving(store: CacheStore, entries: dict[str, str]) -> set[str]:
    alive = await cached(store, *entries.values())
    return {name for name, entry_key in entries.items() if entry_key in alive}


async def test_invalidating_a_namespace_removes_its_entries_only(
    store: CacheStore, entries: dict[str, str]
) -> None:
    removed = await store.invalidate(InvalidationTarget("tenant"))

    assert removed == 7
    assert await surviving(store, entries) == {"config-t1"}


async def test_an_invalidation_holds_when_it_returns_and_its_removal_may_come_after(
    store: CacheStore, entries: dict[str, str]
) -> None:
    """``invalidate_effective``, the layer's way: once it returns nothing of the target is
    served (gone, or under a generation that is no longer the scope's); the removal it hands
    back, which the layer runs in the background, removes the rest."""
    scope = CacheScope("tenant", "t1")
    before = await store.generation(scope)

    removed, removal = await store.invalidate_effective(InvalidationTarget("tenant", "t1"))

    read = await store.read(entries["t1"], scope)
    assert read.value is None or read.generation != before
    if removal is not None:
        removed += await removal()
    assert removed == 4
    assert await surviving(store, entries) == {"t2", "t2-u1", "unscoped", "config-t1"}


async def test_invalidating_a_tenant_removes_its_own_and_its_users_entries(
    store: CacheStore, entries: dict[str, str]
) -> None:
    removed = await store.invalidate(InvalidationTarget("tenant", "t1"))

    assert removed == 4
    assert await surviving(store, entries) == {"t2", "t2-u1", "unscoped", "config-t1"}


async def test_invalidating_a_user_removes_only_that_users_entries_of_that_tenant(
    store: CacheStore, entries: dict[str, str]
) -> None:
    removed = await store.invalidate(InvalidationTarget("tenant", "t1", "u1"))

    assert removed == 1
    assert await surviving(store, entries) == set(entries) - {"t1-u1"}


async def test_entries_without_a_tenant_go_only_with_their_whole_namespace(
    store: CacheStore, entries: dict[str, str]
) -> None:
    await store.invalidate(InvalidationTarget("tenant", "t1"))
    await store.invalidate(InvalidationTarget("tenant", "t2"))
    assert "unscoped" in await surviving(store, entries)

    await store.invalidate(InvalidationTarget("tenant"))
    assert "unscoped" not in await surviving(store, entries)


async def test_invalidating_again_removes_nothing_more(
    store: CacheStore, entries: dict[str, str]
) -> None:
    assert await store.invalidate(InvalidationTarget("tenant", "t1")) == 4

    assert await store.invalidate(InvalidationTarget("tenant", "t1")) == 0
    assert await store.invalidate(InvalidationTarget("tenant", "t1", "u1")) == 0


async def test_invalidating_scopes_never_cached_removes_nothing(
    store: CacheStore, entries: dict[str, str]
) -> None:
    assert await store.invalidate(InvalidationTarget("nothing-here")) == 0
    assert await store.invalidate(InvalidationTarget("tenant", "t9")) == 0
    assert await store.invalidate(InvalidationTarget("tenant", "t1", "u9")) == 0
    assert await surviving(store, entries) == set(entries)


async def test_entries_written_after_an_invalidation_are_cached_and_invalidated_again(
    store: CacheStore, entries: dict[str, str]
) -> None:
    await store.invalidate(InvalidationTarget("tenant", "t1"))
    again = await put(store, "tenant", "t1")

    assert await cached(store, again) == {again}
    assert await store.invalidate(InvalidationTarget("tenant")) == 4


# -- clear: this store's entries only --------------------------------------------------------------


async def test_clear_removes_this_prefixs_entries_and_no_other_prefixs(
    make_store: StoreFactory,
) -> None:
    mine, theirs = make_store(PREFIX), make_store("other-cache")
    my_keys = [await put(mine, "tenant", "t1"), await put(mine, "tenant", "t2", "u1")]
    their_key = "other-cache:tenant:tenant_t1:/r:d41d8cd98f00b204e9800998ecf8427e"
    await theirs.set(their_key, b"theirs", 60, CacheScope("tenant", "t1"))

    assert await mine.clear() >= len(my_keys)

    assert await cached(mine, *my_keys) == set()
    assert await theirs.get_with_ttl(their_key) == (60, b"theirs")
    assert await theirs.invalidate(InvalidationTarget("tenant")) == 1


async def test_after_clear_the_store_caches_and_invalidates_as_before(store: CacheStore) -> None:
    await put(store, "tenant", "t1")
    await store.clear()

    entry = await put(store, "tenant", "t1")

    assert await cached(store, entry) == {entry}
    assert await store.invalidate(InvalidationTarget("tenant", "t1")) == 1


# -- locks -----------------------------------------------------------------------------------------


async def test_add_if_absent_takes_a_lock_only_once(store: CacheStore) -> None:
    lock = f"{PREFIX}:#lock:tenant"

    assert await store.add_if_absent(lock, b"first", 5_000) is True
    assert await store.add_if_absent(lock, b"second", 5_000) is False
    assert (await store.get_with_ttl(lock))[1] == b"first"


async def test_add_if_absent_does_not_overwrite_a_cached_entry(store: CacheStore) -> None:
    entry = await put(store, "tenant", "t1")

    assert await store.add_if_absent(entry, b"lock", 5_000) is False
    assert (await store.get_with_ttl(entry))[1] == entry.encode()


async def test_a_lock_expires_after_its_ttl_in_milliseconds(store: CacheStore) -> None:
    lock = f"{PREFIX}:#lock:tenant"
    await store.add_if_absent(lock, b"first", 100)

    await asyncio.sleep(0.25)

    assert await store.add_if_absent(lock, b"second", 5_000) is True


async def test_delete_if_equal_removes_the_lock_only_for_its_holder(store: CacheStore) -> None:
    lock = f"{PREFIX}:#lock:tenant"
    await store.add_if_absent(lock, b"holder", 5_000)

    assert await store.delete_if_equal(lock, b"someone-else") is False
    assert (await store.get_with_ttl(lock))[1] == b"holder"
    assert await store.delete_if_equal(lock, b"holder") is True
    assert await store.get_with_ttl(lock) == (0, None)
    assert await store.delete_if_equal(lock, b"holder") is False


async def test_ping_answers_and_closing_twice_is_safe(make_store: StoreFactory) -> None:
    store = make_store(PREFIX)

    await store.ping()
    await store.aclose()
    await store.aclose()


async def test_a_redis_hit_after_a_write_asks_for_the_entry_only(redis_url: str) -> None:
    """The remaining time of bytes the store wrote itself is known: a hit is one MGET (the
    entry and its scope's generations)."""
    store = RedisStore(Redis.from_url(redis_url), "memo")
    probe = Redis.from_url(redis_url)
    try:
        await store.set("memo:ns:k", b"body", 60, CacheScope("ns", "t"))
        await probe.config_resetstat()
        for _ in range(3):
            assert await store.get_with_ttl("memo:ns:k") == (60, b"body")
        stats = await probe.info("commandstats")
        assert stats["cmdstat_mget"]["calls"] == 3
        assert "cmdstat_get" not in stats
        assert "cmdstat_pttl" not in stats
        # Another writer's bytes are new to this store: it asks for their time to live.
        await probe.set("memo:ns:k", b"other", ex=30)
        assert await store.get_with_ttl("memo:ns:k") == (30, b"other")
        await probe.delete("memo:ns:k")
        assert await store.get_with_ttl("memo:ns:k") == (0, None)
    finally:
        await store.aclose()
        await probe.aclose()


async def test_a_redis_fill_is_one_command_with_no_script_check(redis_url: str) -> None:
    """A fill and its index updates are one script, one command: no transaction, and no
    SCRIPT EXISTS (which redis-py's pipelines ask before every transaction that runs a script:
    a second round trip on every miss)."""
    store = RedisStore(Redis.from_url(redis_url), "fills")
    probe = Redis.from_url(redis_url)
    scope = CacheScope("ns", "t")
    try:
        generation = await store.generation(scope)
        await store.write("fills:ns:warm", b"w", 60, scope, generation)
        await probe.config_resetstat()
        for n in range(3):
            assert await store.write(f"fills:ns:k{n}", b"body", 60, scope, generation)
        stats = await probe.info("commandstats")
        read_back = [await store.read(f"fills:ns:k{n}", scope) for n in range(3)]
    finally:
        await store.aclose()
        await probe.aclose()

    assert stats["cmdstat_evalsha"]["calls"] == 3
    assert "cmdstat_exec" not in stats
    assert not [name for name in stats if name.startswith("cmdstat_script")]
    assert [read.value for read in read_back] == [b"body"] * 3


async def test_a_redis_fill_after_the_servers_scripts_were_flushed_is_stored(
    redis_url: str,
) -> None:
    store = RedisStore(Redis.from_url(redis_url), "flushed")
    probe = Redis.from_url(redis_url)
    scope = CacheScope("ns", "t")
    try:
        generation = await store.generation(scope)
        assert await store.write("flushed:ns:a", b"a", 60, scope, generation)
        await probe.script_flush()

        stored = await store.write("flushed:ns:b", b"b", 60, scope, generation)
        read = await store.read("flushed:ns:b", scope)
    finally:
        await store.aclose()
        await probe.aclose()

    assert stored
    assert read.value == b"b"


@pytest.mark.parametrize("topology", ["redis", pytest.param("cluster", marks=pytest.mark.slow)])
async def test_a_fill_keeps_its_scopes_generations_alive_as_long_as_its_entry(
    topology: str, request: pytest.FixtureRequest
) -> None:
    """An entry is served only while its scope's generations are there: a generation that expired
    before it would make it, and every entry of its scope with it, a miss at once. A generation is
    made with a short life (a scope that is read but never filled leaves nothing behind for long);
    the first fill under it makes it live at least as long as the entry."""
    url = request.getfixturevalue("redis_url" if topology == "redis" else "redis_cluster_url")
    connect = Redis.from_url if topology == "redis" else RedisCluster.from_url
    store = RedisStore(connect(url), "lifetime")
    probe = connect(url)
    scope = CacheScope("reports", "t1")
    entry_key = "lifetime:reports:tenant_t1:/r:d41d8cd98f00b204e9800998ecf8427e"
    try:
        generation = await store.generation(scope)
        made_for = {name: await probe.pttl(name) for name in store.generation_keys(scope)}
        await store.write(entry_key, b"body", 3600, scope, generation)

        entry_ms = await probe.pttl(entry_key)
        assert entry_ms > max(made_for.values()), "an entry that outlives a new generation"
        for name in store.generation_keys(scope):
            assert await probe.pttl(name) >= entry_ms, name
        read = await store.read(entry_key, scope)
        assert (read.value, read.generation) == (b"body", generation)
    finally:
        await store.aclose()
        await probe.aclose()


# -- the generation rule ---------------------------------------------------------------------------
#
# An entry is stored under the generations its scope had when its read began; it may be served only
# while the store still reports those very generations. Whatever ends a generation (an
# invalidation of the scope or of a wider one, its key deleted or evicted behind the store's back)
# turns the entries stored under it into misses, and never into anything else.

GENERATION_SCOPES = {
    "t1-u1": CacheScope("tenant", "t1", "u1"),
    "t1": CacheScope("tenant", "t1"),
    "t2": CacheScope("tenant", "t2"),
    "unscoped": CacheScope("tenant"),
    "config-t1": CacheScope("tenant_config", "t1"),
}

Filled = dict[str, tuple[str, CacheScope, bytes]]


async def served(store: CacheStore, entry_key: str, scope: CacheScope, generation: bytes) -> bool:
    """Whether the layer would serve an entry stored under ``generation``: the value is there and
    the read reports that generation (a store without generations: the value is there)."""
    read = await store.read(entry_key, scope)
    if read.value is None:
        return False
    return not store.uses_generations or read.generation == generation


async def fill_under_generations(store: CacheStore) -> Filled:
    """One entry per scope of :data:`GENERATION_SCOPES`, each filled under its scope's generation
    as the layer fills a miss."""
    filled: Filled = {}
    for name, scope in GENERATION_SCOPES.items():
        generation = await store.generation(scope)
        entry_key = key(scope.namespace, scope.tenant_id, scope.user_id, path=f"/{name}")
        assert await store.write(entry_key, name.encode(), 60, scope, generation)
        filled[name] = (entry_key, scope, generation)
    return filled


async def still_served(store: CacheStore, filled: Filled) -> set[str]:
    return {
        name
        for name, (entry_key, scope, generation) in filled.items()
        if await served(store, entry_key, scope, generation)
    }


@pytest.mark.parametrize(
    ("target", "missed"),
    [
        (InvalidationTarget("tenant"), {"t1-u1", "t1", "t2", "unscoped"}),
        (InvalidationTarget("tenant", "t1"), {"t1-u1", "t1"}),
        (InvalidationTarget("tenant", "t1", "u1"), {"t1-u1"}),
    ],
    ids=["namespace", "tenant", "user"],
)
async def test_an_entry_stored_under_its_scopes_generation_is_a_miss_once_that_scope_is_invalidated(
    store: CacheStore, target: InvalidationTarget, missed: set[str]
) -> None:
    filled = await fill_under_generations(store)
    assert await still_served(store, filled) == set(filled)

    # Only what makes the invalidation hold: its entries' removal may not have run yet.
    await store.invalidate_effective(target)

    assert await still_served(store, filled) == set(filled) - missed


async def test_a_fill_under_a_generation_retired_meanwhile_is_never_served(
    store: CacheStore,
) -> None:
    if not store.uses_generations:
        pytest.skip("without generations an invalidation removes entries exactly")
    scope = CacheScope("tenant", "t1", "u1")
    entry_key = key("tenant", "t1", "u1", path="/late")
    generation_at_read = await store.generation(scope)

    await store.invalidate_effective(InvalidationTarget("tenant", "t1"))
    await store.write(entry_key, b"computed before the invalidation", 60, scope, generation_at_read)

    assert not await served(store, entry_key, scope, generation_at_read)
    assert await store.generation(scope) != generation_at_read
    assert not await served(store, entry_key, scope, generation_at_read)


@pytest.mark.parametrize("topology", ["redis", pytest.param("cluster", marks=pytest.mark.slow)])
async def test_an_entry_whose_generation_key_was_deleted_or_evicted_is_only_ever_a_miss(
    topology: str, request: pytest.FixtureRequest
) -> None:
    """Each of a scope's generation keys in turn (however many the key format gives it) removed
    by another client, as an eviction or an operator would: every entry depending on it misses,
    the others are still served, and no later fill or read brings the old entries back."""
    url = request.getfixturevalue("redis_url" if topology == "redis" else "redis_cluster_url")
    connect = Redis.from_url if topology == "redis" else RedisCluster.from_url
    store = RedisStore(connect(url), PREFIX)
    behind_its_back = connect(url)
    try:
        for lost in store.generation_keys(GENERATION_SCOPES["t1-u1"]):
            filled = await fill_under_generations(store)
            depending = {
                name
                for name, (_, scope, _) in filled.items()
                if lost in store.generation_keys(scope)
            }
            assert depending, lost

            assert await behind_its_back.delete(lost) == 1

            assert await still_served(store, filled) == set(filled) - depending, lost
            for name in depending:
                entry_key, scope, old = filled[name]
                await store.write(entry_key, b"a late fill", 60, scope, old)
                assert await store.generation(scope) != old
            assert await still_served(store, filled) == set(filled) - depending, lost
    finally:
        await store.aclose()
        await behind_its_back.aclose()
