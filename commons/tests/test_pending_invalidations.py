"""PendingInvalidations: invalidations kept during an outage stay few, and none is ever lost."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any
from unittest.mock import patch

from hypothesis import given
from hypothesis import strategies as st

from commons.cache import pending as pending_module
from commons.cache import pending_structures
from commons.cache.backends.memory import MemoryStore
from commons.cache.pending import PendingInvalidations, PendingItem
from commons.cache.scope import CacheScope, InvalidationTarget


def target(
    namespace: str, tenant_id: str | None = None, user_id: str | None = None
) -> InvalidationTarget:
    return InvalidationTarget(namespace, tenant_id, user_id)


def pending_with(*targets: InvalidationTarget, max_items: int = 100) -> PendingInvalidations:
    pending = PendingInvalidations(max_items)
    for each in targets:
        pending.add(each)
    return pending


# -- deduplication by coverage ---------------------------------------------------------------------


def test_nothing_is_pending_at_first() -> None:
    pending = PendingInvalidations(10)

    assert not pending
    assert len(pending) == 0
    assert pending.targets() == []


def test_the_same_invalidation_twice_is_kept_once() -> None:
    pending = pending_with(target("tenant_config", "acme"), target("tenant_config", "acme"))

    assert pending.targets() == [target("tenant_config", "acme")]


def test_an_invalidation_covered_by_a_kept_one_adds_nothing() -> None:
    pending = pending_with(
        target("tenant_config"),
        target("tenant_config", "acme"),
        target("tenant_config", "acme", "alice"),
    )

    assert pending.targets() == [target("tenant_config")]


def test_a_tenant_covers_its_users_but_not_other_tenants_users() -> None:
    pending = pending_with(
        target("profile", "acme"),
        target("profile", "acme", "alice"),
        target("profile", "globex", "alice"),
    )

    assert pending.targets() == [target("profile", "acme"), target("profile", "globex", "alice")]


def test_a_wider_invalidation_absorbs_the_narrower_ones_it_covers() -> None:
    pending = pending_with(
        target("profile", "acme", "alice"),
        target("profile", "acme", "bob"),
        target("profile", "globex"),
        target("profile", "acme"),
    )
    assert pending.targets() == [target("profile", "globex"), target("profile", "acme")]

    pending.add(target("profile"))
    assert pending.targets() == [target("profile")]


def test_namespaces_that_share_a_textual_prefix_do_not_cover_each_other() -> None:
    pending = pending_with(
        target("tenant"), target("tenant_config", "acme"), target("tenant_config")
    )

    assert pending.targets() == [target("tenant"), target("tenant_config")]


def test_distinct_invalidations_are_kept_in_the_order_they_came() -> None:
    wanted = [target("b"), target("a", "t1"), target("c", "t1", "u1"), target("a", "t2")]

    assert pending_with(*wanted).targets() == wanted


def test_a_target_absorbs_pending_single_keys_of_its_scope() -> None:
    pending = PendingInvalidations(10)
    pending.add_key(
        "cache:profile:tenant_acme:user_alice:/me:0", CacheScope("profile", "acme", "alice")
    )
    pending.add_key("cache:profile:tenant_globex:/list:0", CacheScope("profile", "globex"))

    pending.add(target("profile", "acme"))

    assert pending.keys() == ["cache:profile:tenant_globex:/list:0"]
    assert pending.targets() == [target("profile", "acme")]


def test_a_single_key_covered_by_a_pending_target_adds_nothing() -> None:
    pending = pending_with(target("profile", "acme"))

    pending.add_key("cache:profile:tenant_acme:/list:0", CacheScope("profile", "acme"))

    assert pending.keys() == []
    assert len(pending) == 1


# -- overflow: wider, never lost -------------------------------------------------------------------


def test_past_the_bound_invalidations_are_widened_to_their_namespaces() -> None:
    pending = pending_with(
        target("tenant_config", "t1"),
        target("tenant_config", "t2"),
        target("profile", "t1", "u1"),
        target("profile", "t2", "u2"),
        max_items=3,
    )

    assert set(pending.targets()) == {target("tenant_config"), target("profile")}


def test_widening_never_loses_a_namespace() -> None:
    namespaces = [f"ns{n}" for n in range(20)]
    pending = PendingInvalidations(5)

    for namespace in namespaces:
        for tenant in ("t1", "t2", "t3"):
            pending.add(target(namespace, tenant, "u1"))

    kept = {each.namespace for each in pending.targets()}
    assert kept == set(namespaces)
    assert all(each.tenant_id is None for each in pending.targets())


def test_after_widening_new_invalidations_are_deduplicated_against_the_wider_ones() -> None:
    pending = pending_with(target("a", "t1"), target("a", "t2"), target("b", "t1"), max_items=2)
    assert set(pending.targets()) == {target("a"), target("b")}

    pending.add(target("a", "t9", "u9"))

    assert set(pending.targets()) == {target("a"), target("b")}


def test_a_single_key_whose_namespace_is_unknown_widens_to_a_flush() -> None:
    pending = PendingInvalidations(1)
    pending.add(target("a", "t1"))

    pending.add_key("some-foreign-key", None)

    assert pending.everything


invalidation_targets = st.builds(
    lambda namespace, tenant, user: target(namespace, tenant, user if tenant else None),
    st.sampled_from(["tenant", "tenant_config", "profile", "a*", "ns:x"]),
    st.one_of(st.none(), st.sampled_from(["t1", "t2", "t3", "*"])),
    st.one_of(st.none(), st.sampled_from(["u1", "u2", "u3"])),
)


@given(st.lists(invalidation_targets, max_size=40), st.integers(min_value=1, max_value=8))
def test_every_invalidation_ever_added_stays_covered(
    added: list[InvalidationTarget], max_items: int
) -> None:
    pending = pending_with(*added, max_items=max_items)

    for each in added:
        assert any(kept.covers(each) for kept in pending.targets()), each
    assert len(pending) <= max(max_items, len({each.namespace for each in added}))


# -- applying them ---------------------------------------------------------------------------------


async def test_applying_removes_what_each_kept_invalidation_names_and_empties_the_set() -> None:
    store = MemoryStore(100)
    scopes = {
        "acme": CacheScope("tenant_config", "acme"),
        "globex": CacheScope("tenant_config", "globex"),
        "alice": CacheScope("profile", "acme", "alice"),
        "bob": CacheScope("profile", "acme", "bob"),
    }
    for name, scope in scopes.items():
        await store.set(name, b"v", 60, scope)
    pending = pending_with(target("tenant_config", "acme"), target("profile", "acme", "alice"))

    assert await pending.apply_to(store) == 2

    assert not pending
    assert [name for name in scopes if (await store.get_with_ttl(name))[1] is not None] == [
        "globex",
        "bob",
    ]


def test_a_namespace_absorbs_every_kept_key_and_target_of_its_tenants_and_users() -> None:
    pending = PendingInvalidations(100)
    pending.add(target("profile", "acme", "alice"))
    pending.add(target("other", "acme"))
    pending.add_key("k-tenant", CacheScope("profile", "acme"))
    pending.add_key("k-user", CacheScope("profile", "globex", "bob"))
    pending.add_key("k-namespace", CacheScope("profile"))
    pending.add_key("k-other", CacheScope("other", "globex"))

    pending.add(target("profile"))

    assert pending.targets() == [target("other", "acme"), target("profile")]
    assert pending.keys() == ["k-other"]
    pending.add_key("k-later", CacheScope("profile", "initech", "carol"))
    assert pending.keys() == ["k-other"]


def test_a_renewed_invalidation_moves_behind_the_others() -> None:
    pending = pending_with(target("a", "t1"), target("b"), target("a", "t1"))

    assert pending.targets() == [target("b"), target("a", "t1")]


def test_what_is_kept_reads_back_as_the_same_set() -> None:
    pending = pending_with(target("a", "t1"), target("b", "t2", "u2"))
    pending.add_key("k", CacheScope("c", "t3"))
    pending.add_key("foreign", None)

    copy = PendingInvalidations(100)
    for item in pending.items():
        copy.add_item(item)

    assert copy.items() == pending.items()
    copy.add_everything()
    assert copy.items() == [None]


# -- many kept: the order, the widening and the release stay exact -----------------------------


def test_renewals_keep_the_order_of_the_latest_requests_across_a_large_set() -> None:
    # Past a few hundred items the set is split into shards: the order must not follow them.
    pending = PendingInvalidations(10_000)
    wanted: dict[object, None] = {}
    for n in range(3_000):
        each = target(f"ns{n % 7}", f"t{n}", f"u{n}" if n % 2 else None)
        pending.add(each)
        pending.add_key(f"key{n}", CacheScope(f"other{n % 5}", f"t{n}", "u"))
        wanted[each] = None
        wanted[f"key{n}"] = None
        if n % 3 == 0:  # an older one asked again: it moves behind every other
            again = n // 2
            older = target(f"ns{again % 7}", f"t{again}", f"u{again}" if again % 2 else None)
            pending.add(older)
            pending.add_key(f"key{again}", CacheScope(f"other{again % 5}", f"t{again}", "u"))
            for moved in (older, f"key{again}"):
                del wanted[moved]
                wanted[moved] = None

    assert pending.targets() == [each for each in wanted if isinstance(each, InvalidationTarget)]
    assert pending.keys() == [each for each in wanted if isinstance(each, str)]
    assert len(pending) == 6_000


async def test_a_large_set_is_replayed_oldest_first_and_emptied() -> None:
    store = MemoryStore(10)
    pending = PendingInvalidations(10_000)
    for n in range(2_000):
        pending.add(target("ns", f"t{n}"))
    pending.add(target("ns", "t0"))  # renewed: now the newest
    order = pending.targets()

    await pending.apply_to(store)

    assert order[-1] == target("ns", "t0")
    assert order[0] == target("ns", "t1")
    assert not pending
    assert pending.targets() == []


async def test_a_widening_keeps_only_the_namespaces_still_kept() -> None:
    pending = PendingInvalidations(3)
    pending.add(target("gone", "t1"))
    pending.add_key("k0", CacheScope("gone", "t2"))
    pending.add(target("gone"))  # absorbs both
    await pending.apply_to(MemoryStore(10))
    pending.add(target("a", "t1"))
    pending.add_key("k", CacheScope("b", "t1"))
    pending.add(target("a", "t2"))

    pending.add(target("c", "t1", "u1"))

    assert set(pending.targets()) == {target("a"), target("b"), target("c")}
    assert pending.keys() == []


async def test_a_key_of_unknown_namespace_widens_to_a_flush_only_while_it_is_kept() -> None:
    pending = PendingInvalidations(2)
    pending.add_key("foreign", None)
    await pending.apply_to(MemoryStore(10))
    pending.add(target("a", "t1"))
    pending.add(target("a", "t2"))

    pending.add(target("b", "t1"))

    assert not pending.everything
    assert set(pending.targets()) == {target("a"), target("b")}


def test_after_widening_a_large_set_everything_replaced_is_freed_without_the_collector() -> None:
    pending = PendingInvalidations(5_000)
    gc.collect()
    gc.disable()
    try:
        for n in range(5_001):
            pending.add_key(f"key{n}", CacheScope(f"ns{n % 3}", f"t{n}", f"u{n}"))
        assert set(pending.targets()) == {target("ns0"), target("ns1"), target("ns2")}
        # What the widening replaced is freed a share per call: these calls finish it.
        for n in range(5_001):
            pending.add(target(f"ns{n % 3}", f"t{n}"))
        assert len(pending) == 3
        # Nothing it let go of was left in a reference cycle.
        assert gc.collect() == 0
    finally:
        gc.enable()


class _Model:
    """What the set keeps, by brute force: each call scans everything kept."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self.everything = False
        self.widened = False
        self.kept: dict[InvalidationTarget | str, CacheScope | None] = {}

    def _renew_covering(self, scope: CacheScope | None) -> bool:
        for kept in self.kept:
            if isinstance(kept, InvalidationTarget) and scope is not None and kept.matches(scope):
                self.kept[kept] = self.kept.pop(kept)
                return True
        return False

    def add(self, new: InvalidationTarget) -> None:
        as_scope = CacheScope(new.namespace, new.tenant_id, new.user_id)
        if self.everything or self._renew_covering(as_scope):
            return
        for kept, scope in list(self.kept.items()):
            if isinstance(kept, InvalidationTarget):
                scope = CacheScope(kept.namespace, kept.tenant_id, kept.user_id)
            if scope is not None and new.matches(scope):
                del self.kept[kept]
        self.kept[new] = None
        self._compact()

    def add_key(self, key: str, scope: CacheScope | None) -> None:
        if self.everything or self._renew_covering(scope):
            return
        self.kept.pop(key, None)
        self.kept[key] = scope
        self._compact()

    def _compact(self) -> None:
        if len(self.kept) <= self.max_items:
            return
        self.widened = True
        if any(isinstance(kept, str) and scope is None for kept, scope in self.kept.items()):
            self.everything, self.kept = True, {}
            return
        namespaces = {
            kept.namespace if isinstance(kept, InvalidationTarget) else scope.namespace  # type: ignore[union-attr]
            for kept, scope in self.kept.items()
        }
        self.kept = {target(namespace): None for namespace in namespaces}


