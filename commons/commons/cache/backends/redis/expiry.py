"""Remembered expiries: a Redis hit in one round trip instead of two.

Serving a hit needs the entry's bytes and its remaining time to live (for ``max-age`` and
freshness). Asking Redis for both costs a PTTL beside the GET on every hit. Instead, the store
remembers, per key, the bytes it last saw and when they expire (from its own write, or from a
PTTL sent in the same round trip as the read of a key it remembers nothing of; past its bound a
hit still costs one round trip, not two); a later GET that returns the very same bytes reuses
that expiry, measured on the monotonic clock. GET stays the source of truth for whether an
entry exists, so an invalidation is seen at once; only the remaining time can be off, and only
when another process stored identical bytes again later, in which case the remembered expiry is
the earlier one and ``max-age`` errs short. Within a second of the remembered expiry the store
asks Redis again.

Bounded by entries and by bytes held (a :class:`~commons.cache.memo.BoundedMemo`); when full it
starts over. Unlike other memos it remembers large values too (within its byte budget): a large
entry is the one whose second round trip costs most.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

from commons.cache.memo import BoundedMemo

__all__ = ["ExpiryMemo", "ToldExpiry"]

#: Below this many remaining seconds the remembered expiry is not trusted: ask Redis.
TRUST_ABOVE_SECONDS = 1.0


class ToldExpiry(NamedTuple):
    """An entry's time to live as Redis told it in a read's round trip (its ``PTTL``)."""

    #: When the read was sent (``time.monotonic()``): Redis counted from some moment after.
    sent_at: float
    #: Milliseconds left; negative when the key had no expiry or was not there.
    ttl_ms: int


class ExpiryMemo:
    """Per key: the last bytes seen and their expiry on the monotonic clock."""

    def __init__(
        self,
        max_entries: int = 16_384,
        max_bytes: int = 16 * 1024 * 1024,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._items = BoundedMemo[str, tuple[bytes, float]](
            max_entries, max_bytes, max_item_bytes=max_bytes, admit_seen_twice=True
        )

    def knows(self, key: str) -> bool:
        """Whether an expiry is remembered for ``key`` (a read of it may then skip ``PTTL``)."""
        return self._items.get(key) is not None

    def remaining(self, key: str, value: bytes) -> int | None:
        """Whole seconds ``value`` under ``key`` has left, if known and trusted; else None."""
        expires_at = self.expires_at(key, value)
        return None if expires_at is None else math.ceil(expires_at - self._clock())

    def expires_at(self, key: str, value: bytes) -> float | None:
        """When ``value`` under ``key`` expires (on the memo's clock), if known and trusted."""
        known = self._items.get(key)
        if known is None or known[0] != value:
            return None
        if known[0] is not value:
            # The same bytes in another object (read back): the newest is kept, so an older copy
            # (the bytes this store wrote, once the near cache holds the ones read) is freed.
            self._items.put(str(key), (value, known[1]), len(value))
        return known[1] if known[1] - self._clock() > TRUST_ABOVE_SECONDS else None

    def remember(
        self, key: str, value: bytes, ttl_seconds: float, *, measured_at: float | None = None
    ) -> None:
        """Records that ``value`` under ``key`` expires ``ttl_seconds`` after ``measured_at``
        (on the memo's clock; now by default).

        Pass when the command that told (or set) the time to live was sent: Redis counts it from
        some moment after that, so the expiry errs early, never late, whatever delays the reply
        (the network, a busy event loop).
        """
        start = self._clock() if measured_at is None else measured_at
        # A plain str, as in the near cache: a ``ScopedKey`` would keep its scope and route
        # alive, objects every full garbage collection walks.
        self._items.put(str(key), (value, start + ttl_seconds), len(value))

    def forget(self, key: str) -> None:
        self._items.forget(key)
