"""What a near cache holds: entries and generations, within its bounds (see ``near.py``).

Held here, and nothing else: which reads may be kept, when an entry may be answered and how
Redis' messages reach it are ``near.py``'s. Bounds: at most ``max_entries`` keys (entries and
generations) and ``max_bytes`` of what they cost in the process, least recently used entries
first; an entry above a sixty-fourth of the byte budget is not kept.

Admission: while there is room, every entry read is kept. Once full, an entry is kept only when
it is read a second time, soon after the first (:meth:`NearStorage.admits`). Over a working set
far larger than the bounds (a hundred thousand keys read at random, fifty thousand held), keeping
every read would evict, for each one, an entry read just as often: the share answered from
memory would be the same (what it holds over what is read), but every read from Redis would pay
for keeping one entry and evicting another. A key read often (a hot set) is read again soon, and
comes in on its second read.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict

__all__ = [
    "ENTRY_OVERHEAD_BYTES",
    "EXPIRY_TOLERANCE_SECONDS",
    "GENERATION_OVERHEAD_BYTES",
    "NearStorage",
]

#: How much later than the held copy Redis' copy of an entry must expire to be a later fill (the
#: two expiries are measured from two reads' send times).
EXPIRY_TOLERANCE_SECONDS = 0.05
#: What a held entry costs beyond its key's, value's and generation's bytes: their objects'
#: headers, the entry's tuple and expiry, its slot in the ordered dictionary (measured: the
#: process's resident memory grew by 1,200 bytes per entry over a hundred thousand entries of
#: 955 bytes, keys of 70, generations of 16: 160 beyond them; the rest is room for the
#: dictionary's growth and other sizes of objects). It was 480 while each entry had its own
#: generation tuples and size (1,400 bytes per entry measured the same way).
ENTRY_OVERHEAD_BYTES = 320
#: The same for a held generation (its key and value objects, a dictionary slot).
GENERATION_OVERHEAD_BYTES = 200
#: Distinct scope generations (a generation, its keys, its values) shared by the held entries,
#: beyond which the table of them starts over (entries keep theirs; new ones share anew). The
#: table itself is not counted against the byte bound: at most about a megabyte.
SHARED_GENERATIONS_MAX = 4096
#: Slots of the admission filter of a full near cache (8 KiB): the hash of the last key read
#: and not kept, per slot. A key read again before another key's read takes its slot comes in:
#: one read again within about as many reads from Redis as there are slots, as a rule (a key
#: read again after ``n`` reads from Redis, at random, with a chance of ``1 / (1 + n / slots)``).
#: Keeping a read costs far more than the read itself: the entry held, one evicted, the answer
#: remembered, and the objects the collector then walks (measured in-process over 100,000 keys
#: read at random: about 70 us of CPU per read kept, all included). Over such a working set
#: (57,000 reads from Redis between two reads of a key) every kept entry evicts one read as
#: often, for the same share of hits from memory: with 16,384 slots one read from Redis in five
#: was kept (15 us on every read from Redis), with 4,096 one in fifteen (5-7 us: in-process,
#: one caller, a kept read cost 85-130 us more than one that keeps nothing), with these one in
#: fifty-seven. A key read every thousand or so reads from Redis (a hot set) still comes in on
#: its second or third read.
ADMISSION_SLOTS = 1 << 10

#: A held entry: ``(value, expires_at, generation, generation_keys, generation_values)``.
#: ``generation``: the scope's generations as the read reported them, joined; the entry is
#: answered only while the near caches holding its generations hold ``generation_values`` under
#: ``generation_keys``, each confirmed within the maximum age. The last three are the same
#: objects for every entry of a scope generation (:meth:`NearStorage._shared_objects`), and
#: the size is worked out again when the entry goes: per entry, only its key, value, expiry and
#: this tuple (about 200 bytes less per entry than with tuples and a size of its own).
#:
#: A plain tuple of immutable values, not an object: the garbage collector stops tracking such a
#: tuple once it has survived a collection, so a full collection never walks the entries (with
#: entries as objects, a full near cache of a hundred thousand made each one take 100-230 ms).
_Entry = tuple[bytes, float, bytes, tuple[str, ...], tuple[bytes, ...]]
#: What the entries of one scope generation share: ``(generation, keys, values)``.
_ScopeGeneration = tuple[bytes, tuple[str, ...], tuple[bytes, ...]]


class NearStorage:
    """Held entries and generations, and the bytes they cost, within the bounds."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._max_item_bytes = max(max_bytes // 64, 1)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        #: Held generations: their values by key (immutable, so untracked by the collector).
        self._generations: dict[str, bytes] = {}
        #: When a read that found each held generation unchanged was sent.
        self._confirmed: dict[str, float] = {}
        #: Each scope generation's objects, as the held entries share them.
        self._shared: dict[_ScopeGeneration, _ScopeGeneration] = {}
        self._bytes = 0
        #: The admission filter, once the near cache has been full (see :meth:`admits`): an
        #: array of ints, nothing for the garbage collector to walk.
        self._doorkeeper: array[int] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_held(self) -> int:
        """What the held entries and generations cost, as counted against ``max_bytes``."""
        return self._bytes

    def held_generation_keys(self) -> list[str]:
        """The keys of the generations held now, to confirm."""
        return list(self._generations)

    def admits(self, key: str) -> bool:
        """Whether an entry of ``key`` read from Redis now would be kept: always while there is
        room for it (a sixty-fourth of the byte bound, one more key), once full only when its
        key was asked about lately (its hash still in its slot of the filter)."""
        if (
            self._bytes <= self._max_bytes - self._max_item_bytes
            and len(self._entries) + len(self._generations) < self._max_entries
        ):
            return True
        doorkeeper = self._doorkeeper
        if doorkeeper is None:
            doorkeeper = self._doorkeeper = array("q", bytes(8 * ADMISSION_SLOTS))
        key_hash = hash(key)
        slot = key_hash & (ADMISSION_SLOTS - 1)
        if doorkeeper[slot] == key_hash:
            return True
        doorkeeper[slot] = key_hash
        return False

    def diverges(
        self,
        key: str,
        value: bytes | None,
        generation_values: list[bytes | None],
        expires_at: float,
    ) -> bool:
        """Whether Redis holds under ``key``, under the same generations, other bytes than the
        entry held here, and not a later copy (a fill that replaced an evicted or expired one
        expires later): a change no fill made, which nothing announces."""
        entry = self._entries.get(key)
        if entry is None or value is None or value == entry[0]:
            return False
        if tuple(generation_values) != entry[4]:
            return False  # a generation changed: its message, or the confirmation, drops it
        return expires_at <= entry[1] + EXPIRY_TOLERANCE_SECONDS

    def _store_entry(
        self,
        key: str,
        value: bytes,
        expires_at: float,
        generation: bytes,
        generation_keys: tuple[str, ...],
        generation_values: tuple[bytes, ...],
    ) -> bool:
        """Holds an entry, making room; ``False`` when it is too large to hold."""
        # A plain str: a key that knows its scope and route (a ``ScopedKey``) is an object the
        # garbage collector walks, with those it refers to, for as long as the entry is held.
        key = str(key)
        size = _entry_size(key, value, generation)
        if size > self._max_item_bytes:
            return False
        self._drop_entry(key)
        self._make_room(size)
        generation, generation_keys, generation_values = self._shared_objects(
            (generation, generation_keys, generation_values)
        )
        self._entries[key] = (value, expires_at, generation, generation_keys, generation_values)
        self._bytes += size
        return True

    def _shared_objects(self, scope_generation: _ScopeGeneration) -> _ScopeGeneration:
        """The objects equal to ``scope_generation``'s that the held entries already share
        (these ones, if none)."""
        shared = self._shared.get(scope_generation)
        if shared is None:
            if len(self._shared) >= SHARED_GENERATIONS_MAX:
                self._shared.clear()
            shared = self._shared[scope_generation] = scope_generation
        return shared

    def _held_generation(self, key: str, value: bytes, sent_at: float) -> bytes:
        """Holds a generation a read sent at ``sent_at`` found (confirmed as of then); the held
        object, shared by every entry of the scope."""
        held = self._generations.get(key)
        if held is not None:
            if held == value:
                if sent_at > self._confirmed.get(key, 0.0):
                    self._confirmed[key] = sent_at
                return held
            # A change whose message is still on its way: the newer value replaces it.
            self._drop_generation(key)
        self._make_room(len(key) + len(value) + GENERATION_OVERHEAD_BYTES)
        self._generations[key] = value
        self._confirmed[key] = sent_at
        self._bytes += len(key) + len(value) + GENERATION_OVERHEAD_BYTES
        return value

    def _make_room(self, size: int) -> None:
        entries = self._entries
        while entries and (
            len(entries) + len(self._generations) >= self._max_entries
            or self._bytes + size > self._max_bytes
        ):
            key, oldest = entries.popitem(last=False)
            self._bytes -= _entry_size(key, oldest[0], oldest[2])
        if len(self._generations) >= self._max_entries or self._bytes + size > self._max_bytes:
            # Only generations are left: drop them all (entries that need them then miss).
            for key in list(self._generations):
                self._drop_generation(key)

    def _drop_entry(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= _entry_size(key, entry[0], entry[2])

    def _drop_generation(self, key: str) -> None:
        held = self._generations.pop(key, None)
        if held is not None:
            del self._confirmed[key]
            self._bytes -= len(key) + len(held) + GENERATION_OVERHEAD_BYTES

    def _forget_all(self) -> None:
        self._entries.clear()
        self._shared.clear()
        self._generations.clear()
        self._confirmed.clear()
        self._bytes = 0


def _entry_size(key: str, value: bytes, generation: bytes) -> int:
    """What a held entry is counted as (see :data:`ENTRY_OVERHEAD_BYTES`)."""
    return len(key) + len(value) + len(generation) + ENTRY_OVERHEAD_BYTES
