"""A bounded memo: remembered results, limited in entries and in bytes.

The hit path remembers what it computed for inputs that repeat (query digests, keys, prepared
responses, expiries). Whatever a client sends can become such an input, so every memo is bounded
twice: by entries and by the bytes it holds. An item larger than a sixty-fourth of the byte budget
is not remembered at all (unless the memo says otherwise), so one huge request cannot flush what
many ordinary ones share. When full, the oldest quarter goes (in the order items were
remembered): a read costs one dictionary lookup, as cheap as it gets on every hit, and a working
set a little above the bound loses a quarter of it, not all of it at once.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["BoundedMemo"]

K = TypeVar("K")
V = TypeVar("V")


class BoundedMemo(Generic[K, V]):
    """A dict that holds at most ``max_entries`` items and ``max_bytes`` of their stated sizes."""

    __slots__ = ("_bytes", "_items", "_max_bytes", "_max_entries", "_max_item_bytes")

    def __init__(
        self, max_entries: int, max_bytes: int, *, max_item_bytes: int | None = None
    ) -> None:
        """
        Args:
            max_entries: Items held at most.
            max_bytes: Sum of the items' sizes held at most.
            max_item_bytes: An item larger than this is not remembered; a sixty-fourth of
                ``max_bytes`` by default.
        """
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._max_item_bytes = max(max_bytes // 64, 1) if max_item_bytes is None else max_item_bytes
        self._items: dict[K, tuple[V, int]] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes_held(self) -> int:
        """The sum of the sizes of the items held."""
        return self._bytes

    def get(self, key: K) -> V | None:
        found = self._items.get(key)
        return None if found is None else found[0]

    def put(self, key: K, value: V, size: int) -> None:
        """Remembers ``value`` for ``key``; ``size`` is what it holds in bytes (key included)."""
        self.forget(key)
        if size > self._max_item_bytes:
            return
        if len(self._items) >= self._max_entries or self._bytes + size > self._max_bytes:
            self._make_room(size)
        self._items[key] = (value, size)
        self._bytes += size

    def _make_room(self, size: int) -> None:
        """Forgets the oldest items until a quarter of each budget is free and ``size`` fits
        (amortised over the puts that filled that quarter: constant time per put)."""
        count_goal = self._max_entries * 3 // 4
        bytes_goal = min(self._max_bytes * 3 // 4, self._max_bytes - size)
        items = self._items
        count, held = len(items), self._bytes
        oldest: list[K] = []
        for key, (_, item_size) in items.items():
            if count <= count_goal and held <= bytes_goal:
                break
            oldest.append(key)
            count -= 1
            held -= item_size
        for key in oldest:
            del items[key]
        self._bytes = held

    def forget(self, key: K) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[1]

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0
