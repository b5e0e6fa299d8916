"""The cache layer's own specification: lookups, stores, removals and locks, on every backend.

The layer sits between the request path and the stores. These specs drive it directly (no app,
no decorator), on the in-memory tier and on a real Redis: what a read returns after a write, what
each removal removes, what a disabled cache does,, what is kept for Redis while it
cannot be reached, and the fastapi-cache2 adapter's link from a request's read to its write.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from commons.cache.backends.factory import memory_store, redis_store
from commons.cache.events import CacheEvents
from commons.cache.fastapi_cache_backend import LayerBackend
from commons.cache.layer import CacheLayer
from commons.cache.scope import CacheScope, InvalidationTarget, ScopedKey
from commons.cache.settings import CacheSettings
from commons.testing.redis_server import RedisServer, free_port

FINGERPRINT = b"route-v1"

MakeLayer = Callable[..., Awaitable[CacheLayer]]


def key(namespace: str, tenant: str, user: str | None = None, path: str = "/x") -> ScopedKey:
    """An entry key as the key builders make it, carrying its scope."""
    scope = f"tenant_{tenant}" + (f":user_{user}" if user is not None else "")
    return ScopedKey(
        f"test-cache:{namespace}:{scope}:{path}:0", CacheScope(namespace, tenant, user)
    )


@pytest.fixture
async def make_layer(
    make_settings: Callable[..., CacheSettings],
) -> AsyncIterator[MakeLayer]:
    """``await make_layer(redis_url_or_None, **settings)``: a started layer, closed after the
    test."""
    layers: list[CacheLayer] = []

    async def make(redis_url: str | None, **overrides: object) -> CacheLayer:
        settings = make_settings(redis_url, **overrides)
        layer = CacheLayer(
            settings,
            redis=redis_store(settings) if redis_url else None,
            memory=memory_store(settings),
        )
        layers.append(layer)
        await layer.start()
        return layer

    yield make
    for layer in layers:
        await layer.aclose()


@pytest.fixture(params=["memory", "redis"])
async def layer(request: pytest.FixtureRequest, make_layer: MakeLayer) -> CacheLayer:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return await make_layer(url)


async def fill(layer: CacheLayer, entry: str, payload: bytes = b'{"v":1}') -> None:
    """Reads ``entry`` (a miss) and stores ``payload`` under the read's token, as a miss does."""
    lookup = await layer.lookup(entry, FINGERPRINT)
    assert lookup is not None
    written = await layer.store(
        entry,
        payload,
        kind=b"b",
        expire=60,
        stale_seconds=0,
        fingerprint=FINGERPRINT,
        token=lookup.token,
    )
    assert written is not None


async def cached(layer: CacheLayer, entry: str) -> bytes | None:
    lookup = await layer.lookup(entry, FINGERPRINT)
    assert lookup is not None
    return lookup.value.payload if lookup.value is not None else None


# -- reads and writes ---------------------------------------------------------------------------


async def test_a_stored_value_is_what_the_next_lookup_returns(layer: CacheLayer) -> None:
    entry = key("config", "acme")
    await fill(layer, entry, b'{"v":42}')

    assert await cached(layer, entry) == b'{"v":42}'


async def test_a_value_stored_for_another_fingerprint_is_a_miss(layer: CacheLayer) -> None:
    entry = key("config", "acme")
    await fill(layer, entry)

    lookup = await layer.lookup(entry, b"route-v2")

    assert lookup is not None
    assert lookup.value is None


async def test_a_value_computed_before_an_invalidation_is_not_stored_after_it(
    layer: CacheLayer,
) -> None:
    entry = key("config", "acme")
    lookup = await layer.lookup(entry, FINGERPRINT)
    assert lookup is not None
    await layer.invalidate(InvalidationTarget("config", "acme"))

    written = await layer.store(
        entry,
        b'{"v":"old"}',
        kind=b"b",
        expire=60,
        stale_seconds=0,
        fingerprint=FINGERPRINT,
        token=lookup.token,
    )

    assert written is None
    assert await cached(layer, entry) is None


async def test_a_key_outside_the_prefix_is_never_read_nor_deleted(layer: CacheLayer) -> None:
    foreign = "other-service:config:tenant_acme:/x:0"

    assert await layer.lookup(foreign, FINGERPRINT) is None
    assert await layer.token_now(foreign) is None
    assert await layer.delete(foreign) == 0


