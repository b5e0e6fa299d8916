"""A bounded memo: remembered results, limited in entries and in bytes.

The hit path remembers what it computed for inputs that repeat (query digests, keys, prepared
responses, expiries). Whatever a client sends can become such an input, so every memo is bounded
twice: by entries and by the bytes it holds. The hit path's memos share one budget in bytes,
``CACHE_HIT_MEMOS_MAX_BYTES``, each by its fixed share (:class:`MemoShare`): a worker sized for
less memory lowers it, and every memo shrinks with it. An item larger than a sixty-fourth of a
memo's byte bound is not remembered at all (unless the memo says otherwise), so one huge request
cannot flush what many ordinary ones share. When full, the oldest quarter goes (in the order
items were remembered): a read costs one dictionary lookup, as cheap as it gets on every hit, and
a working set a little above the bound loses a quarter of it, not all of it at once.

Past its bound, a hit-path memo takes a new key only when it is put a second time, soon after the
first (``admit_seen_twice``): over a working set larger than the memo, every put would otherwise
evict an item read as often, and a miss of a key never read again would push out one that is.
The doorkeeper remembers the hash of the last key put per slot: a key comes in on its second put,
unless another key's took its slot in between, which over a working set many times the slots is
likely (so such a memo stops churning and keeps what it holds), and for a key read again soon (a
hot key) is not.

Kept out of the garbage collector's walks. A dict holding only objects that hold no others
(strings, bytes, numbers, and tuples of them) is not tracked by the cyclic collector, but storing
one newly made tuple tracks it again, and only a full collection untracks it: a memo of sixteen
thousand items was then walked by nearly every collection, and each full collection of a process
with five such memos took about 10 ms. So new items wait in a small nursery until a collection
has untracked them (a tuple of such objects is untracked by a collection it survives; one that
holds tuples may need a collection of an older generation), and only then join the large dicts,
which stay untracked. Items that can never be untracked (they hold objects) join them anyway once
the nursery is four times its size: such a memo is walked, as any dict of objects is.
"""

from __future__ import annotations

from array import array
from gc import is_tracked
from typing import Any, Generic, TypeVar

__all__ = [
    "DEFAULT_HIT_MEMOS_MAX_BYTES",
    "HOT_LARGE_ENTRIES",
    "HOT_SMALL_ENTRIES",
    "BoundedMemo",
    "HotMemo",
    "MemoShare",
    "process_hot_memo",
    "process_memo",
    "set_hit_memos_budget",
    "share_of",
]

K = TypeVar("K")
V = TypeVar("V")

#: New items held apart until a collection has untracked them: enough for a few collections of
#: the youngest generation (one every few hundred allocations) to pass, small enough to walk.
NURSERY_ITEMS = 256
#: Past this, the nursery's items join the large dicts whether untracked or not.
NURSERY_MAX_ITEMS = 4 * NURSERY_ITEMS


