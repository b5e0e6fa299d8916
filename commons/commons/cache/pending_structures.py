"""The containers ``pending.py`` keeps its items in: dicts split into shards once large, and
a doubly linked replay order.

Both exist for the event loop's sake (see ``pending.py``'s cost notes): CPython grows a dict by
copying it whole, so a large one is split by hash; and a linked list moves a renewed item to the
end or removes an applied one in O(1), without ever copying the order. They know nothing of what
they hold.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from commons.cache.scope import CacheScope

__all__ = ["UNLINKED", "Link", "Node", "Order", "Shards"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")

#: A container past this many entries is split into _WIDTH shards: CPython grows a dict or a set
#: by copying it whole, so an unsplit one of 87,000 items held the loop 3 ms when it grew.
_SPLIT_AT = 512
_WIDTH = 64


class Shards(Generic[K, V]):
    """A dict split by hash into shards once it is large, so that no growth copies much of it."""

    __slots__ = ("_len", "_mask", "_shards")

    def __init__(self) -> None:
        self._shards: list[dict[K, V]] = [{}]
        self._mask = 0
        self._len = 0

    # The shard is chosen by bits above those a shard's own table uses (``hash >> 16``), so
    # that its keys still spread in it; written out in each method, the hottest code here.

    def __len__(self) -> int:
        return self._len

    def __contains__(self, key: K) -> bool:
        return key in self._shards[(hash(key) >> 16) & self._mask]

    def __iter__(self) -> Iterator[K]:
        for shard in self._shards:
            yield from shard

    def get(self, key: K) -> V | None:
        return self._shards[(hash(key) >> 16) & self._mask].get(key)

    def put(self, key: K, value: V) -> None:
        shard = self._shards[(hash(key) >> 16) & self._mask]
        if key not in shard:
            self._len += 1
        shard[key] = value
        if self._len > _SPLIT_AT and not self._mask:
            self._split()

    def pop(self, key: K) -> V | None:
        shard = self._shards[(hash(key) >> 16) & self._mask]
        if key not in shard:
            return None
        self._len -= 1
        return shard.pop(key)

    def _split(self) -> None:
        (whole,) = self._shards
        self._mask = mask = _WIDTH - 1
        shards: list[dict[K, V]] = [{} for _ in range(_WIDTH)]
        self._shards = shards
        for key, value in whole.items():
            shards[(hash(key) >> 16) & mask][key] = value

    def parts(self) -> list[dict[K, V]]:
        """The shards themselves, to be freed bit by bit, when this is dropped anyway."""
        return self._shards

    def detach(self) -> list[dict[K, V]]:
        """Empties this and returns what it held, to be freed bit by bit."""
        shards, self._shards, self._mask, self._len = self._shards, [{}], 0, 0
        return shards


class Link:
    __slots__ = ("next", "prev")

    def __init__(self) -> None:
        self.prev: Link = self
        self.next: Link = self


#: Where an unlinked node points: at itself it would be a cycle, freed only by the collector.
UNLINKED = Link()


class Node(Link, Generic[T]):
    """One kept item in the replay order; ``scope`` is a key's (None for a target)."""

    __slots__ = ("item", "scope", "seq")

    def __init__(self, item: T, scope: CacheScope | None, seq: int) -> None:
        self.prev = self.next = UNLINKED
        self.item = item
        self.scope = scope
        self.seq = seq


class Order(Generic[T]):
    """Kept items, oldest request first: a doubly linked list, so that moving a renewed item to
    the end or removing one anywhere is O(1) and the order never needs one large copy."""

    __slots__ = ("_head",)

    def __init__(self) -> None:
        self._head = Link()

    def append(self, node: Node[T]) -> None:
        tail = self._head.prev
        node.prev, node.next = tail, self._head
        tail.next = self._head.prev = node

    def remove(self, node: Node[T]) -> None:
        node.prev.next, node.next.prev = node.next, node.prev
        # A node left pointing at its neighbours would be freed only by the cyclic collector.
        node.prev = node.next = UNLINKED

    def discard(self, node: Node[T]) -> None:
        """Removes ``node`` if it is still linked."""
        if node.prev is not UNLINKED:
            self.remove(node)

    def move_to_end(self, node: Node[T]) -> None:
        self.remove(node)
        self.append(node)

    def first(self) -> Node[T] | None:
        node = self._head.next
        return None if node is self._head else node  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Node[T]]:
        node = self._head.next
        while node is not self._head:
            yield node  # type: ignore[misc]
            node = node.next

    def detach(self) -> Link:
        """Empties this and returns the old chain's head, to be freed bit by bit."""
        head, self._head = self._head, Link()
        return head
