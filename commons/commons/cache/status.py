"""What ``cache_status()`` reports."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

__all__ = ["CacheState", "CacheStatus"]


class CacheState(enum.StrEnum):
    """Where cached responses are served from."""

    #: Redis is configured and answering.
    REDIS = "redis"
    #: No Redis is configured: the per-process in-memory backend.
    MEMORY = "memory"
    #: Redis is configured but unavailable: served from memory while Redis is probed again.
    DEGRADED = "degraded"
    #: CACHE_ENABLED=false, or init_cache() not called: nothing is cached.
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class CacheStatus:
    """A snapshot of the cache's state.

    Attributes:
        backend: ``"redis"``, ``"memory"``, ``"degraded"`` or ``"disabled"``.
        reason: Why the cache is in this state, in a few words.
        since: When it entered this state (UTC).
        redis_configured: Whether REDIS_URL is set.
        pending_invalidations: Invalidations made during an outage, applied to Redis before it is
            read again.
        memory_entries: Entries held by the in-memory tier.
        removals_pending: Removals of invalidated entries still waiting or running in the
            background (the invalidations themselves already hold).
        near_cache_entries: Entries this process's near cache holds (on a cluster, summed over
            the primaries' near caches).
        near_cache_bytes: What they and their generations are counted as against
            ``CACHE_NEAR_CACHE_MAX_BYTES`` (the process's memory they cost, measured: see the
            README's "Memory a worker holds").
    """

    backend: str
    reason: str
    since: datetime
    redis_configured: bool
    pending_invalidations: int = 0
    memory_entries: int = 0
    removals_pending: int = 0
    near_cache_entries: int = 0
    near_cache_bytes: int = 0
