"""The bounded memo every hit-path memo uses: bounded in entries and bytes, oldest out first.

What the cache remembers per process is bounded in bytes, not only in entries.

Clients choose query strings, and a query string can be tens of kilobytes: whatever the cache keeps
about the queries it has seen (to find a key again without recomputing it) must stay within a few
megabytes however long and varied they are.
"""

from __future__ import annotations

import gc
import os
import random
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fastapi import FastAPI

import commons.cache.memo as memo_module
from commons.cache import CacheSettings, cache, close_cache, init_cache
from commons.cache.memo import NURSERY_MAX_ITEMS, BoundedMemo, HotMemo

from _support import acme_get_scope, walked_containers


def test_a_full_memo_forgets_its_oldest_quarter_and_keeps_the_rest() -> None:
    memo = BoundedMemo[int, str](100, 1 << 20)
    for n in range(100):
        memo.put(n, f"v{n}", 10)

    memo.put(100, "v100", 10)

    assert len(memo) == 76
    assert [memo.get(n) for n in range(25)] == [None] * 25
    assert all(memo.get(n) == f"v{n}" for n in range(25, 101))
    assert memo.bytes_held == 760


def test_the_byte_budget_is_kept_as_well_as_the_entry_budget() -> None:
    memo = BoundedMemo[int, bytes](1000, 4000, max_item_bytes=4000)
    for n in range(8):
        memo.put(n, b"x", 500)

    memo.put(8, b"y", 1000)

    assert memo.bytes_held <= 4000
    assert memo.get(8) == b"y"
    assert memo.get(0) is None
    assert memo.get(7) == b"x"


def test_an_item_above_its_share_is_not_remembered_and_flushes_nothing() -> None:
    memo = BoundedMemo[str, bytes](100, 6400)
    memo.put("small", b"s", 10)

    memo.put("huge", b"h" * 200, 200)

    assert memo.get("huge") is None
    assert memo.get("small") == b"s"


def test_a_working_set_within_the_bound_is_never_forgotten() -> None:
    memo = BoundedMemo[int, int](1000, 1 << 24)
    for _ in range(3):
        for n in range(1000):
            if memo.get(n) is None:
                memo.put(n, n, 64)

    assert all(memo.get(n) == n for n in range(1000))


def test_putting_a_key_again_replaces_it() -> None:
    memo = BoundedMemo[str, int](10, 1000, max_item_bytes=1000)
    memo.put("k", 1, 100)
    memo.put("k", 2, 50)

    assert memo.get("k") == 2
    assert memo.bytes_held == 50
    assert len(memo) == 1


def test_a_memo_that_has_been_full_keeps_what_it_holds_over_keys_put_once() -> None:
    # Misses of fresh keys (each put once, never read again) must not push out what is read.
    memo = BoundedMemo[int, str](100, 1 << 20, admit_seen_twice=True)
    for n in range(101):  # the last one makes room: the memo has been full
        memo.put(n, f"v{n}", 10)
    held = {n for n in range(101) if memo.get(n) is not None}

    for n in range(1_000, 6_000):
        memo.put(n, f"v{n}", 10)

    assert {n for n in range(101) if memo.get(n) is not None} == held
    assert all(memo.get(n) is None for n in range(1_000, 6_000))


def test_a_key_put_again_soon_gets_into_a_memo_that_has_been_full() -> None:
    memo = BoundedMemo[int, str](100, 1 << 20, admit_seen_twice=True)
    for n in range(200):
        memo.put(n, f"v{n}", 10)

    memo.put(7_000, "hot", 10)
    assert memo.get(7_000) is None
    memo.put(7_000, "hot", 10)

    assert memo.get(7_000) == "hot"
    memo.put(7_000, "hotter", 10)  # a key it holds always takes its new value
    assert memo.get(7_000) == "hotter"


def test_a_full_memo_of_plain_values_is_not_walked_by_the_garbage_collector() -> None:
    # Storing a newly made tuple in a dict makes the collector track the dict again, and only a
    # full collection stops tracking it: with every hit of a large working set storing one, each
    # memo of sixteen thousand items was walked by nearly every collection (five of them made a
    # full collection take 10 ms).
    memo = BoundedMemo[str, tuple[bytes, str, int]](10_000, 1 << 30)
    for n in range(30_000):
        memo.put(f"key-{n}", (b"value-%d" % n, f"text-{n}", n), 64)
        if n % 100 == 0:
            gc.collect(0)  # the youngest generation, collected every few hundred allocations

    assert walked_containers(memo) == []
    assert memo.get("key-29999") == (b"value-29999", "text-29999", 29999)
    assert memo.get("key-20000") == (b"value-20000", "text-20000", 20000)


