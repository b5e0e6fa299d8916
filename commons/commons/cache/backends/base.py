"""The store contract every backend implements, and the capabilities some stores add to it.

A store only ever sees keys and bytes. It knows nothing of FastAPI, of the decorator or of how keys
are built; the scope passed with each read and write is all it needs to find the entries an
invalidation targets. Stores raise :class:`~commons.cache.errors.BackendError` subclasses and
nothing else.

The contract (:class:`CacheStore`) is what every store does: read, write with a time to live,
delete, invalidate a scope, clear, ping, close. What only some stores do is a separate, named
capability, so that code needing it says so in its types:

- :class:`LocalStore`: the entries live in this process; a read answers synchronously (the
  layer's in-memory tier serves hits without a coroutine) and the store knows its size.
- :class:`ReplicaLocks`: short locks that replicas sharing the store can take (the decorator's
  ``distributed_lock``).
- :class:`OperatorCommands`: what ``commons-cache`` (``cli.py``) asks of a shared store: counts,
  sizes, the server's state, a flush with progress.

Generations
-----------
A store shared by several processes (Redis) cannot remove, at the instant of an invalidation, an
entry that another process is about to write, nor promise that its helper keys survive eviction.
Such a store keeps a random *generation* per scope and reports it with every read
(:attr:`StoredRead.generation`); the layer writes the generation of the fill's read into the entry
and serves an entry only while the two are equal. An invalidation replaces the scope's generation;
a generation that is lost (evicted, deleted, flushed) is replaced by a new random one. Either way
the old entries can only be misses. A store that invalidates exactly (memory, one process) has no
generations: ``uses_generations`` is false and it reports ``None``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from commons.cache.scope import CacheScope, InvalidationTarget

__all__ = ["CacheStore", "LocalStore", "OperatorCommands", "ReplicaLocks", "StoredRead"]


class StoredRead(NamedTuple):
    """One read: the value, its remaining whole seconds, and the scope's generation now."""

    remaining: int
    value: bytes | None
    #: The scope's generation at the read; ``None`` when the store has none, or lost one (a
    #: store that uses generations then serves nothing until :meth:`CacheStore.generation`).
    generation: bytes | None = None
    #: Answered from this process's memory (the near cache) with no command sent: not a Redis
    #: operation, so not timed as one.
    from_memory: bool = False
    #: Read from Redis and kept, this very ``value``, by the near cache: answered from memory
    #: from now on, while its checks hold.
    kept: bool = False


class CacheStore(ABC):
    """A key-value store of bytes with expiry, indexed by scope for invalidation."""

    #: Short name, reported by ``cache_status()``.
    name: str
    #: Whether reads report scope generations (see the module docstring).
    uses_generations: bool = False

    @abstractmethod
    async def read(self, key: str, scope: CacheScope) -> StoredRead:
        """The value under ``key``, its remaining time, and the generation of ``scope``."""

    def held(self, key: str, scope: CacheScope, expected: bytes) -> StoredRead | None:
        """The read of ``key`` answered from this process's memory alone (the near cache), only
        if it would hold ``expected``, that very bytes object: what :meth:`read` would return
        now, with no command sent. ``None`` whenever that is not known at once (the default)."""
        return None

    def near_cache_held(self) -> tuple[int, int]:
        """What this process's near cache(s) hold: entries, and the bytes they are counted as
        against ``CACHE_NEAR_CACHE_MAX_BYTES``; ``(0, 0)`` for a store without one."""
        return 0, 0

    @abstractmethod
    async def write(
        self,
        key: str,
        value: bytes,
        ttl_seconds: float,
        scope: CacheScope,
        generation: bytes | None = None,
    ) -> bool:
        """Stores ``value`` under ``key`` for ``ttl_seconds``, indexed under ``scope``.

        With ``generation``, only while ``scope``'s generation is still that one; returns
        whether the value was stored.
        """

    async def generation(self, scope: CacheScope) -> bytes:
        """The generation of ``scope``, created (random) where it is missing."""
        return b""

    @abstractmethod
    async def delete(self, key: str, scope: CacheScope | None = None) -> int:
        """Removes one key (and, with generations, retires ``scope``'s generation so that no
        concurrent fill brings it back); returns how many keys were removed (0 or 1)."""

    @abstractmethod
    async def invalidate(self, target: InvalidationTarget) -> int:
        """Removes every entry under ``target``; returns how many entries were removed."""

    async def invalidate_effective(
        self, target: InvalidationTarget
    ) -> tuple[int, Callable[[], Awaitable[int]] | None]:
        """Makes the invalidation of ``target`` hold, and returns how many entries were removed
        so far and what is left to do afterwards: the removal of entries that can no longer be
        served, which only frees memory (``None``: nothing left). By default, all of
        :meth:`invalidate` at once."""
        return await self.invalidate(target), None

    @abstractmethod
    async def clear(self) -> int:
        """Removes every key of this store's prefix; returns how many were removed."""

    @abstractmethod
    async def ping(self) -> None:
        """Returns when the store answers; raises BackendError otherwise."""

    @abstractmethod
    async def aclose(self) -> None:
        """Releases connections. Safe to call more than once."""

    # -- conveniences over the contract (operators, tests, benchmarks) -----------------------------

    async def get_with_ttl(self, key: str) -> tuple[int, bytes | None]:
        """The value under ``key`` and its remaining whole seconds, whatever its generation."""
        read = await self.read(key, CacheScope(""))
        return read.remaining, read.value

    async def set(self, key: str, value: bytes, ttl_seconds: float, scope: CacheScope) -> None:
        """Stores ``value`` unconditionally."""
        await self.write(key, value, ttl_seconds, scope)


