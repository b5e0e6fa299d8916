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

Cost: keeping n invalidations costs O(n) in all, and no call does work in proportion to what is
kept (``python -m bench pending``). Kept targets and scoped keys live in a tree of scopes
(namespace, tenant, user) whose every node counts the items kept in it and below it: whether an
item is covered is a walk of at most three levels, and ``len()`` and a widening read the counts.
A wider target that covers m kept items absorbs them in O(1): it takes over their scope's place
in the tree, so they are no longer kept from that moment (an item is kept while a reachable place
holds it), and the counts above lose m at once. The absorbed items stay in the replay order until
they are unlinked, 64 entries per later call, or by the replay, which never applies them (they
are older than the target that absorbed them, and it is applied in its turn) and lets the loop
run every 64; it ends with the order empty, and :meth:`~PendingInvalidations.release_all` frees
the rest once Redis is back. Every map past 512 entries is split into 64 shards by hash: CPython
grows a dict by copying it whole, so one that held 87,000 items once held the loop 3.5 ms as it
grew. The order is a linked list: a
renewed item moves to the end and an applied one leaves in O(1), so the replay takes the oldest
item first and never copies the set. A widening is O(namespaces); it and a flush start from an
empty tree, and what they replaced is freed 256 entries per later call rather than all in one.
(The first version scanned every kept target on every call: 10,000 kept invalidations took 11.9
s of event-loop time, one call near the bound 17 ms; a namespace that absorbed 100,000 kept ones
removed them in one call, 328 ms.)
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from commons.cache.backends.base import CacheStore
from commons.cache.pending_structures import UNLINKED, Link, Node, Order, Shards
from commons.cache.scope import CacheScope, InvalidationTarget

__all__ = ["PendingInvalidations", "PendingItem"]

#: One kept item: an invalidation target, one key (with its scope when known), or a flush (None).
PendingItem = InvalidationTarget | tuple[str, CacheScope | None] | None

#: Entries freed per call when a widening or a flush lets go of what it replaced.
_RELEASE_BATCH = 256
#: Entries per call when what a wider target absorbed is unlinked from the order in use: each
#: costs more than a plain free (its neighbours in the order are written), 1-3 µs.
_SWEEP_BATCH = 64


class _Place:
    """One scope in the tree of kept items (a namespace, a tenant of it, a user of that tenant).

    It holds the target kept for exactly this scope, the keys kept for exactly this scope, the
    scopes below it, and how many items it and the scopes below it keep. Only places reachable
    from the root are kept: an item is kept while its place is reachable and still holds it.
    """

    __slots__ = ("below", "count", "keys", "target")

    def __init__(self) -> None:
        self.below: Shards[str, _Place] | None = None
        self.keys: Shards[str, Node[str]] | None = None
        self.target: Node[InvalidationTarget] | None = None
        self.count = 0

    def find(self, names: tuple[str, ...]) -> _Place | None:
        """The place of ``names`` below this one, if there is one."""
        place: _Place | None = self
        for name in names:
            below = place.below if place is not None else None
            place = below.get(name) if below is not None else None
        return place

    def path(self, names: tuple[str, ...]) -> list[_Place]:
        """The places from this one down to ``names``, made where missing."""
        place = self
        path = [place]
        for name in names:
            below = place.below
            if below is None:
                below = place.below = Shards()
            child = below.get(name)
            if child is None:
                child = _Place()
                below.put(name, child)
            path.append(child)
            place = child
        return path

    def covering(
        self, namespace: str, tenant_id: str | None, user_id: str | None
    ) -> Node[InvalidationTarget] | None:
        """The kept target that covers this scope, if any: at most three look-ups."""
        place = self
        for name in _names(namespace, tenant_id, user_id):
            below = place.below
            child = below.get(name) if below is not None else None
            if child is None:
                return None
            if child.target is not None:
                return child.target
            place = child
        return None