scopes = st.builds(
    lambda namespace, tenant, user: CacheScope(namespace, tenant, user if tenant else None),
    st.sampled_from(["a", "b", "c"]),
    st.one_of(st.none(), st.sampled_from(["t1", "t2"])),
    st.one_of(st.none(), st.sampled_from(["u1", "u2"])),
)
operations = st.one_of(
    st.tuples(st.just("add"), invalidation_targets),
    st.tuples(st.just("key"), st.sampled_from(["k1", "k2", "k3", "k4"]), scopes),
    st.tuples(st.just("foreign"), st.sampled_from(["f1", "f2"])),
    st.tuples(st.just("flush")),
    st.tuples(st.just("apply")),
)


@given(st.lists(operations, max_size=80), st.integers(min_value=1, max_value=12))
async def test_the_set_keeps_what_scanning_everything_would_keep(
    steps: list[tuple[Any, ...]], max_items: int
) -> None:
    # Tiny shards and release steps, so that a few items go through splitting and freeing.
    with (
        patch.object(pending_structures, "_SPLIT_AT", 2),
        patch.object(pending_module, "_RELEASE_BATCH", 2),
        patch.object(pending_module, "_SWEEP_BATCH", 2),
    ):
        pending, model = PendingInvalidations(max_items), _Model(max_items)
        for step in steps:
            if step[0] == "add":
                pending.add(step[1])
                model.add(step[1])
            elif step[0] in ("key", "foreign"):
                scope = step[2] if step[0] == "key" else None
                pending.add_key(step[1], scope)
                model.add_key(step[1], scope)
            elif step[0] == "flush":
                pending.add_everything()
                model.everything, model.kept = True, {}
            else:
                await pending.apply_to(MemoryStore(10))
                model.everything, model.kept, model.widened = False, {}, False
            assert pending.everything == model.everything
            assert len(pending) == int(model.everything) + len(model.kept)
            wanted_targets = [kept for kept in model.kept if isinstance(kept, InvalidationTarget)]
            if model.widened:  # the namespaces a widening keeps come in no particular order
                assert set(pending.targets()) == set(wanted_targets)
            else:
                assert pending.targets() == wanted_targets
            assert pending.keys() == [kept for kept in model.kept if isinstance(kept, str)]


