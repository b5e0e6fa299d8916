"""The invalidation clock that fills are checked against: bounded, and never letting a fill read
before an invalidation be stored after it."""

from __future__ import annotations

from commons.cache.removals import INVALIDATION_CLOCK_MAX_NAMESPACES, InvalidationClock
from commons.cache.scope import CacheScope, tag_namespace


def test_it_remembers_a_bounded_number_of_namespaces_whatever_is_invalidated() -> None:
    # Tags are meant to be one per item (insight:{id}): a service invalidating item after item
    # must not keep one record per tag it ever invalidated.
    clock = InvalidationClock()
    for item in range(3 * INVALIDATION_CLOCK_MAX_NAMESPACES):
        clock.mark(tag_namespace(f"insight:{item}"))

    assert len(clock) <= INVALIDATION_CLOCK_MAX_NAMESPACES


def test_a_fill_read_before_a_forgotten_invalidation_is_still_refused() -> None:
    clock = InvalidationClock()
    scope = CacheScope("insights", "t1", tags=("insight:7",))
    read_at = clock.stamp(scope)  # a fill's read, before the invalidation
    clock.mark(tag_namespace("insight:7"))
    for item in range(2 * INVALIDATION_CLOCK_MAX_NAMESPACES):  # its record is forgotten
        clock.mark(tag_namespace(f"other:{item}"))

    assert clock.stamp(scope) > read_at  # the fill is refused, as before the forgetting


def test_scopes_invalidated_nowhere_keep_their_stamp_between_forgettings() -> None:
    clock = InvalidationClock()
    clock.mark("other")
    scope = CacheScope("insights", "t1")
    read_at = clock.stamp(scope)
    clock.mark("another")

    assert clock.stamp(scope) == read_at  # only what was invalidated moved
