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
"""

from __future__ import annotations

from commons.cache.backends.base import CacheStore
from commons.cache.scope import CacheScope, InvalidationTarget

__all__ = ["PendingInvalidations", "PendingItem"]

#: One kept item: an invalidation target, one key (with its scope when known), or a flush (None).
PendingItem = InvalidationTarget | tuple[str, CacheScope | None] | None


class PendingInvalidations:
    """An ordered, self-compacting set of invalidations waiting for Redis."""

    def __init__(self, max_items: int) -> None:
        self._max_items = max_items
        self._seq = 0
        #: Sequence number of the pending flush, or None.
        self._everything: int | None = None
        self._targets: dict[InvalidationTarget, int] = {}
        # key -> (its scope, or None when its namespace is unknown; sequence number)
        self._keys: dict[str, tuple[CacheScope | None, int]] = {}

    def __len__(self) -> int:
        return int(self._everything is not None) + len(self._targets) + len(self._keys)

    def __bool__(self) -> bool:
        return self._everything is not None or bool(self._targets) or bool(self._keys)

    @property
    def everything(self) -> bool:
        """True when a service-wide flush is pending."""
        return self._everything is not None

    def targets(self) -> list[InvalidationTarget]:
        return list(self._targets)

    def keys(self) -> list[str]:
        return list(self._keys)

    def items(self) -> list[PendingItem]:
        """What is kept, as items that :meth:`add_item` takes back (the journal's lines)."""
        if self._everything is not None:
            return [None]
        keys: list[PendingItem] = [(key, scope) for key, (scope, _) in self._keys.items()]
        return [*self._targets, *keys]

    def add_item(self, item: PendingItem) -> None:
        """Keeps ``item`` (one of :meth:`items`)."""
        if item is None:
            self.add_everything()
        elif isinstance(item, InvalidationTarget):
            self.add(item)
        else:
            self.add_key(*item)

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def add(self, target: InvalidationTarget) -> None:
        """Keeps an invalidation of ``target``."""
        seq = self._next()
        if self._everything is not None:
            self._everything = seq
            return
        for existing in self._targets:
            if existing.covers(target):
                self._targets[existing] = seq
                return
        self._targets = {
            existing: existing_seq
            for existing, existing_seq in self._targets.items()
            if not target.covers(existing)
        }
        self._keys = {
            key: item
            for key, item in self._keys.items()
            if item[0] is None or not target.matches(item[0])
        }
        self._targets[target] = seq
        self._compact()

    def add_key(self, key: str, scope: CacheScope | None) -> None:
        """Keeps the removal of one key; ``scope`` lets a wider item cover it."""
        seq = self._next()
        if self._everything is not None:
            self._everything = seq
            return
        if scope is not None:
            for target in self._targets:
                if target.matches(scope):
                    self._targets[target] = seq
                    return
        self._keys[key] = (scope, seq)
        self._compact()

    def add_everything(self) -> None:
        """Keeps a service-wide flush; it covers every other item."""
        self._everything = self._next()
        self._targets.clear()
        self._keys.clear()

    def clear(self) -> None:
        self._everything = None
        self._targets.clear()
        self._keys.clear()

    def _compact(self) -> None:
        if len(self) <= self._max_items:
            return
        namespaces = {target.namespace for target in self._targets}
        for scope, _ in self._keys.values():
            if scope is None:
                self.add_everything()
                return
            namespaces.add(scope.namespace)
        seq = self._next()
        self._keys.clear()
        self._targets = {InvalidationTarget(namespace): seq for namespace in namespaces}

    async def apply_to(self, store: CacheStore) -> int:
        """Applies every pending item to ``store``, oldest first; returns the entries removed.

        Raises:
            BackendError: The store failed; the items not yet applied stay pending.
        """
        removed = 0
        while self:
            if self._everything is not None:
                seq = self._everything
                removed += await store.clear()
                if self._everything == seq:
                    self._everything = None
                continue
            for target, seq in list(self._targets.items()):
                removed += await store.invalidate(target)
                if self._targets.get(target) == seq:
                    del self._targets[target]
            for key, (scope, seq) in list(self._keys.items()):
                removed += await store.delete(key, scope)
                if key in self._keys and self._keys[key][1] == seq:
                    del self._keys[key]
        return removed