# -- removals -----------------------------------------------------------------------------------


async def test_deleting_a_key_removes_that_entry_and_leaves_other_scopes_cached(
    layer: CacheLayer,
) -> None:
    # (On Redis a deletion retires its scope's generation: the scope's other entries miss too.)
    gone, kept = key("config", "acme"), key("config", "globex")
    await fill(layer, gone)
    await fill(layer, kept)

    assert await layer.delete(gone) >= 1

    assert await cached(layer, gone) is None
    assert await cached(layer, kept) is not None


async def test_invalidating_a_tenant_leaves_other_tenants_and_namespaces_cached(
    layer: CacheLayer,
) -> None:
    acme, acme_user = key("config", "acme"), key("config", "acme", "ann")
    other_tenant, other_namespace = key("config", "globex"), key("config_v2", "acme")
    for entry in (acme, acme_user, other_tenant, other_namespace):
        await fill(layer, entry)

    await layer.invalidate(InvalidationTarget("config", "acme"))

    assert await cached(layer, acme) is None
    assert await cached(layer, acme_user) is None
    assert await cached(layer, other_tenant) is not None
    assert await cached(layer, other_namespace) is not None


async def test_clearing_removes_every_entry_of_the_prefix(layer: CacheLayer) -> None:
    entries = [key("config", "acme"), key("reports", "globex", "bob")]
    for entry in entries:
        await fill(layer, entry)

    await layer.clear()

    assert [await cached(layer, entry) for entry in entries] == [None, None]


async def test_a_disabled_cache_stores_nothing_and_every_removal_is_a_no_op(
    make_layer: MakeLayer, redis_url: str
) -> None:
    # Even with a Redis configured: nothing is kept for it either.
    layer = await make_layer(redis_url, CACHE_ENABLED=False)
    entry = key("config", "acme")

    assert await layer.lookup(entry, FINGERPRINT) is None
    assert await layer.token_now(entry) is None
    assert await layer.delete(entry) == 0
    assert await layer.invalidate(InvalidationTarget("config")) == 0
    assert await layer.clear() == 0
    assert layer.status().pending_invalidations == 0


async def test_removals_while_redis_is_down_are_kept_then_applied_when_it_answers(
    make_layer: MakeLayer, own_redis: RedisServer
) -> None:
    layer = await make_layer(
        own_redis.url, REDIS_SOCKET_TIMEOUT_SECONDS=0.2, REDIS_CONNECT_TIMEOUT_SECONDS=0.2
    )
    deleted, invalidated, kept = key("a", "acme"), key("b", "acme"), key("c", "acme")
    for entry in (deleted, invalidated, kept):
        await fill(layer, entry)
    own_redis.pause()
    try:
        await layer.delete(deleted)  # times out: kept, and the layer leaves Redis at once
        assert layer.state.value == "degraded"
        await layer.invalidate(InvalidationTarget("b"))
        assert layer.status().pending_invalidations == 2
    finally:
        own_redis.resume()

    assert await layer.try_recover()

    assert layer.status().pending_invalidations == 0
    assert await cached(layer, deleted) is None
    assert await cached(layer, invalidated) is None
    assert await cached(layer, kept) is not None


class _StartFlushes(CacheEvents):
    def __init__(self) -> None:
        self.start_flushes = 0

    def start_flush_kept(self) -> None:
        self.start_flushes += 1


async def test_a_start_while_redis_is_down_removes_every_entry_before_reading_redis_again(
    make_settings: Callable[..., CacheSettings],
) -> None:
    # Without a journal, nothing says what a process stopped during this outage had kept.
    with RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]) as redis:
        settings = make_settings(
            redis.url, REDIS_SOCKET_TIMEOUT_SECONDS=0.2, REDIS_CONNECT_TIMEOUT_SECONDS=0.2
        )
        before = CacheLayer(settings, redis=redis_store(settings), memory=memory_store(settings))
        await before.start()
        entries = [key("a", "acme"), key("b", "globex", "bob")]
        for entry in entries:
            await fill(before, entry)
        await before.aclose()
        redis.kill()
        events = _StartFlushes()
        layer = CacheLayer(
            settings, redis=redis_store(settings), memory=memory_store(settings), events=events
        )
        try:
            await layer.start()
            assert layer.state.value == "degraded"
            assert "CACHE_FLUSH_AFTER_DEGRADED_START" in layer.status().reason
            assert layer.status().pending_invalidations == 1
            assert events.start_flushes == 1

            redis.start()  # with its data: the entries are back
            assert await layer.try_recover()

            assert layer.status().pending_invalidations == 0
            assert [await cached(layer, entry) for entry in entries] == [None, None]
        finally:
            await layer.aclose()