class BoundedMemo(Generic[K, V]):
    """A dict that holds at most ``max_entries`` items and ``max_bytes`` of their stated sizes."""

    __slots__ = (
        "_admit_seen_twice",
        "_bytes",
        "_doorkeeper",
        "_items",
        "_max_bytes",
        "_max_entries",
        "_max_item_bytes",
        "_max_item_bytes_given",
        "_nursery",
        "_nursery_sizes",
        "_settle_at",
        "_sizes",
    )

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        *,
        max_item_bytes: int | None = None,
        admit_seen_twice: bool = False,
    ) -> None:
        """
        Args:
            max_entries: Items held at most.
            max_bytes: Sum of the items' sizes held at most.
            max_item_bytes: An item larger than this is not remembered; a sixty-fourth of
                ``max_bytes`` by default.
            admit_seen_twice: Once the memo has been full, a new key is remembered only when it
                is put a second time (see the module docstring).
        """
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._max_item_bytes_given = max_item_bytes
        self._max_item_bytes = _item_bound(max_bytes, max_item_bytes)
        # Values and sizes in dicts apart: a (value, size) pair would be one more tuple for the
        # collector to untrack, one collection after the value.
        #: Settled items (see the module docstring), oldest first, and their sizes.
        self._items: dict[K, V] = {}
        self._sizes: dict[K, int] = {}
        #: The newest items and their sizes, until a collection has untracked them.
        self._nursery: dict[K, V] = {}
        self._nursery_sizes: dict[K, int] = {}
        #: The nursery's size at which it is settled next: items that stayed tracked wait for
        #: as many new ones, so a put never walks the nursery more than once per so many puts.
        self._settle_at = NURSERY_ITEMS
        self._bytes = 0
        self._admit_seen_twice = admit_seen_twice
        #: The last key hash put per slot, once the memo has had to make room (``None`` before,
        #: and without ``admit_seen_twice``): not walked by the collector.
        self._doorkeeper: array[int] | None = None

    def __len__(self) -> int:
        return len(self._items) + len(self._nursery)

    @property
    def max_entries(self) -> int:
        return self._max_entries

    def resize(self, max_entries: int) -> None:
        """Holds at most ``max_entries`` items from now on (the oldest go, if need be)."""
        self._max_entries = max_entries
        if len(self) > max_entries:
            self._make_room(0)

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    def rebound(self, max_bytes: int) -> None:
        """Holds at most ``max_bytes`` of items from now on (the oldest go, if need be); the
        largest item remembered shrinks with it (a sixty-fourth, or the bound given, if less)."""
        self._max_bytes = max_bytes
        self._max_item_bytes = _item_bound(max_bytes, self._max_item_bytes_given)
        if self._bytes > max_bytes:
            self._make_room(0)

    @property
    def bytes_held(self) -> int:
        """The sum of the sizes of the items held."""
        return self._bytes

    def get(self, key: K) -> V | None:
        found = self._items.get(key)
        if found is None:
            return self._nursery.get(key)
        return found

    def put(self, key: K, value: V, size: int) -> None:
        """Remembers ``value`` for ``key``; ``size`` is what it holds in bytes (key included)."""
        # Spelled out (no calls to forget, __len__, an admission method): over a working set
        # larger than the memo, most puts on the hit path end at the doorkeeper.
        items, nursery = self._items, self._nursery
        if key in items:
            del items[key]
            self._bytes -= self._sizes.pop(key)
        elif key in nursery:
            del nursery[key]
            self._bytes -= self._nursery_sizes.pop(key)
        elif (doorkeeper := self._doorkeeper) is not None:
            # Not held: admitted on its second put (see the module docstring).
            key_hash = hash(key)
            slot = key_hash & (DOORKEEPER_SLOTS - 1)
            if doorkeeper[slot] != key_hash:
                doorkeeper[slot] = key_hash
                return
        if size > self._max_item_bytes:
            return
        if len(items) + len(nursery) >= self._max_entries or self._bytes + size > self._max_bytes:
            self._make_room(size)
        nursery[key] = value
        self._nursery_sizes[key] = size
        self._bytes += size
        if len(nursery) >= self._settle_at:
            self._settle()

    def _settle(self) -> None:
        """Moves the nursery's untracked items to the settled dicts (all of them once it is
        full of items that are not untracked yet, or never will be)."""
        nursery, nursery_sizes = self._nursery, self._nursery_sizes
        items, sizes = self._items, self._sizes
        if len(nursery) >= NURSERY_MAX_ITEMS:
            settling = list(nursery)
        else:
            settling = [
                key for key, value in nursery.items() if not (is_tracked(value) or is_tracked(key))
            ]
        for key in settling:
            # One by one: copying a tracked dict wholesale would track the settled one.
            items[key] = nursery.pop(key)
            sizes[key] = nursery_sizes.pop(key)
        self._settle_at = min(len(nursery) + NURSERY_ITEMS, NURSERY_MAX_ITEMS)

    def _make_room(self, size: int) -> None:
        """Forgets the oldest items until a quarter of each budget is free and ``size`` fits
        (amortised over the puts that filled that quarter: constant time per put)."""
        count_goal = self._max_entries * 3 // 4
        bytes_goal = min(self._max_bytes * 3 // 4, self._max_bytes - size)
        if self._admit_seen_twice and self._doorkeeper is None:
            self._doorkeeper = array("q", bytes(8 * DOORKEEPER_SLOTS))
        count, held = len(self), self._bytes
        for items, sizes in ((self._items, self._sizes), (self._nursery, self._nursery_sizes)):
            oldest: list[K] = []
            for key, item_size in sizes.items():
                if count <= count_goal and held <= bytes_goal:
                    break
                oldest.append(key)
                count -= 1
                held -= item_size
            for key in oldest:
                del items[key], sizes[key]
        self._bytes = held

    def forget(self, key: K) -> None:
        if self._items.pop(key, None) is not None:
            self._bytes -= self._sizes.pop(key)
        elif self._nursery.pop(key, None) is not None:
            self._bytes -= self._nursery_sizes.pop(key)

    def clear(self) -> None:
        for held in (self._items, self._sizes, self._nursery, self._nursery_sizes):
            held.clear()
        self._settle_at = NURSERY_ITEMS
        self._bytes = 0
        self._doorkeeper = None


def _item_bound(max_bytes: int, given: int | None) -> int:
    """The largest item a memo of ``max_bytes`` remembers."""
    if given is None:
        return max(max_bytes // 64, 1)
    return min(given, max_bytes)


#: Slots of the doorkeeper of a memo that admits keys seen twice (``admit_seen_twice``): 128 KiB.
DOORKEEPER_SLOTS = 1 << 14

#: A :class:`HotMemo`'s sizes: while the keys read fit in the large one, and otherwise.
HOT_LARGE_ENTRIES = 4096
HOT_SMALL_ENTRIES = 64
#: A :class:`HotMemo` reviews its size after this many uses (reads it answers, new keys put).
HOT_REVIEW_EVERY = 4096
#: The share of its uses a large :class:`HotMemo` must answer to stay large.
HOT_KEEP_LARGE_SHARE = 0.5
#: Reviews a small :class:`HotMemo` waits before trying its large size again, whatever its
#: estimate of what the large size would find says (see :meth:`HotMemo.put`).
HOT_RETRY_LARGE_AFTER = 32


class HotMemo(Generic[K, V]):
    """A memo of objects (not flat values) for the keys read most recently: as many as pay for
    themselves.

    Such objects save rebuilding on every hit, but the garbage collector walks each one (a
    :class:`BoundedMemo` of flat values it does not). While the keys read fit in the large size,
    nearly every read finds its object and the objects stay: nothing is rebuilt, and nothing is
    made for the collector to promote. Over a working set larger than that, most reads would
    miss and every put replace an object that lived long enough to reach the oldest generation:
    full collections would come often and each walk thousands of objects. So the memo measures
    the share of its uses it answers (reads that find their object, among those and the new keys
    put: a fill puts what nobody read). Below :data:`HOT_KEEP_LARGE_SHARE` it falls back to the
    small size. While small, it keeps a new key only when it was put lately too, and estimates
    from the same record the share the large size would answer (see :meth:`put`); it takes the
    large size again at the first review where that share is enough (a sweep over every key,
    then the hot keys again), or after :data:`HOT_RETRY_LARGE_AFTER` reviews in any case; it
    does not judge the uses that fill it then.
    """

    __slots__ = (
        "_filling",
        "_found",
        "_large",
        "_memo",
        "_recent_hashes",
        "_seen_found",
        "_small",
        "_small_reviews",
        "_uses",
    )

    def __init__(
        self, small: int, large: int, max_bytes: int, *, max_item_bytes: int | None = None
    ) -> None:
        self._small = small
        self._large = large
        self._memo = BoundedMemo[K, V](large, max_bytes, max_item_bytes=max_item_bytes)
        #: Reads it answered and new keys put, since the last review; and the answered ones.
        self._uses = 0
        self._found = 0
        self._small_reviews = 0
        #: The large size was just taken: the next review only lets it fill.
        self._filling = True
        #: While small: the hash of the last key put per slot, as many slots as the large size
        #: (see :meth:`put`); and the new keys put that it had seen lately.
        self._recent_hashes: array[int] | None = None
        self._seen_found = 0

    def __len__(self) -> int:
        return len(self._memo)

    @property
    def max_entries(self) -> int:
        """The size it holds now: small or large."""
        return self._memo.max_entries

    def get(self, key: K) -> V | None:
        # The memo's dicts read here, not through its get(): every hit asks a HotMemo first.
        memo = self._memo
        found = memo._items.get(key)
        if found is None:
            found = memo._nursery.get(key)
            if found is None:
                return None
        self._found += 1
        self._uses += 1
        if self._uses >= HOT_REVIEW_EVERY:
            self._review()
        return found

    def put(self, key: K, value: V, size: int) -> None:
        memo = self._memo
        if key not in memo._items and key not in memo._nursery:
            # A new key: a use the memo did not answer, whether a read missed it first or not
            # (a fill puts what nobody read: a stream of misses must count as much as reads).
            self._uses += 1
            recent_hashes = self._recent_hashes
            seen_lately = True
            if recent_hashes is not None:
                # While small: was the key put lately? Its hash still in its slot (and it is
                # now, either way). With as many slots as the large size holds (rounded up to a
                # power of two), over ``n`` keys read at random a key is still in its slot when
                # read again with a chance of about ``1 / (1 + n / slots)``: the estimate
                # reaches HOT_KEEP_LARGE_SHARE for working sets up to the large size, which a
                # memo of that size holds whole. Between once and twice that size, where the
                # large size would still answer half its uses, it errs low and the periodic
                # retry covers them: it never takes the large size for a working set that would
                # send it back at once. An array of ints: nothing for the collector to walk.
                # Hashed in a tuple: its hash mixes the bits, where an int (or a tuple of small
                # ints) is its own hash and consecutive keys would each keep a slot of their own.
                key_hash = hash((key,))
                slot = key_hash & (len(recent_hashes) - 1)
                if recent_hashes[slot] == key_hash:
                    self._seen_found += 1
                else:
                    recent_hashes[slot] = key_hash
                    seen_lately = False
            if self._uses >= HOT_REVIEW_EVERY:
                self._review()
            if not seen_lately:
                # Small, and the key not put lately: over a working set far larger than the
                # small size, keeping it would replace, on every put, an object as likely to be
                # read again (and make one more for the collector to promote). A key read again
                # soon comes in on its next put.
                return
        memo.put(key, value, size)

    @property
    def max_bytes(self) -> int:
        return self._memo.max_bytes

    def rebound(self, max_bytes: int) -> None:
        """Holds at most ``max_bytes`` of objects from now on (see :meth:`BoundedMemo.rebound`)."""
        self._memo.rebound(max_bytes)

    def clear(self) -> None:
        """Forgets every object and starts over, at the large size."""
        self._memo.clear()
        self._memo.resize(self._large)
        self._uses = self._found = self._small_reviews = self._seen_found = 0
        self._filling = True
        self._recent_hashes = None

    def _review(self) -> None:
        share = self._found / self._uses
        # Small: what it found itself, the large size would have found too.
        large_share = (self._found + self._seen_found) / self._uses
        self._uses = self._found = self._seen_found = 0
        memo = self._memo
        if self._filling:
            self._filling = False
        elif memo.max_entries == self._large:
            if share < HOT_KEEP_LARGE_SHARE:
                memo.resize(self._small)
                self._small_reviews = 0
                slots = 1 << (self._large - 1).bit_length()
                self._recent_hashes = array("q", bytes(8 * slots))
        else:
            self._small_reviews += 1
            if large_share >= HOT_KEEP_LARGE_SHARE or self._small_reviews >= HOT_RETRY_LARGE_AFTER:
                memo.resize(self._large)
                self._filling = True
                self._recent_hashes = None


# -- the hit path's budget ---------------------------------------------------------------------


class MemoShare:
    """Each hit-path memo's share of ``CACHE_HIT_MEMOS_MAX_BYTES``, as the MiB it holds at the
    default: what a repeated hit saves most per byte gets most. Plain ints, not an enum: equal
    shares would be aliases of one member."""

    QUERY_DIGESTS = 8
    KEYS = 16
    KEYS_AS_OBJECTS = 4
    PREPARED_ANSWERS = 32
    PREPARED_ANSWERS_AS_OBJECTS = 32
    PARSED_VALUES = 32
    EXPIRIES = 16
    NEAR_HITS_AS_OBJECTS = 16


_SHARES_IN_ALL: int = sum(
    value for name, value in vars(MemoShare).items() if name.isupper() and isinstance(value, int)
)
#: The default of ``CACHE_HIT_MEMOS_MAX_BYTES``: each memo holds its share in MiB.
DEFAULT_HIT_MEMOS_MAX_BYTES = _SHARES_IN_ALL * 1024 * 1024


class _Budget:
    """The process's ``CACHE_HIT_MEMOS_MAX_BYTES`` (the last ``init_cache()``'s) and the memos
    that live as long as the process, resized when it changes."""

    def __init__(self) -> None:
        self.max_bytes = DEFAULT_HIT_MEMOS_MAX_BYTES
        self.memos: list[tuple[BoundedMemo[Any, Any] | HotMemo[Any, Any], int]] = []


_budget = _Budget()


def share_of(share: int) -> int:
    """The bytes a memo of ``share`` (a :class:`MemoShare`) may hold out of the process's budget
    now."""
    return max(_budget.max_bytes * share // _SHARES_IN_ALL, 1)


def process_memo(
    share: int,
    max_entries: int,
    *,
    max_item_bytes: int | None = None,
    admit_seen_twice: bool = False,
) -> BoundedMemo[K, V]:
    """A :class:`BoundedMemo` that lives as long as the process, bounded in bytes by ``share``
    of the budget, now and whenever :func:`set_hit_memos_budget` changes it."""
    memo = BoundedMemo[K, V](
        max_entries,
        share_of(share),
        max_item_bytes=max_item_bytes,
        admit_seen_twice=admit_seen_twice,
    )
    _budget.memos.append((memo, share))
    return memo


def process_hot_memo(share: int, *, max_item_bytes: int | None = None) -> HotMemo[K, V]:
    """A :class:`HotMemo` (of the usual sizes) that lives as long as the process, bounded in
    bytes by ``share`` of the budget, as :func:`process_memo`."""
    memo = HotMemo[K, V](
        HOT_SMALL_ENTRIES, HOT_LARGE_ENTRIES, share_of(share), max_item_bytes=max_item_bytes
    )
    _budget.memos.append((memo, share))
    return memo


def set_hit_memos_budget(max_bytes: int) -> None:
    """Bounds the hit path's memos by ``max_bytes`` in all (``CACHE_HIT_MEMOS_MAX_BYTES``): the
    process-wide ones at once, those made from now on (a layer's, a store's) as they are made."""
    if max_bytes == _budget.max_bytes:
        return
    _budget.max_bytes = max_bytes
    for memo, share in _budget.memos:
        memo.rebound(share_of(share))
