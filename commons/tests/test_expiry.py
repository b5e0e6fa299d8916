"""ExpiryMemo: the remaining time of bytes already seen, without asking Redis again."""

from commons.cache.backends.redis.expiry import ExpiryMemo


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_same_bytes_reuse_the_remembered_expiry_as_time_passes() -> None:
    clock = Clock()
    memo = ExpiryMemo(clock=clock)
    memo.remember("k", b"body", 60)
    clock.now += 20
    assert memo.remaining("k", b"body") == 40


def test_other_bytes_under_the_key_are_unknown() -> None:
    memo = ExpiryMemo(clock=Clock())
    memo.remember("k", b"old", 60)
    assert memo.remaining("k", b"new") is None
    assert memo.remaining("other", b"old") is None


def test_near_its_expiry_the_remembered_time_is_not_trusted() -> None:
    clock = Clock()
    memo = ExpiryMemo(clock=clock)
    memo.remember("k", b"body", 60)
    clock.now += 59.5
    assert memo.remaining("k", b"body") is None


def test_it_holds_no_more_than_its_bounds() -> None:
    memo = ExpiryMemo(max_entries=3, max_bytes=10, clock=Clock())
    for n in range(5):
        memo.remember(f"k{n}", b"x", 60)
    assert sum(memo.remaining(f"k{n}", b"x") is not None for n in range(5)) <= 3
    memo.remember("big", b"y" * 8, 60)
    memo.remember("bigger", b"z" * 8, 60)
    memo.remember("bigger", b"z" * 8, 60)  # once full, it takes a key on its second put
    assert memo.remaining("big", b"y" * 8) is None
    assert memo.remaining("bigger", b"z" * 8) == 60