# -- one wider invalidation over many kept ones --------------------------------------------------


def _many_of_profile(pending: PendingInvalidations, count: int) -> None:
    """Keeps ``count`` tenants, users and keys of ``profile``."""
    for n in range(count):
        pending.add(target("profile", f"t{n}", f"u{n}" if n % 2 else None))
        pending.add_key(f"key{n}", CacheScope("profile", f"t{n}", "u"))


def test_a_namespace_over_thousands_kept_leaves_only_itself_and_the_rest_at_once() -> None:
    pending = PendingInvalidations(100_000)
    pending.add(target("other", "t1"))
    _many_of_profile(pending, 3_000)
    pending.add_key("other-key", CacheScope("other", "t2"))

    pending.add(target("profile"))

    assert len(pending) == 3
    assert pending.targets() == [target("other", "t1"), target("profile")]
    assert pending.keys() == ["other-key"]
    assert pending.items() == [
        target("other", "t1"),
        target("profile"),
        ("other-key", CacheScope("other", "t2")),
    ]
    # Covered ones asked again only renew it; new ones below it are covered too.
    pending.add(target("profile", "t7"))
    pending.add_key("key8", CacheScope("profile", "t8", "u"))
    assert pending.targets() == [target("other", "t1"), target("profile")]
    assert len(pending) == 3