def _names(namespace: str, tenant_id: str | None, user_id: str | None) -> tuple[str, ...]:
    """The path of a scope in the tree: its namespace, then its tenant, then its user.

    A user without a tenant is not a scope of its own (a key scoped so is its namespace's).
    """
    if tenant_id is None:
        return (namespace,)
    if user_id is None:
        return (namespace, tenant_id)
    return (namespace, tenant_id, user_id)


def _names_of(node: Node[Any]) -> tuple[str, ...] | None:
    """The path of a kept item's scope (None: a key whose namespace is unknown)."""
    item = node.item
    if isinstance(item, InvalidationTarget):
        return _names(item.namespace, item.tenant_id, item.user_id)
    scope = node.scope
    return None if scope is None else _names(scope.namespace, scope.tenant_id, scope.user_id)


def _only_freed(node: Node[Any]) -> None:
    """Nothing to unlink: the node's order was detached whole."""


def _released(
    chains: list[Link],
    shards: list[dict[Any, Any]],
    batch: int,
    unlink: Callable[[Node[Any]], None],
) -> Iterator[None]:
    """Frees what was let go of, ``batch`` entries per step.

    ``chains`` are detached orders, whose nodes are unlinked from each other. The items in
    ``shards`` (and in the places there) are handed to ``unlink``, which unlinks them from the
    order in use when that order still holds them (an absorbed place) and does nothing after a
    widening or a flush, whose order was detached whole. Dropping it all at once would free every
    item in one call: O(n) on the event loop.
    """
    done = 0
    for head in chains:
        while head.next is not head:
            node = head.next
            head.next = node.next
            node.prev = node.next = UNLINKED
            done += 1
            if done % batch == 0:
                yield
        head.prev = head.next = UNLINKED
    while shards:
        shard = shards[-1]
        if not shard:
            shards.pop()
            continue
        _, value = shard.popitem()
        if isinstance(value, _Place):
            # The place is dropped: its maps' dicts are freed as they are, not detached.
            if value.below is not None:
                shards.extend(value.below.parts())
            if value.keys is not None:
                shards.extend(value.keys.parts())
            value = value.target
        if isinstance(value, Node):
            unlink(value)
        done += 1
        if done % batch == 0:
            yield


