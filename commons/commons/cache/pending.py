"""Invalidations that could not reach Redis, kept until they can.

Three kinds are kept: invalidation targets (a namespace, one tenant of it, one user), single keys
(``delete``) and the service-wide flush (``clear``). They are deduplicated as they arrive: an item
already covered by a wider one only renews that one, and a new wider item absorbs the narrower ones
it covers; a flush covers everything. Past ``max_items`` the set is widened: keys and targets become
whole namespaces (whose number is bounded by the code), and a key whose namespace is unknown becomes
a flush. Memory stays bounded and no invalidation is ever lost, at worst made wider.

:meth:`PendingInvalidations.apply_to` replays them against a store. Each item carries the sequence
number of its latest request and is removed only if it was not requested again while it was being
applied (an invalidation asked for during the replay must also remove what other replicas wrote in
the meantime), so a replay cut short by a failure leaves the rest for the next attempt and items
added while it runs are applied by the same call.

Cost: keeping n invalidations costs O(n) in all, and a call that keeps one more never copies or
frees the whole set (``python -m bench pending``: with 100,000 kept, and with the set widened at
10,000, the longest call held the event loop 0.23-0.42 ms over four runs). Whether an item is
covered is a look-up of the at most three targets that could cover it (its namespace, its tenant,
itself), and what a wider item absorbs is found in indexes by namespace, tenant and user, so each
item is indexed and removed once. Every map and index past 512 entries is split into 64 shards by
hash: CPython grows a dict or a set by copying it whole, so one that held 87,000 items once held
the loop 3.5 ms as it grew. The order is a linked list: a renewed item moves to the end and an
absorbed or applied one leaves in O(1), so the replay takes the oldest item first and never copies
the set. A widening reads the number of items kept per namespace, counted as they come and go, so
it is O(namespaces); it and a flush start from empty sets, and what they replaced is freed 256
entries per later call rather than all in one. What a single call can still do at once is absorb: a
wider item that covers m kept ones removes them in that call (each item is absorbed at most once,
so the total stays O(n); 10,000 of one namespace took 22 ms). (The first version scanned every kept
target on every call: 10,000 kept invalidations took 11.9 s of event-loop time, one call near the
bound 17 ms; the next widened by reading every item, 1.0-1.3 ms in one call.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator
from typing import Any, Generic, TypeVar

from commons.cache.backends.base import CacheStore
from commons.cache.scope import CacheScope, InvalidationTarget

__all__ = ["PendingInvalidations", "PendingItem"]

#: One kept item: an invalidation target, one key (with its scope when known), or a flush (None).
PendingItem = InvalidationTarget | tuple[str, CacheScope | None] | None

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")

#: A target or a key's scope as the maps hold it: (namespace, tenant, user). A tuple hashes in C,
#: the dataclass in Python code, and each call hashes several.
_Scope = tuple[str, str | None, str | None]

#: A container past this many entries is split into _WIDTH shards: CPython grows a dict or a set
#: by copying it whole, so an unsplit one of 87,000 items held the loop 3 ms when it grew.
_SPLIT_AT = 512
_WIDTH = 64
#: Entries freed per call when a widening or a flush lets go of what it replaced.
_RELEASE_BATCH = 256


class _Shards(Generic[K, V]):
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

    def detach(self) -> list[dict[K, V]]:
        """Empties this and returns what it held, for :func:`_released` to free bit by bit."""
        shards, self._shards, self._mask, self._len = self._shards, [{}], 0, 0
        return shards


class _Link:
    __slots__ = ("next", "prev")

    def __init__(self) -> None:
        self.prev: _Link = self
        self.next: _Link = self


#: Where an unlinked node points: at itself it would be a cycle, freed only by the collector.
_UNLINKED = _Link()


class _Node(_Link, Generic[T]):
    """One kept item in the replay order; ``scope`` is a key's (None for a target)."""

    __slots__ = ("item", "scope", "seq")

    def __init__(self, item: T, scope: CacheScope | None, seq: int) -> None:
        self.prev = self.next = _UNLINKED
        self.item = item
        self.scope = scope
        self.seq = seq


class _Order(Generic[T]):
    """Kept items, oldest request first: a doubly linked list, so that moving a renewed item to
    the end or removing one anywhere is O(1) and the order never needs one large copy."""

    __slots__ = ("_head",)

    def __init__(self) -> None:
        self._head = _Link()

    def append(self, node: _Node[T]) -> None:
        tail = self._head.prev
        node.prev, node.next = tail, self._head
        tail.next = self._head.prev = node

    def remove(self, node: _Node[T]) -> None:
        node.prev.next, node.next.prev = node.next, node.prev
        # A node left pointing at its neighbours would be freed only by the cyclic collector.
        node.prev = node.next = _UNLINKED

    def move_to_end(self, node: _Node[T]) -> None:
        self.remove(node)
        self.append(node)

    def first(self) -> _Node[T] | None:
        node = self._head.next
        return None if node is self._head else node  # type: ignore[return-value]

    def __iter__(self) -> Iterator[_Node[T]]:
        node = self._head.next
        while node is not self._head:
            yield node  # type: ignore[misc]
            node = node.next

    def detach(self) -> _Link:
        """Empties this and returns the old chain's head, for :func:`_released`."""
        head, self._head = self._head, _Link()
        return head


