"""MemoryStore on its own: per-instance, bounded (LRU), TTL on an injected monotonic clock, indexed.

The clock is a plain callable the test moves forward, so expiry is exact and nothing sleeps.
"""

from __future__ import annotations

import pytest
from fastapi_cache.backends.inmemory import InMemoryBackend

from commons.cache.backends.memory import MemoryStore
from commons.cache.scope import CacheScope, InvalidationTarget


class FakeClock:
    """A monotonic clock that only moves when the test says so."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(100, clock=clock)


def scope(
    namespace: str = "ns", tenant_id: str | None = "t1", user_id: str | None = None
) -> CacheScope:
    return CacheScope(namespace, tenant_id, user_id)


async def value_of(store: MemoryStore, key: str) -> bytes | None:
    _, value = await store.get_with_ttl(key)
    return value


def bookkeeping(store: MemoryStore) -> tuple[int, int]:
    """(keys held in the scope index, items in the expiry heap): the store's internal bookkeeping.

    The one place these tests look inside the store: garbage there is invisible through the API
    but grows the process's memory.
    """
    indexed = sum(
        len(keys)
        for tenants in store._index.values()
        for users in tenants.values()
        for keys in users.values()
    )
    return indexed, len(store._expiry_heap)


# -- per instance ---------------------------------------------------------------------------------


async def test_two_stores_never_share_entries(clock: FakeClock) -> None:
    first, second = MemoryStore(10, clock=clock), MemoryStore(10, clock=clock)

    await first.set("cache:ns:tenant_1:/a:x", b"first", 60, scope())

    assert await value_of(second, "cache:ns:tenant_1:/a:x") is None
    assert len(second) == 0
    assert await value_of(first, "cache:ns:tenant_1:/a:x") == b"first"


async def test_unlike_fastapi_cache2_in_memory_backend_which_shares_one_dict() -> None:
    key = "commons-test:shared-by-every-instance"
    writer, reader = InMemoryBackend(), InMemoryBackend()
    try:
        await writer.set(key, b"leaked", 60)

        assert await reader.get(key) == b"leaked"
    finally:
        await writer.clear(key=key)


def test_a_store_needs_room_for_at_least_one_entry() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        MemoryStore(0)


# -- bounded, least recently used first ------------------------------------------------------------


async def test_the_store_never_holds_more_than_max_entries(clock: FakeClock) -> None:
    store = MemoryStore(3, clock=clock)

    for number in range(10):
        await store.set(f"k{number}", b"v", 60, scope())

    assert len(store) == 3
    assert [await value_of(store, f"k{n}") for n in (7, 8, 9)] == [b"v", b"v", b"v"]
    assert await value_of(store, "k0") is None


async def test_the_least_recently_used_entry_is_evicted_first(clock: FakeClock) -> None:
    store = MemoryStore(3, clock=clock)
    for key in ("a", "b", "c"):
        await store.set(key, key.encode(), 60, scope())

    assert await value_of(store, "a") == b"a"  # "a" is now the most recently used
    await store.set("d", b"d", 60, scope())

    assert await value_of(store, "a") == b"a"
    assert await value_of(store, "b") is None
    assert await value_of(store, "c") == b"c"
    assert await value_of(store, "d") == b"d"


async def test_rewriting_a_key_replaces_it_without_taking_a_second_slot(clock: FakeClock) -> None:
    store = MemoryStore(2, clock=clock)
    await store.set("a", b"old", 60, scope())
    await store.set("b", b"b", 60, scope())

    await store.set("a", b"new", 60, scope())

    assert len(store) == 2
    assert await value_of(store, "a") == b"new"
    assert await value_of(store, "b") == b"b"


# -- time to live on the injected clock ------------------------------------------------------------


async def test_an_entry_lives_exactly_its_ttl_on_the_monotonic_clock(
    store: MemoryStore, clock: FakeClock
) -> None:
    await store.set("k", b"v", 10, scope())

    clock.advance(9.5)
    assert await store.get_with_ttl("k") == (1, b"v")

    clock.advance(0.5)
    assert await store.get_with_ttl("k") == (0, None)


async def test_the_remaining_ttl_counts_down_in_whole_seconds_rounded_up(
    store: MemoryStore, clock: FakeClock
) -> None:
    await store.set("k", b"v", 300, scope())

    assert await store.get_with_ttl("k") == (300, b"v")
    clock.advance(0.1)
    assert await store.get_with_ttl("k") == (300, b"v")
    clock.advance(100)
    assert await store.get_with_ttl("k") == (200, b"v")


async def test_expired_entries_are_reclaimed_by_a_later_write_without_being_read(
    store: MemoryStore, clock: FakeClock
) -> None:
    for number in range(50):
        await store.set(f"short{number}", b"v", 5, scope(tenant_id=str(number)))
    await store.set("long", b"v", 60, scope())
    assert len(store) == 51

    clock.advance(6)
    await store.set("fresh", b"v", 60, scope())

    assert len(store) == 2
    assert bookkeeping(store) == (2, 2)


async def test_reclaim_expired_drops_only_expired_entries_and_says_how_many(
    store: MemoryStore, clock: FakeClock
) -> None:
    await store.set("soon", b"v", 5, scope())
    await store.set("later", b"v", 50, scope())
    await store.set("also-soon", b"v", 5, scope(user_id="u1"))

    assert store.reclaim_expired() == 0
    clock.advance(5)

    assert store.reclaim_expired() == 2
    assert len(store) == 1
    assert await value_of(store, "later") == b"v"
    assert bookkeeping(store) == (1, 1)


async def test_a_key_rewritten_with_a_longer_ttl_outlives_its_first_expiry(
    store: MemoryStore, clock: FakeClock
) -> None:
    await store.set("k", b"first", 5, scope())
    await store.set("k", b"second", 60, scope())

    clock.advance(10)
    store.reclaim_expired()

    assert await value_of(store, "k") == b"second"


async def test_rewriting_one_key_many_times_keeps_the_bookkeeping_bounded(
    store: MemoryStore,
) -> None:
    for number in range(5_000):
        await store.set("hot", str(number).encode(), 60, scope())

    indexed, heap_items = bookkeeping(store)
    assert len(store) == 1
    assert indexed == 1
    assert heap_items <= 2 * len(store) + 1024


# -- invalidation by scope, and an index without garbage -------------------------------------------


@pytest.fixture
async def populated(store: MemoryStore) -> MemoryStore:
    """Two namespaces; tenants t1 and t2; users u1 and u2 of t1; one entry without a tenant."""
    entries = {
        "cache:tenant:tenant_t1:/c:0": scope("tenant", "t1"),
        "cache:tenant:tenant_t2:/c:0": scope("tenant", "t2"),
        "cache:tenant:tenant_t1:user_u1:/me:0": scope("tenant", "t1", "u1"),
        "cache:tenant:tenant_t1:user_u2:/me:0": scope("tenant", "t1", "u2"),
        "cache:tenant:shared:0": scope("tenant", None),
        "cache:tenant_config:tenant_t1:/c:0": scope("tenant_config", "t1"),
    }
    for key, entry_scope in entries.items():
        await store.set(key, b"v", 60, entry_scope)
    return store


async def remaining(store: MemoryStore) -> set[str]:
    keys = [
        "cache:tenant:tenant_t1:/c:0",
        "cache:tenant:tenant_t2:/c:0",
        "cache:tenant:tenant_t1:user_u1:/me:0",
        "cache:tenant:tenant_t1:user_u2:/me:0",
        "cache:tenant:shared:0",
        "cache:tenant_config:tenant_t1:/c:0",
    ]
    return {key for key in keys if await value_of(store, key) is not None}


async def test_invalidating_a_namespace_removes_all_its_entries_and_no_other_namespace(
    populated: MemoryStore,
) -> None:
    assert await populated.invalidate(InvalidationTarget("tenant")) == 5

    assert await remaining(populated) == {"cache:tenant_config:tenant_t1:/c:0"}


async def test_invalidating_a_tenant_removes_its_entries_and_its_users_entries(
    populated: MemoryStore,
) -> None:
    assert await populated.invalidate(InvalidationTarget("tenant", "t1")) == 3

    assert await remaining(populated) == {
        "cache:tenant:tenant_t2:/c:0",
        "cache:tenant:shared:0",
        "cache:tenant_config:tenant_t1:/c:0",
    }


async def test_invalidating_a_user_removes_only_that_users_entries(
    populated: MemoryStore,
) -> None:
    assert await populated.invalidate(InvalidationTarget("tenant", "t1", "u1")) == 1

    assert "cache:tenant:tenant_t1:user_u1:/me:0" not in await remaining(populated)
    assert len(await remaining(populated)) == 5


async def test_invalidating_what_was_never_cached_removes_nothing(populated: MemoryStore) -> None:
    assert await populated.invalidate(InvalidationTarget("unknown")) == 0
    assert await populated.invalidate(InvalidationTarget("tenant", "t9")) == 0
    assert await populated.invalidate(InvalidationTarget("tenant", "t1", "u9")) == 0
    assert len(await remaining(populated)) == 6


async def test_invalidated_entries_leave_nothing_in_the_index(populated: MemoryStore) -> None:
    await populated.invalidate(InvalidationTarget("tenant"))
    await populated.invalidate(InvalidationTarget("tenant_config"))

    assert len(populated) == 0
    assert bookkeeping(populated)[0] == 0
    assert populated._index == {}


async def test_evicted_entries_leave_nothing_in_the_index(clock: FakeClock) -> None:
    store = MemoryStore(5, clock=clock)

    for number in range(1_000):
        await store.set(f"k{number}", b"v", 60, scope(f"ns{number}", f"t{number}", f"u{number}"))

    assert len(store) == 5
    assert bookkeeping(store)[0] == 5
    assert len(store._index) == 5


async def test_expired_entries_leave_nothing_in_the_index(
    store: MemoryStore, clock: FakeClock
) -> None:
    for number in range(20):
        await store.set(f"k{number}", b"v", 1, scope(f"ns{number}", "t", "u"))

    clock.advance(2)
    store.reclaim_expired()

    assert len(store) == 0
    assert store._index == {}
    assert bookkeeping(store) == (0, 0)


async def test_an_evicted_entry_is_not_counted_by_a_later_invalidation(clock: FakeClock) -> None:
    store = MemoryStore(2, clock=clock)
    for key in ("a", "b", "c"):
        await store.set(key, b"v", 60, scope())

    assert await store.invalidate(InvalidationTarget("ns")) == 2


async def test_delete_removes_one_entry_and_its_index_entry(store: MemoryStore) -> None:
    await store.set("k", b"v", 60, scope())

    assert await store.delete("k") == 1
    assert await store.delete("k") == 0
    assert bookkeeping(store)[0] == 0


async def test_clear_empties_the_store(populated: MemoryStore) -> None:
    assert await populated.clear() == 6

    assert len(populated) == 0
    assert bookkeeping(populated) == (0, 0)


async def test_closing_the_store_releases_its_entries(populated: MemoryStore) -> None:
    await populated.aclose()

    assert len(populated) == 0


# -- locks: add_if_absent / delete_if_equal --------------------------------------------------------


async def test_add_if_absent_stores_only_when_the_key_is_absent(store: MemoryStore) -> None:
    assert await store.add_if_absent("lock", b"me", 1_000) is True
    assert await store.add_if_absent("lock", b"other", 1_000) is False

    assert await value_of(store, "lock") == b"me"


async def test_add_if_absent_succeeds_again_once_the_lock_expired(
    store: MemoryStore, clock: FakeClock
) -> None:
    assert await store.add_if_absent("lock", b"me", 250) is True

    clock.advance(0.2)
    assert await store.add_if_absent("lock", b"other", 250) is False
    clock.advance(0.05)
    assert await store.add_if_absent("lock", b"other", 250) is True


async def test_delete_if_equal_releases_only_ones_own_lock(store: MemoryStore) -> None:
    await store.add_if_absent("lock", b"mine", 1_000)

    assert await store.delete_if_equal("lock", b"theirs") is False
    assert await value_of(store, "lock") == b"mine"
    assert await store.delete_if_equal("lock", b"mine") is True
    assert await value_of(store, "lock") is None
    assert await store.delete_if_equal("lock", b"mine") is False


async def test_an_expired_lock_cannot_be_released(store: MemoryStore, clock: FakeClock) -> None:
    await store.add_if_absent("lock", b"mine", 100)
    clock.advance(1)

    assert await store.delete_if_equal("lock", b"mine") is False


async def test_locks_are_not_removed_by_invalidations(populated: MemoryStore) -> None:
    await populated.add_if_absent("cache:tenant:tenant_t1:/c:0#lock", b"me", 1_000)

    await populated.invalidate(InvalidationTarget("tenant"))

    assert await value_of(populated, "cache:tenant:tenant_t1:/c:0#lock") == b"me"