def test_values_that_hold_objects_are_remembered_all_the_same() -> None:
    memo = BoundedMemo[int, list[int]](5_000, 1 << 30)
    for n in range(3 * NURSERY_MAX_ITEMS):
        memo.put(n, [n], 64)

    assert all(memo.get(n) == [n] for n in range(3 * NURSERY_MAX_ITEMS))
    assert len(memo) == 3 * NURSERY_MAX_ITEMS


# -- objects for the keys read most recently: as many as pay for themselves ------------------------

REVIEW_EVERY = 200


@pytest.fixture
def quick_reviews(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memo_module, "HOT_REVIEW_EVERY", REVIEW_EVERY)


def read_through(memo: HotMemo[int, object], keys: list[int]) -> int:
    """Reads ``keys`` as a hit path does (a miss makes the object and puts it); the misses."""
    misses = 0
    for key in keys:
        if memo.get(key) is None:
            misses += 1
            memo.put(key, object(), 10)
    return misses


def test_a_working_set_that_fits_keeps_its_objects(quick_reviews: None) -> None:
    memo = HotMemo[int, object](8, 100, 1 << 20)
    keys = list(range(80)) * 20  # eight reviews

    misses = read_through(memo, keys)

    assert misses == 80  # each key's first read only
    assert (memo.max_entries, len(memo)) == (100, 80)


def test_over_a_larger_working_set_only_a_few_objects_stay(quick_reviews: None) -> None:
    # Every read would replace an object that lived long: the objects the collector walks stay few.
    memo = HotMemo[int, object](8, 100, 1 << 20)

    read_through(memo, list(range(3 * REVIEW_EVERY)))

    assert memo.max_entries == 8
    assert len(memo) <= 8