def _released(chains: list[_Link], shards: list[dict[Any, Any]]) -> Iterator[None]:
    """Frees what a widening or a flush replaced, _RELEASE_BATCH entries per step.

    Dropping it at once would free every kept item in one call: O(n) on the event loop.
    """
    done = 0
    for head in chains:
        while head.next is not head:
            node = head.next
            head.next = node.next
            node.prev = node.next = _UNLINKED
            done += 1
            if done % _RELEASE_BATCH == 0:
                yield
        head.prev = head.next = _UNLINKED
    while shards:
        shard = shards[-1]
        if not shard:
            shards.pop()
            continue
        _, value = shard.popitem()
        if isinstance(value, _Shards):  # an index's members: freed the same way
            shards.extend(value.detach())
        done += 1
        if done % _RELEASE_BATCH == 0:
            yield


class PendingInvalidations:
    """An ordered, self-compacting set of invalidations waiting for Redis."""

    def __init__(self, max_items: int) -> None:
        self._max_items = max_items
        self._seq = 0
        #: Sequence number of the pending flush, or None.
        self._everything: int | None = None
        # What earlier widenings and flushes let go of, still being freed.
        self._releasing: deque[Iterator[None]] = deque()
        self._targets: _Shards[_Scope, _Node[InvalidationTarget]] = _Shards()
        self._target_order: _Order[InvalidationTarget] = _Order()
        # key -> its node (its scope, or None when its namespace is unknown; sequence number)
        self._keys: _Shards[str, _Node[str]] = _Shards()
        self._key_order: _Order[str] = _Order()
        # What a wider target absorbs: targets below a namespace or a tenant, keys below a
        # namespace, a tenant or a user (each key under all three of its scope).
        self._targets_below: _Shards[tuple[str, str | None], _Shards[_Scope, None]] = _Shards()
        self._keys_below: _Shards[_Scope, _Shards[str, None]] = _Shards()
        # Kept items per namespace, and keys without one: what a widening keeps, known without
        # looking at the items.
        self._per_namespace: dict[str, int] = {}
        self._unscoped_keys = 0

    def __len__(self) -> int:
        return int(self._everything is not None) + len(self._targets) + len(self._keys)

    def __bool__(self) -> bool:
        return self._everything is not None or bool(self._targets) or bool(self._keys)

    @property
    def everything(self) -> bool:
        """True when a service-wide flush is pending."""
        return self._everything is not None

    def targets(self) -> list[InvalidationTarget]:
        return [node.item for node in self._target_order]

    def keys(self) -> list[str]:
        return [node.item for node in self._key_order]

    def items(self) -> list[PendingItem]:
        """What is kept, as items that :meth:`add_item` takes back (the journal's lines)."""
        if self._everything is not None:
            return [None]
        keys: list[PendingItem] = [(node.item, node.scope) for node in self._key_order]
        return [*self.targets(), *keys]

    def add_item(self, item: PendingItem) -> None:
        """Keeps ``item`` (one of :meth:`items`)."""
        if item is None:
            self.add_everything()
        elif isinstance(item, InvalidationTarget):
            self.add(item)
        else:
            self.add_key(*item)

    def _next(self) -> int:
        self._release_some()
        self._seq += 1
        return self._seq

    def _release_some(self) -> None:
        """One step of freeing what was replaced: a bounded share of it on each call."""
        if self._releasing and next(self._releasing[0], StopIteration) is StopIteration:
            self._releasing.popleft()

    def add(self, target: InvalidationTarget) -> None:
        """Keeps an invalidation of ``target``."""
        seq = self._next()
        if self._everything is not None:
            self._everything = seq
            return
        ns, tenant, user = scope = (target.namespace, target.tenant_id, target.user_id)
        covering = self._covering(ns, tenant, user)
        if covering is not None:
            self._renew(covering, seq)
            return
        if user is None:
            for narrower in self._targets_below.pop((ns, tenant)) or ():
                self._drop_target(narrower)
        for key in self._keys_below.pop(scope) or ():
            self._drop_key(key)
        self._keep_target(target, seq)
        self._compact()

    def _keep_target(self, target: InvalidationTarget, seq: int) -> None:
        node = _Node(target, None, seq)
        ns, tenant, user = scope = (target.namespace, target.tenant_id, target.user_id)
        self._targets.put(scope, node)
        self._target_order.append(node)
        if tenant is not None:
            self._index(self._targets_below, (ns, None), scope)
            if user is not None:
                self._index(self._targets_below, (ns, tenant), scope)
        self._count(ns, 1)

    def add_key(self, key: str, scope: CacheScope | None) -> None:
        """Keeps the removal of one key; ``scope`` lets a wider item cover it."""
        seq = self._next()
        if self._everything is not None:
            self._everything = seq
            return
        if scope is not None:
            covering = self._covering(scope.namespace, scope.tenant_id, scope.user_id)
            if covering is not None:
                self._renew(covering, seq)
                return
        if key in self._keys:
            self._drop_key(key)  # renewed: to the end
        node = _Node(key, scope, seq)
        self._keys.put(key, node)
        self._key_order.append(node)
        for level in _levels(scope):
            self._index(self._keys_below, level, key)
        self._count(scope.namespace if scope is not None else None, 1)
        self._compact()

    @staticmethod
    def _index(index: _Shards[Any, _Shards[T, None]], level: Hashable, member: T) -> None:
        below = index.get(level)
        if below is None:
            below = _Shards()
            index.put(level, below)
        below.put(member, None)

    @staticmethod
    def _unindex(index: _Shards[Any, _Shards[T, None]], level: Hashable, member: T) -> None:
        below = index.get(level)
        if below is not None:
            below.pop(member)
            if not below:
                index.pop(level)

    def _count(self, namespace: str | None, change: int) -> None:
        """Counts kept items by namespace (None: a key whose namespace is unknown)."""
        if namespace is None:
            self._unscoped_keys += change
            return
        left = self._per_namespace.get(namespace, 0) + change
        if left:
            self._per_namespace[namespace] = left
        else:
            del self._per_namespace[namespace]

    def _covering(
        self, namespace: str, tenant_id: str | None, user_id: str | None
    ) -> _Node[InvalidationTarget] | None:
        """The kept target that covers this scope, if any: at most three look-ups."""
        targets = self._targets
        node = targets.get((namespace, None, None))
        if node is None and tenant_id is not None:
            node = targets.get((namespace, tenant_id, None))
            if node is None and user_id is not None:
                node = targets.get((namespace, tenant_id, user_id))
        return node

    def _renew(self, node: _Node[InvalidationTarget], seq: int) -> None:
        node.seq = seq
        self._target_order.move_to_end(node)

    def _drop_target(self, scope: _Scope) -> None:
        node = self._targets.pop(scope)
        assert node is not None
        self._target_order.remove(node)
        namespace, tenant, _ = scope
        if tenant is not None:
            for level in ((namespace, None), (namespace, tenant)):
                self._unindex(self._targets_below, level, scope)
        self._count(namespace, -1)

    def _drop_key(self, key: str) -> None:
        node = self._keys.pop(key)
        assert node is not None
        self._key_order.remove(node)
        for level in _levels(node.scope):
            self._unindex(self._keys_below, level, key)
        self._count(node.scope.namespace if node.scope is not None else None, -1)

    def add_everything(self) -> None:
        """Keeps a service-wide flush; it covers every other item."""
        self._everything = self._next()
        self._forget_all()

    def clear(self) -> None:
        self._everything = None
        self._forget_all()

    def _forget_all(self) -> None:
        """Starts empty in O(1); what was kept is freed a bounded share per later call."""
        if not (self._targets or self._keys):
            return
        chains = [self._target_order.detach(), self._key_order.detach()]
        shards: list[dict[Any, Any]] = []
        for index in (self._targets, self._keys, self._targets_below, self._keys_below):
            shards.extend(index.detach())
        self._releasing.append(_released(chains, shards))
        self._per_namespace = {}
        self._unscoped_keys = 0

    def _compact(self) -> None:
        """Past the bound, widens to whole namespaces: O(namespaces), from the counts kept."""
        if len(self) <= self._max_items:
            return
        if self._unscoped_keys:
            self.add_everything()
            return
        namespaces = list(self._per_namespace)
        seq = self._next()
        self._forget_all()
        for namespace in namespaces:
            self._keep_target(InvalidationTarget(namespace), seq)

    async def apply_to(self, store: CacheStore) -> int:
        """Applies every pending item to ``store``, oldest first; returns the entries removed.

        Raises:
            BackendError: The store failed; the items not yet applied stay pending.
        """
        removed = 0
        while self:
            self._release_some()
            if self._everything is not None:
                seq = self._everything
                removed += await store.clear()
                if self._everything == seq:
                    self._everything = None
            elif (target_node := self._target_order.first()) is not None:
                target, seq = target_node.item, target_node.seq
                removed += await store.invalidate(target)
                kept_as = (target.namespace, target.tenant_id, target.user_id)
                current = self._targets.get(kept_as)
                if current is not None and current.seq == seq:
                    self._drop_target(kept_as)
            elif (key_node := self._key_order.first()) is not None:
                key, scope, seq = key_node.item, key_node.scope, key_node.seq
                removed += await store.delete(key, scope)
                current_key = self._keys.get(key)
                if current_key is not None and current_key.seq == seq:
                    self._drop_key(key)
        return removed


def _levels(scope: CacheScope | None) -> list[_Scope]:
    """The index entries of a key of ``scope``: its namespace, its tenant, its user."""
    if scope is None:
        return []
    levels: list[_Scope] = [(scope.namespace, None, None)]
    if scope.tenant_id is not None:
        levels.append((scope.namespace, scope.tenant_id, None))
        if scope.user_id is not None:
            levels.append((scope.namespace, scope.tenant_id, scope.user_id))
    return levels
