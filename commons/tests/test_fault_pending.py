"""Invalidations kept during an outage: a flush covers everything, and replaying them on Redis
removes exactly their entries (the set itself is specified in test_pending_invalidations.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from commons.cache.backends.redis import RedisStore
from commons.cache.backends.redis.connection import create_redis_client
from commons.cache.pending import PendingInvalidations
from commons.cache.scope import CacheScope, InvalidationTarget, ScopedKey
from commons.cache.settings import CacheSettings


def test_a_flush_covers_everything_kept_before_and_after_it() -> None:
    pending = PendingInvalidations(100)
    pending.add(InvalidationTarget("config"))
    pending.add_everything()
    pending.add(InvalidationTarget("reports", "acme"))
    pending.add_key("p:other:key", None)

    assert pending.everything
    assert len(pending) == 1


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisStore]:
    settings = CacheSettings(REDIS_URL=redis_url, CACHE_PREFIX="pending")
    store = RedisStore(create_redis_client(settings), "pending")
    try:
        yield store
    finally:
        await store.aclose()


async def _write(store: RedisStore, namespace: str, tenant: str) -> ScopedKey:
    key = ScopedKey(f"pending:{namespace}:tenant_{tenant}:/x:0", CacheScope(namespace, tenant))
    await store.set(key, b"{}", 60, key.scope)  # type: ignore[arg-type]
    return key


async def test_applying_the_kept_invalidations_removes_exactly_their_entries(
    redis_store: RedisStore,
) -> None:
    acme = await _write(redis_store, "config", "acme")
    globex = await _write(redis_store, "config", "globex")
    report = await _write(redis_store, "reports", "acme")
    other = await _write(redis_store, "reports", "globex")
    pending = PendingInvalidations(100)
    pending.add(InvalidationTarget("config", "acme"))
    pending.add_key(report, report.scope)

    await pending.apply_to(redis_store)

    assert not pending
    assert (await redis_store.get_with_ttl(acme))[1] is None
    assert (await redis_store.get_with_ttl(report))[1] is None
    assert (await redis_store.get_with_ttl(globex))[1] == b"{}"
    assert (await redis_store.get_with_ttl(other))[1] == b"{}"


async def test_a_kept_flush_removes_every_entry_of_the_prefix(redis_store: RedisStore) -> None:
    keys = [await _write(redis_store, ns, t) for ns in ("config", "reports") for t in ("a", "b")]
    pending = PendingInvalidations(100)
    pending.add_everything()

    await pending.apply_to(redis_store)

    assert not pending
    for key in keys:
        assert (await redis_store.get_with_ttl(key))[1] is None