class LocalStore(CacheStore):
    """A store whose entries live in this process: it reads without I/O and knows its size.

    The layer's in-memory tier is one: a hit on it costs no coroutine, which is most of what a
    hit costs in memory.
    """

    @abstractmethod
    def read_now(self, key: str) -> StoredRead:
        """What :meth:`read` returns, synchronously (a local store has no generations)."""

    @abstractmethod
    def __len__(self) -> int:
        """How many entries the store holds."""


class ReplicaLocks(ABC):
    """Short locks in a store that several processes share (single-flight across replicas)."""

    @abstractmethod
    async def add_if_absent(self, key: str, value: bytes, ttl_ms: int) -> bool:
        """Stores ``value`` only when ``key`` is absent (a lock); True when it was stored."""

    @abstractmethod
    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        """Removes ``key`` only while it still holds ``value`` (releasing one's own lock)."""


class OperatorCommands(ABC):
    """What an operator asks of a shared store from a shell: check it, count it, flush it.

    Every command touches the keys of the store's prefix only; failures raise BackendError.
    """

    @property
    @abstractmethod
    def is_cluster(self) -> bool:
        """Whether the store is a cluster (known after the first :meth:`ping`)."""

    @abstractmethod
    async def ping(self) -> None:
        """Returns when the store answers (and finds out whether it is a cluster)."""

    @abstractmethod
    async def node_infos(self) -> dict[str, dict[str, Any]]:
        """Each server's description of itself, by its address (one on a single server)."""

    @abstractmethod
    async def accepts_writes(self) -> bool:
        """Whether the store stores a (throw-away) key; False when it refuses."""

    @abstractmethod
    async def namespaces(self) -> list[str]:
        """The namespaces that hold entries (or did, until their last entry expired)."""

    @abstractmethod
    async def count_entries(self, namespace: str) -> dict[str | None, int]:
        """Unexpired entries of ``namespace`` per tenant (``None``: no tenant)."""

    @abstractmethod
    async def entry_sizes(self, namespace: str, samples: int) -> list[int]:
        """The sizes in bytes of up to ``samples`` entries of ``namespace``."""

    @abstractmethod
    async def invalidate(self, target: InvalidationTarget) -> int:
        """:meth:`CacheStore.invalidate`: removes the target's entries; how many."""

    @abstractmethod
    async def count_keys(self, on_batch: Callable[[int], object] | None = None) -> int:
        """How many keys the prefix holds, entries and helpers alike: what :meth:`flush`
        removes; ``on_batch(n)`` as they are counted."""

    @abstractmethod
    async def flush(self, on_batch: Callable[[int], object] | None = None) -> int:
        """Removes every key of the prefix; ``on_batch(n)`` after each batch; how many."""

    @abstractmethod
    async def aclose(self) -> None:
        """Releases connections."""