def test_while_small_a_key_put_once_displaces_nothing_and_one_put_again_comes_in(
    quick_reviews: None,
) -> None:
    # Over a working set far larger than the small size, every put would replace an object as
    # likely to be read again as the new one: only a key put again soon is kept.
    memo = HotMemo[int, object](8, 100, 1 << 20)
    read_through(memo, list(range(1_000, 1_000 + 2 * REVIEW_EVERY)))
    assert memo.max_entries == 8
    hot = object()
    memo.put(1, hot, 10)
    assert memo.get(1) is None
    memo.put(1, hot, 10)

    for key in range(2_000, 2_000 + REVIEW_EVERY // 2):
        memo.put(key, object(), 10)  # each put once

    assert memo.max_entries == 8
    assert memo.get(1) is hot


def test_a_stream_of_fills_that_nobody_reads_keeps_few_objects(quick_reviews: None) -> None:
    # Every request a miss: its answer is put and never read again (it was read only by a miss).
    memo = HotMemo[int, object](8, 100, 1 << 20)

    for key in range(3 * REVIEW_EVERY):
        memo.put(key, object(), 10)

    assert memo.max_entries == 8
    assert len(memo) <= 8


def test_the_large_size_is_tried_again_once_the_working_set_shrinks(quick_reviews: None) -> None:
    memo = HotMemo[int, object](8, 100, 1 << 20)
    read_through(memo, list(range(1_000, 1_000 + 2 * REVIEW_EVERY)))  # filled, then judged
    assert memo.max_entries == 8

    # A working set of 50: the small size answers few of its reads, until the large one is tried.
    misses = read_through(memo, list(range(50)) * (memo_module.HOT_RETRY_LARGE_AFTER + 4) * 4)

    assert memo.max_entries == 100
    assert misses < (memo_module.HOT_RETRY_LARGE_AFTER + 1) * REVIEW_EVERY
    assert read_through(memo, list(range(50))) == 0


def test_a_working_set_that_narrows_after_a_sweep_is_held_again_at_the_next_reviews(
    quick_reviews: None,
) -> None:
    # A batch job or a crawler reads every key once, then the service's own hot keys return:
    # the small size answers few of their reads, and waiting for the periodic retry of the large
    # size would rebuild an object on nearly every hit until then.
    memo = HotMemo[int, object](8, 100, 1 << 20)
    read_through(memo, list(range(1_000, 1_000 + 3 * REVIEW_EVERY)))
    assert memo.max_entries == 8

    misses = read_through(memo, list(range(50)) * (3 * REVIEW_EVERY // 50))

    assert memo.max_entries == 100
    assert misses < 3 * REVIEW_EVERY // 2
    assert read_through(memo, list(range(50))) == 0


@pytest.mark.parametrize(("working_set", "large_again"), [(80, True), (300, False)])
def test_after_a_sweep_the_large_size_returns_only_for_a_working_set_it_would_hold(
    quick_reviews: None, working_set: int, large_again: bool
) -> None:
    # Read at random: 80 keys, which the large size (100) holds whole; 300, of which it would
    # answer a third (and so be dropped again at its next review).
    memo = HotMemo[int, object](8, 100, 1 << 20)
    read_through(memo, list(range(1_000, 1_000 + 3 * REVIEW_EVERY)))
    chosen = random.Random(7)

    read_through(memo, [chosen.randrange(working_set) for _ in range(6 * REVIEW_EVERY)])

    assert (memo.max_entries == 100) is large_again


def test_a_sweep_that_goes_on_never_takes_the_large_size_before_its_retry(
    quick_reviews: None,
) -> None:
    # Keys never read twice: nothing says the large size would find them.
    memo = HotMemo[int, object](8, 100, 1 << 20)

    read_through(memo, list(range((memo_module.HOT_RETRY_LARGE_AFTER + 1) * REVIEW_EVERY)))

    assert memo.max_entries == 8


# -- what the hit path remembers is bounded in bytes -----------------------------------------------


REQUESTS = 4096
QUERY_BYTES = 32 * 1024
#: Most the process may keep after all those requests.
RETAINED_BOUND = 16 * 1024 * 1024


async def get(app: FastAPI, query_string: bytes) -> int:
    """One GET /cfg through the whole ASGI app, in-process; returns the status sent."""
    return (await get_start(app, "/cfg", query_string))[0]


async def get_start(
    app: FastAPI, path: str, query_string: bytes = b""
) -> tuple[int, list[tuple[bytes, bytes]]]:
    """One GET through the whole ASGI app, in-process; returns the status and headers sent."""
    scope = acme_get_scope(path, query_string)
    starts: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            starts.append(message)

    await app(scope, receive, send)
    return starts[0]["status"], starts[0]["headers"]


@pytest.fixture
def app(make_identity_app: Callable[[], FastAPI]) -> FastAPI:
    app = make_identity_app()

    @app.get("/cfg")
    @cache(namespace="cfg")
    async def cfg() -> dict[str, bool]:
        return {"ok": True}

    return app


async def test_long_distinct_query_strings_are_not_remembered_without_bound(
    app: FastAPI, make_settings: Callable[..., CacheSettings]
) -> None:
    """4,096 GETs, each with 32 KiB of distinct query text (128 MiB in all), leave the process
    holding less than 16 MiB more than before."""
    # Few entries in the store, so that what is measured is what the cache remembers besides them.
    await init_cache(make_settings(CACHE_MEMORY_MAX_ENTRIES=64))
    try:
        assert await get(app, b"") == 200  # the route's one-time set-up happens before measuring
        statuses: set[int] = set()

        async def junk_requests() -> None:
            for _ in range(REQUESTS):
                query = b"junk=" + os.urandom(QUERY_BYTES // 2).hex().encode()
                statuses.add(await get(app, query))

        # The query strings are made here (by the client) and kept, or not, by the cache.
        retained, largest = await retained_by(junk_requests)
    finally:
        await close_cache()

    assert statuses == {200}
    assert retained < RETAINED_BOUND, f"{retained / 2**20:.0f} MiB retained ({largest})"


async def retained_by(run: Callable[[], Awaitable[None]]) -> tuple[int, str]:
    """The bytes still alive after ``run`` that were allocated while it ran, wherever they were
    allocated, and where most of them were."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        await run()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = after.compare_to(before, "filename")
    largest = ", ".join(
        f"{stat.traceback[0].filename}: {stat.size_diff / 2**20:.1f} MiB" for stat in growth[:3]
    )
    return sum(stat.size_diff for stat in growth), largest


# -- CACHE_HIT_MEMOS_MAX_BYTES --------------------------------------------------------------------


def test_a_memo_given_a_lower_bound_forgets_its_oldest_items_down_to_it() -> None:
    memo = BoundedMemo[int, bytes](10_000, 1 << 20)
    for key in range(500):
        memo.put(key, b"x" * 1000, 1000)

    memo.rebound(100_000)

    assert memo.bytes_held <= 100_000
    assert memo.get(499) is not None
    assert memo.get(0) is None
    memo.put(1_000, b"x" * 2000, 2000)  # above a sixty-fourth of the new bound
    assert memo.get(1_000) is None


def test_the_process_memos_follow_the_budget_each_by_its_share() -> None:
    from commons.cache import cached_route, hit_shortcut, keys

    process_memos = {
        "query digests": (keys._digest_memo, memo_module.MemoShare.QUERY_DIGESTS),
        "keys": (keys._key_memo, memo_module.MemoShare.KEYS),
        "prepared answers": (cached_route._prepared_memo, memo_module.MemoShare.PREPARED_ANSWERS),
        "near hits as objects": (hit_shortcut._hot, memo_module.MemoShare.NEAR_HITS_AS_OBJECTS),
    }
    try:
        memo_module.set_hit_memos_budget(3 * 1024 * 1024)
        small = {name: memo.max_bytes for name, (memo, _) in process_memos.items()}
    finally:
        memo_module.set_hit_memos_budget(memo_module.DEFAULT_HIT_MEMOS_MAX_BYTES)

    assert small == {
        name: 3 * 1024 * 1024 * share // 156 for name, (_, share) in process_memos.items()
    }
    assert cached_route._prepared_memo.max_bytes == 32 * 1024 * 1024  # the default's share


ITEM_BODY_BYTES = 4096
ITEMS = 2000
#: What the run below may leave behind with a budget of 2 MiB: that, the near cache's 1 MiB, the
#: near-cache hits it remembers (bounded by the same 1 MiB), and room for the process's own.
SMALL_BUDGET = 2 * 1024 * 1024
SMALL_BUDGET_RETAINED_BOUND = SMALL_BUDGET + 2 * 1024 * 1024 + 3 * 1024 * 1024


async def test_the_hit_path_remembers_no_more_than_cache_hit_memos_max_bytes(
    make_identity_app: Callable[[], FastAPI],
    make_settings: Callable[..., CacheSettings],
    redis_url: str,
) -> None:
    """2,000 keys of 4 KiB, each read three times through Redis: the memos (parsed values,
    prepared answers, expiries, keys) would hold about 30 MiB by default; with
    ``CACHE_HIT_MEMOS_MAX_BYTES`` of 2 MiB the process keeps less than 7 MiB, and still answers
    HITs."""
    app = make_identity_app()

    @app.get("/item/{n}")
    @cache(namespace="items")
    async def item(n: int) -> dict[str, object]:
        return {"n": n, "pad": "x" * ITEM_BODY_BYTES}

    settings = make_settings(
        redis_url,
        CACHE_HIT_MEMOS_MAX_BYTES=SMALL_BUDGET,
        CACHE_NEAR_CACHE_MAX_BYTES=1024 * 1024,
        CACHE_MEMORY_MAX_BYTES=64 * 1024,
    )
    await init_cache(settings)
    try:
        outcomes: set[bytes] = set()
        await get_path(app, "/item/0", outcomes)  # the route's one-time set-up comes first

        async def read_every_item_three_times() -> None:
            for _ in range(3):
                for n in range(ITEMS):
                    await get_path(app, f"/item/{n}", outcomes)

        retained, largest = await retained_by(read_every_item_three_times)
    finally:
        await close_cache()
        memo_module.set_hit_memos_budget(memo_module.DEFAULT_HIT_MEMOS_MAX_BYTES)

    assert outcomes == {b"MISS", b"HIT"}
    assert retained < SMALL_BUDGET_RETAINED_BOUND, (
        f"{retained / 2**20:.1f} MiB retained ({largest})"
    )


async def get_path(app: FastAPI, path: str, outcomes: set[bytes]) -> None:
    """One GET of ``path`` that must answer 200; adds its ``X-FastAPI-Cache`` to ``outcomes``."""
    status, headers = await get_start(app, path)
    assert status == 200
    outcomes.update(value for name, value in headers if name == b"x-fastapi-cache")
