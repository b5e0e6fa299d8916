"""Hooks through which the layer and the decorator report what they do (metrics attach here).

The default :class:`CacheEvents` does nothing, so the hot path pays one method call per event.
Labels passed to the hooks are bounded: namespaces, outcomes and operations, never tenant ids, user
ids or keys.
"""

from __future__ import annotations

__all__ = ["CacheEvents", "LookupOutcome"]


class LookupOutcome:
    """The outcomes a cached request can have (the ``outcome`` of :meth:`CacheEvents.lookup`)."""

    HIT = "hit"
    MISS = "miss"
    #: Served from an expired entry kept by ``stale_ttl`` while one background refresh runs.
    STALE = "stale"
    #: Served uncached: no tenant or user to build a key from.
    BYPASS_NO_IDENTITY = "bypass_no_identity"
    #: Served uncached: CACHE_ENABLED is false or init_cache() has not run.
    BYPASS_DISABLED = "bypass_disabled"
    #: The stored entry was skipped because the client asked (CACHE_HONOR_CLIENT_NO_CACHE).
    BYPASS_CLIENT = "bypass_client"


class CacheEvents:
    """Receives the cache's events. Subclass and override what you need; each default is a no-op."""

    def lookup(self, namespace: str, outcome: str) -> None:
        """A cached route answered a request: ``outcome`` is one of :class:`LookupOutcome`."""

    def backend_error(self, namespace: str, operation: str) -> None:
        """A backend operation (``get``, ``set``, ``invalidate``, ...) failed and was absorbed."""

    def rejected_entry(self, namespace: str, reason: str) -> None:
        """A stored value was not served: ``reason`` is ``format`` (not this cache's format:
        garbage, another library's value, an older format) or ``fingerprint`` (written by another
        version of the route). The read was a miss and the fill overwrites the value."""

    def served_stale_on_error(self, namespace: str) -> None:
        """Computing a fresh answer failed and a stale entry was served instead
        (``stale_if_error``); the request was counted once already, as a miss."""

    def invalidated(self, namespace: str, removed: int) -> None:
        """An invalidation of ``namespace`` returned, having removed ``removed`` entries (the
        in-memory tier's; Redis' follow in :meth:`removed_in_background`)."""

    def removed_in_background(self, namespace: str, removed: int) -> None:
        """The background removal of an invalidation's old entries in ``namespace`` ended,
        having removed ``removed`` entries."""

    def removals_pending(self, count: int) -> None:
        """``count`` background removals of invalidated entries are waiting or running."""

    def start_flush_kept(self) -> None:
        """The process started while Redis did not answer, without an invalidation journal: a
        flush of the whole prefix is kept, applied before Redis is read
        (``CACHE_FLUSH_AFTER_DEGRADED_START``)."""

    def state_changed(self, state: str) -> None:
        """The layer moved to ``state`` (``redis``, ``memory``, ``degraded``, ``disabled``)."""

    def timed(self, namespace: str, operation: str, seconds: float) -> None:
        """Time one read or write spent on Redis (in-memory operations are not timed)."""

    def near_cache_hit(self, namespace: str) -> None:
        """A read from Redis was answered by the near cache, with no command sent."""

    def near_cache_invalidation(self, keys: int) -> None:
        """Redis sent an invalidation message naming ``keys`` keys (0: a flush of everything)."""

    def near_cache_held(self, near_cache: int, entries: int, bytes_held: int) -> None:
        """What near cache number ``near_cache`` (one per server it reads: several on a cluster)
        holds now: ``entries``, counted as ``bytes_held`` against ``CACHE_NEAR_CACHE_MAX_BYTES``.
        Reported every third of ``CACHE_NEAR_CACHE_MAX_AGE_SECONDS`` while it runs, and as
        ``(0, 0)`` once it is closed."""

    def near_cache_flushed(self, reason: str) -> None:
        """The near cache was emptied: ``reason`` is one of ``backends.redis.near.FlushReason``."""
