"""Invalidations that could not reach Redis, kept until they can.

They are deduplicated as they arrive: a target already covered by a wider one is dropped, and a new
wider target absorbs the narrower ones it covers. Past ``max_targets`` distinct targets the set is
widened to whole namespaces, whose number is bounded by the code, so memory stays bounded and no
invalidation is ever lost, at worst made wider.
"""

from __future__ import annotations

from commons.cache.scope import InvalidationTarget

__all__ = ["PendingInvalidations"]


class PendingInvalidations:
    """An ordered, self-compacting set of invalidation targets."""

    def __init__(self, max_targets: int) -> None:
        self._max_targets = max_targets
        self._targets: dict[InvalidationTarget, None] = {}

    def __len__(self) -> int:
        return len(self._targets)

    def __bool__(self) -> bool:
        return bool(self._targets)

    def targets(self) -> list[InvalidationTarget]:
        return list(self._targets)

    def add(self, target: InvalidationTarget) -> None:
        if any(existing.covers(target) for existing in self._targets):
            return
        self._targets = {
            existing: None for existing in self._targets if not target.covers(existing)
        }
        self._targets[target] = None
        if len(self._targets) > self._max_targets:
            self._targets = {
                InvalidationTarget(existing.namespace): None for existing in self._targets
            }

    def discard(self, target: InvalidationTarget) -> None:
        self._targets.pop(target, None)

    def clear(self) -> None:
        self._targets.clear()