class _RecordingStore(MemoryStore):
    """A memory store that records what a replay asks of it, in order."""

    def __init__(self) -> None:
        super().__init__(10)
        self.asked: list[object] = []

    async def invalidate(self, target: InvalidationTarget) -> int:
        self.asked.append(target)
        return await super().invalidate(target)

    async def delete(self, key: str, scope: CacheScope | None = None) -> int:
        self.asked.append(key)
        return await super().delete(key, scope)


async def test_what_a_wider_invalidation_absorbed_is_never_replayed() -> None:
    pending = PendingInvalidations(100_000)
    pending.add(target("other", "t1"))
    _many_of_profile(pending, 3_000)
    pending.add_key("other-key", CacheScope("other", "t2"))
    pending.add(target("profile"))
    store = _RecordingStore()

    await pending.apply_to(store)

    assert store.asked == [target("other", "t1"), target("profile"), "other-key"]
    assert not pending
    assert pending.items() == []


async def test_a_replay_leaves_for_later_what_is_absorbed_while_it_is_applied() -> None:
    pending = PendingInvalidations(100)

    class AbsorbingStore(_RecordingStore):
        async def invalidate(self, target: InvalidationTarget) -> int:
            removed = await super().invalidate(target)
            if target.tenant_id == "t1":
                pending.add(InvalidationTarget("profile"))  # asked while t1 is applied
            return removed

    pending.add(target("profile", "t1"))
    pending.add(target("profile", "t2"))
    store = AbsorbingStore()

    await pending.apply_to(store)

    # t2 was absorbed before its turn; the namespace came after t1, so it is applied after it.
    assert store.asked == [target("profile", "t1"), target("profile")]
    assert not pending