@pytest.mark.parametrize("setting", ["off", "journal"])
async def test_a_start_while_redis_is_down_keeps_nothing_when_told_or_with_a_journal(
    setting: str, make_layer: MakeLayer, tmp_path: Path
) -> None:
    overrides: dict[str, object] = (
        {"CACHE_FLUSH_AFTER_DEGRADED_START": False}
        if setting == "off"
        else {"CACHE_INVALIDATION_JOURNAL": str(tmp_path)}
    )

    layer = await make_layer(f"redis://127.0.0.1:{free_port()}/0", **overrides)

    assert layer.state.value == "degraded"
    assert layer.status().pending_invalidations == 0
    assert "CACHE_FLUSH_AFTER_DEGRADED_START" not in layer.status().reason


# -- replica locks ------------------------------------------------------------------------------


async def test_without_a_shared_store_no_replica_lock_is_taken(make_layer: MakeLayer) -> None:
    layer = await make_layer(None)

    assert await layer.try_lock("test-cache:#lock:k", b"me", 1_000) is None


async def test_a_replica_lock_is_held_once_and_released_by_its_holder_only(
    make_layer: MakeLayer, redis_url: str
) -> None:
    layer = await make_layer(redis_url)

    assert await layer.try_lock("test-cache:#lock:k", b"me", 10_000) is True
    assert await layer.try_lock("test-cache:#lock:k", b"other", 10_000) is False
    await layer.unlock("test-cache:#lock:k", b"other")
    assert await layer.try_lock("test-cache:#lock:k", b"other", 10_000) is False
    await layer.unlock("test-cache:#lock:k", b"me")
    assert await layer.try_lock("test-cache:#lock:k", b"other", 10_000) is True


# -- the fastapi-cache2 adapter: a request's read hands its token to its write ------------------


async def test_the_adapter_does_not_store_a_value_read_before_an_invalidation(
    layer: CacheLayer,
) -> None:
    adapter = LayerBackend(lambda: layer)
    entry = key("config", "acme")
    assert await adapter.get_with_ttl(entry) == (0, None)
    await layer.invalidate(InvalidationTarget("config", "acme"))

    await adapter.set(entry, b'{"v":"old"}', 60)

    assert await adapter.get(entry) is None


async def test_the_adapter_ties_a_read_to_a_write_of_the_same_key_in_the_same_task_only(
    layer: CacheLayer,
) -> None:
    adapter = LayerBackend(lambda: layer)
    entry, other = key("config", "acme", path="/a"), key("config", "acme", path="/b")
    assert await adapter.get_with_ttl(entry) == (0, None)
    await layer.invalidate(InvalidationTarget("config", "acme"))

    # A task started after the read (it inherits the context) wrote with no read of its own.
    await asyncio.create_task(adapter.set(entry, b'{"v":"task"}', 60))
    # Another key in this task was not read at all.
    await adapter.set(other, b'{"v":"other"}', 60)

    assert await adapter.get(entry) == b'{"v":"task"}'
    assert await adapter.get(other) == b'{"v":"other"}'


async def test_remembered_values_are_not_walked_by_the_garbage_collector(
    layer: CacheLayer,
) -> None:
    # A full collection walks every object the collector tracks: a parsed value kept per key
    # read made each one take 100-450 ms over 100k keys. What the layer remembers of a value it
    # read must be invisible to it.
    # Each read with a key object of its own, as each request builds one (with its scope): a
    # memo keyed by it would keep it alive.
    paths = [f"/item/{n}" for n in range(2_000)]
    for path in paths:
        await fill(layer, key("tenant_config", "1", path=path))
    gc.collect()
    tracked_before = len(gc.get_objects())

    for path in paths:
        assert await cached(layer, key("tenant_config", "1", path=path)) == b'{"v":1}'
    gc.collect()

    assert len(gc.get_objects()) - tracked_before < len(paths) // 4  # not one per value
