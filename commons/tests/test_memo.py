"""The bounded memo every hit-path memo uses: bounded in entries and bytes, oldest out first."""

from __future__ import annotations

from commons.cache.memo import BoundedMemo


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