async def test_a_key_asked_again_after_its_absorber_was_applied_is_kept_once_and_replayed() -> None:
    # One entry freed per step, so that absorbed items are still linked when the key comes back.
    with patch.object(pending_module, "_SWEEP_BATCH", 1):
        pending = PendingInvalidations(100)
        for n in range(20):
            pending.add_key(f"key{n}", CacheScope("profile", "t1", f"u{n}"))
        pending.add(target("profile", "t1"))
        store = _RecordingStore()
        await pending.apply_to(store)
        assert store.asked == [target("profile", "t1")]

        pending.add_key("key3", CacheScope("profile", "t1", "u3"))
        pending.add_key("key3", CacheScope("profile", "t1", "u3"))

        assert pending.keys() == ["key3"]
        assert len(pending) == 1
        await pending.apply_to(store)
        assert store.asked == [target("profile", "t1"), "key3"]
        assert not pending


async def _memory_left(free: Callable[[PendingInvalidations], Awaitable[None]]) -> float:
    """Keeps 5,000 tenants, users and keys of ``profile``, invalidates ``profile`` (which absorbs
    them) and runs ``free``: what is left of the memory they held, as a share of it."""
    pending = PendingInvalidations(100_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _many_of_profile(pending, 5_000)
        holding = tracemalloc.get_traced_memory()[0] - before
        pending.add(target("profile"))
        await free(pending)
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(pending) <= 1
    return left / holding


async def test_what_a_wider_invalidation_absorbed_is_freed_by_later_calls() -> None:
    async def later_calls(pending: PendingInvalidations) -> None:
        for n in range(1_000):  # covered: each only renews the namespace, and frees a share
            pending.add(target("profile", f"t{n}"))

    assert await _memory_left(later_calls) < 0.05


async def test_after_a_replay_what_was_absorbed_is_freed_without_further_calls() -> None:
    async def replayed(pending: PendingInvalidations) -> None:
        await pending.apply_to(MemoryStore(10))
        assert not pending
        await pending.release_all()

    assert await _memory_left(replayed) < 0.05


class _InterleavingStore(MemoryStore):
    """Runs the next of ``arriving`` (more invalidations kept) while each removal is applied,
    and records each removal with the clock at which it began."""

    def __init__(self, pending: PendingInvalidations, arriving: list[tuple[Any, ...]]) -> None:
        super().__init__(10)
        self.pending, self.arriving = pending, arriving
        self.clock = 0
        self.applied: list[tuple[int, PendingItem]] = []
        self.kept: list[tuple[int, PendingItem]] = []

    def keep(self, step: tuple[Any, ...]) -> tuple[int, PendingItem]:
        self.clock += 1
        if step[0] == "add":
            self.pending.add(step[1])
            return self.clock, step[1]
        if step[0] == "flush":
            self.pending.add_everything()
            return self.clock, None
        scope = step[2] if step[0] == "key" else None
        # A key names its scope, as the key builders' keys do.
        key = f"{step[1]}@{scope}"
        self.pending.add_key(key, scope)
        return self.clock, (key, scope)

    def _applying(self, item: PendingItem) -> None:
        self.applied.append((self.clock, item))
        if self.arriving:
            self.kept.append(self.keep(self.arriving.pop(0)))

    async def invalidate(self, target: InvalidationTarget) -> int:
        self._applying(target)
        return await super().invalidate(target)

    async def delete(self, key: str, scope: CacheScope | None = None) -> int:
        self._applying((key, scope))
        return await super().delete(key, scope)

    async def clear(self) -> int:
        self._applying(None)
        return await super().clear()


def _removes(applied: PendingItem, kept: PendingItem) -> bool:
    """Whether applying ``applied`` removes what ``kept`` names."""
    if applied is None:
        return True
    if kept is None:
        return False
    if isinstance(applied, InvalidationTarget):
        if isinstance(kept, InvalidationTarget):
            return applied.covers(kept)
        return kept[1] is not None and applied.matches(kept[1])
    return not isinstance(kept, InvalidationTarget) and applied[0] == kept[0]


@given(
    st.lists(operations.filter(lambda step: step[0] != "apply"), max_size=40),
    st.lists(operations.filter(lambda step: step[0] != "apply"), max_size=40),
    st.integers(min_value=1, max_value=12),
)
async def test_a_replay_applies_each_kept_invalidation_after_its_latest_request(
    before: list[tuple[Any, ...]], during: list[tuple[Any, ...]], max_items: int
) -> None:
    # Whatever arrives while the replay runs, absorbed, widened or renewed: each one is removed
    # by a removal that began after it was asked for.
    with (
        patch.object(pending_structures, "_SPLIT_AT", 2),
        patch.object(pending_module, "_RELEASE_BATCH", 2),
        patch.object(pending_module, "_SWEEP_BATCH", 2),
    ):
        pending = PendingInvalidations(max_items)
        store = _InterleavingStore(pending, list(during))
        store.kept = [store.keep(step) for step in before]

        await pending.apply_to(store)

        assert not pending
        for asked_at, item in store.kept:
            assert any(
                began >= asked_at and _removes(applied, item) for began, applied in store.applied
            ), (item, asked_at, store.applied)


async def test_a_replay_over_thousands_absorbed_lets_other_tasks_run_in_between() -> None:
    pending = PendingInvalidations(100_000)
    _many_of_profile(pending, 3_000)
    pending.add(target("profile"))  # 6,000 absorbed, all still linked in the order
    turns = 0
    replaying = True

    async def beside() -> None:
        nonlocal turns
        while replaying:
            await asyncio.sleep(0)
            turns += 1

    other = asyncio.create_task(beside())
    await asyncio.sleep(0)
    store = _RecordingStore()
    await pending.apply_to(store)
    replaying = False
    await other

    assert store.asked == [target("profile")]
    assert turns >= 10  # not one stretch over all 6,000 (the store here never yields)
