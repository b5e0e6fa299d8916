"""Cache events recorded for tests: what the near cache reported, and which entries were refused."""

from __future__ import annotations

from commons.cache.events import CacheEvents

__all__ = ["NEAR_CACHE_BACKGROUND_COMMANDS", "RecordedEvents"]

#: Commands the near cache's own connections send whatever the reads do (``INFO commandstats``
#: names), and the tests' own inspection commands.
NEAR_CACHE_BACKGROUND_COMMANDS = frozenset(
    {"ping", "info", "client|list", "client|kill", "subscribe"}
)


class RecordedEvents(CacheEvents):
    """Counts the near cache's events and records refused entries' reasons."""

    def __init__(self) -> None:
        self.near_hits = 0
        self.messages = 0
        self.flushes: list[str] = []
        self.rejected: list[str] = []

    def near_cache_hit(self, namespace: str) -> None:
        self.near_hits += 1

    def near_cache_invalidation(self, keys: int) -> None:
        self.messages += 1

    def near_cache_flushed(self, reason: str) -> None:
        self.flushes.append(reason)

    def rejected_entry(self, namespace: str, reason: str) -> None:
        self.rejected.append(reason)