class PendingInvalidations:
    """An ordered, self-compacting set of invalidations waiting for Redis."""

    def __init__(self, max_items: int) -> None:
        self._max_items = max_items
        self._seq = 0
        #: Sequence number of the pending flush, or None.
        self._everything: int | None = None
        # What absorptions, widenings and flushes let go of, still being unlinked and freed.
        self._releasing: deque[Iterator[None]] = deque()
        # Bumped by every widening and flush: what was absorbed before one is no longer in the
        # order or the key map that are in use, and is only freed.
        self._era = 0
        # Targets and scoped keys by scope; the counts in it are what len() and a widening read.
        self._root = _Place()
        self._target_order: Order[InvalidationTarget] = Order()
        # Every kept key -> its node (absorbed ones until they are unlinked): a key asked again
        # with another scope replaces the one kept.
        self._keys: Shards[str, Node[str]] = Shards()
        self._key_order: Order[str] = Order()
        self._unscoped_keys = 0

    def __len__(self) -> int:
        return int(self._everything is not None) + self._root.count + self._unscoped_keys

    def __bool__(self) -> bool:
        return self._everything is not None or bool(self._root.count or self._unscoped_keys)

    @property
    def everything(self) -> bool:
        """True when a service-wide flush is pending."""
        return self._everything is not None

    def targets(self) -> list[InvalidationTarget]:
        return [node.item for node in self._target_order if self._holds(node)]

    def keys(self) -> list[str]:
        return [node.item for node in self._key_order if self._holds(node)]

    def items(self) -> list[PendingItem]:
        """What is kept, as items that :meth:`add_item` takes back (the journal's lines)."""
        if self._everything is not None:
            return [None]
        keys: list[PendingItem] = [
            (node.item, node.scope) for node in self._key_order if self._holds(node)
        ]
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
        """One step of unlinking and freeing what was let go of: a bounded share per call."""
        if self._releasing and next(self._releasing[0], StopIteration) is StopIteration:
            self._releasing.popleft()

    # -- the tree of scopes ----------------------------------------------------------------------

    def _holds(self, node: Node[Any]) -> bool:
        """Whether ``node`` is kept: neither absorbed by a wider target, applied nor replaced."""
        names = _names_of(node)
        if names is None:
            return self._keys.get(node.item) is node
        place = self._root.find(names)
        if place is None:
            return False
        if isinstance(node.item, InvalidationTarget):
            return place.target is node
        return place.keys is not None and place.keys.get(node.item) is node

    # -- keeping ---------------------------------------------------------------------------------

    def add(self, target: InvalidationTarget) -> None:
        """Keeps an invalidation of ``target``."""
        seq = self._next()
        if self._everything is not None:
            self._everything = seq
            return
        covering = self._root.covering(target.namespace, target.tenant_id, target.user_id)
        if covering is not None:
            self._renew(covering, seq)
            return
        self._keep_target(target, seq)
        self._compact()

    def _keep_target(self, target: InvalidationTarget, seq: int) -> None:
        """Keeps ``target`` in a new place of its own; the place it takes over, with every item
        kept below it, is absorbed in O(1): detached from the tree (its items are no longer kept
        from this moment) and unlinked from the order by later calls, a share per call."""
        names = _names(target.namespace, target.tenant_id, target.user_id)
        path = self._root.path(names[:-1])
        parent = path[-1]
        below = parent.below
        if below is None:
            below = parent.below = Shards()
        absorbed = below.pop(names[-1])
        node = Node(target, None, seq)
        place = _Place()
        place.target, place.count = node, 1
        below.put(names[-1], place)
        change = 1 - (absorbed.count if absorbed is not None else 0)
        for each in path:
            each.count += change
        self._target_order.append(node)
        if absorbed is not None:
            swept = _released([], [{names[-1]: absorbed}], _SWEEP_BATCH, self._unlinker())
            self._releasing.append(swept)

    def add_key(self, key: str, scope: CacheScope | None) -> None:
        """Keeps the removal of one key; ``scope`` lets a wider item cover it."""
        seq = self._next()
        if self._everything is not None:
            self._everything = seq
            return
        if scope is not None:
            covering = self._root.covering(scope.namespace, scope.tenant_id, scope.user_id)
            if covering is not None:
                self._renew(covering, seq)
                return
        kept = self._keys.get(key)
        if kept is not None:  # renewed: to the end
            if self._holds(kept):
                self._drop(kept)
            else:
                self._discard(kept)  # absorbed meanwhile: only unlinked
        node = Node(key, scope, seq)
        self._keys.put(key, node)
        self._key_order.append(node)
        if scope is None:
            self._unscoped_keys += 1
        else:
            path = self._root.path(_names(scope.namespace, scope.tenant_id, scope.user_id))
            place = path[-1]
            if place.keys is None:
                place.keys = Shards()
            place.keys.put(key, node)
            for each in path:
                each.count += 1
        self._compact()

    def _renew(self, node: Node[InvalidationTarget], seq: int) -> None:
        node.seq = seq
        self._target_order.move_to_end(node)

    def _drop(self, node: Node[Any]) -> None:
        """Stops keeping a kept item (applied, or asked again): O(1)."""
        item, names = node.item, _names_of(node)
        if isinstance(item, InvalidationTarget):
            self._target_order.remove(node)
        else:
            self._key_order.remove(node)
            self._keys.pop(item)
        if names is None:
            self._unscoped_keys -= 1
            return
        path = self._root.path(names)
        place = path[-1]
        if isinstance(item, InvalidationTarget):
            place.target = None
        elif place.keys is not None:
            place.keys.pop(item)
        for each in path:
            each.count -= 1
        # A place that keeps nothing, nor anything below it, leaves the tree (the root stays).
        for depth in range(len(names), 0, -1):
            if path[depth].count:
                break
            parent_below = path[depth - 1].below
            assert parent_below is not None
            parent_below.pop(names[depth - 1])

    def _discard(self, node: Node[Any]) -> None:
        """Unlinks an absorbed item from the order and the key map; twice does nothing."""
        if isinstance(node.item, InvalidationTarget):
            self._target_order.discard(node)
            return
        self._key_order.discard(node)
        if self._keys.get(node.item) is node:
            self._keys.pop(node.item)

    def add_everything(self) -> None:
        """Keeps a service-wide flush; it covers every other item."""
        self._everything = self._next()
        self._forget_all()

    def clear(self) -> None:
        self._everything = None
        self._forget_all()

    def _forget_all(self) -> None:
        """Starts empty in O(1); what was kept is freed a bounded share per later call."""
        if not (self._root.count or self._unscoped_keys):
            return  # what absorptions let go of is still unlinked by their own steps
        chains = [self._target_order.detach(), self._key_order.detach()]
        shards: list[dict[Any, Any]] = [*self._keys.detach(), {None: self._root}]
        self._root = _Place()
        self._unscoped_keys = 0
        self._era += 1
        self._releasing.append(_released(chains, shards, _RELEASE_BATCH, _only_freed))

    def _compact(self) -> None:
        """Past the bound, widens to whole namespaces: O(namespaces), from the counts kept."""
        if len(self) <= self._max_items:
            return
        if self._unscoped_keys:
            self.add_everything()
            return
        below = self._root.below
        namespaces = list(below) if below is not None else []
        seq = self._next()
        self._forget_all()
        for namespace in namespaces:
            self._keep_target(InvalidationTarget(namespace), seq)

    def _unlinker(self) -> Callable[[Node[Any]], None]:
        """Unlinks an absorbed item from the order in use, unless a widening or a flush has
        detached that order since (its items are then only freed)."""
        era = self._era

        def unlink(node: Node[Any]) -> None:
            if era == self._era:
                self._discard(node)

        return unlink

    async def release_all(self) -> None:
        """Frees what absorptions, widenings and flushes let go of, a share per turn of the event
        loop: later calls would, but once Redis is back nothing is kept any more."""
        while self._releasing:
            self._release_some()
            await asyncio.sleep(0)

    # -- replaying -------------------------------------------------------------------------------

    async def apply_to(self, store: CacheStore) -> int:
        """Applies every pending item to ``store``, oldest first; returns the entries removed.

        Raises:
            BackendError: The store failed; the items not yet applied stay pending.
        """
        removed = 0
        unlinked = 0
        # Until nothing is kept, nor linked in the order: what was absorbed is unlinked here too,
        # so that the journal's rewrite after the replay reads only what is kept.
        while self or self._target_order.first() is not None or self._key_order.first() is not None:
            if self._everything is not None:
                self._release_some()
                seq = self._everything
                removed += await store.clear()
                if self._everything == seq:
                    self._everything = None
                continue
            node: Node[Any] | None = self._target_order.first()
            if node is None:
                node = self._key_order.first()
            if node is None:
                break  # not reached: something is kept or linked, so one of the orders holds it
            if not self._holds(node):
                # Absorbed by a wider target that comes later: never applied, unlinked here.
                self._discard(node)
                unlinked += 1
                if unlinked % _SWEEP_BATCH == 0:
                    await asyncio.sleep(0)  # many absorbed in a row: let requests run between
                continue
            # One step of freeing per item applied, each followed by the store's round trip.
            self._release_some()
            item, seq = node.item, node.seq
            if isinstance(item, InvalidationTarget):
                removed += await store.invalidate(item)
            else:
                removed += await store.delete(item, node.scope)
            # Asked again while it was applied (renewed, replaced or absorbed): stays for later.
            if node.seq == seq and self._holds(node):
                self._drop(node)
        return removed
