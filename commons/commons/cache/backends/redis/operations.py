"""The operator commands of a Redis store: what ``commons-cache`` (``cli.py``) asks of Redis.

None of it is on a request's path. Counting reads the invalidation indexes (``ZCOUNT`` per leaf),
never the entries; namespaces and key counts come from ``SCAN``, never ``KEYS`` (which blocks the
server); a flush removes the prefix with ``UNLINK`` in batches. Every command stays inside the
store's prefix, and redis-py's errors become :class:`~commons.cache.errors.BackendError` at the
store's one seam.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster

from commons.cache.backends.base import OperatorCommands
from commons.cache.backends.redis.index import BATCH_SIZE
from commons.cache.backends.redis.store import RedisStore
from commons.cache.backends.redis.translation import errors_translated
from commons.cache.errors import BackendRejectedError
from commons.cache.keyspace import check_key
from commons.cache.scope import InvalidationTarget

__all__ = ["RedisOperations"]

#: How long the write probe of :meth:`RedisOperations.accepts_writes` lives if it is not removed.
_CHECK_KEY_TTL_MS = 10_000


class RedisOperations(OperatorCommands):
    """:class:`OperatorCommands` on a :class:`RedisStore` (one server, Sentinel or a cluster)."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store

    @property
    def is_cluster(self) -> bool:
        return self._store.is_cluster

    async def ping(self) -> None:
        await self._store.ping()

    async def node_infos(self) -> dict[str, dict[str, Any]]:
        """Each server's ``INFO`` by address (every node of a cluster)."""
        client = self._store.client
        async with errors_translated():
            if isinstance(client, RedisCluster):
                info = await client.info(target_nodes=RedisCluster.ALL_NODES)
            else:
                info = await client.info()
        return _by_node(info)

    async def accepts_writes(self) -> bool:
        """Takes and releases a lock under a throw-away key of the prefix."""
        key, token = check_key(self._store.keyspace.prefix, secrets.token_hex(8)), b"check"
        try:
            written = await self._store.add_if_absent(key, token, _CHECK_KEY_TTL_MS)
            await self._store.delete_if_equal(key, token)
        except BackendRejectedError:
            return False
        return written

    async def namespaces(self) -> list[str]:
        """The namespaces that have a registry under the prefix (one SCAN, matching registries)."""
        names = self._store.keyspace
        found: set[str] = set()
        async with errors_translated():
            async for key in self._store.client.scan_iter(
                match=names.registries_glob(), count=1000
            ):
                namespace = names.namespace_of_registry(key.decode())
                if namespace is not None:  # a namespace's registry, not one of its tenants'
                    found.add(namespace)
        return sorted(found)

    async def count_entries(self, namespace: str) -> dict[str | None, int]:
        """Unexpired indexed entries of ``namespace`` per tenant (``None``: no tenant).

        Reads the registries and counts each leaf with ``ZCOUNT`` from the server's time on, so the
        cost grows with the number of leaves, not of keys. An entry that Redis evicted stays in its
        leaf until it would have expired, and is counted until then.
        """
        client, names = self._store.client, self._store.keyspace
        counts: dict[str | None, int] = {}
        async with errors_translated():
            seconds, micros = await client.time()
            now_ms = seconds * 1000 + micros // 1000
            async for leaf, _ in client.zscan_iter(
                names.namespace_registry(namespace), count=BATCH_SIZE
            ):
                name = leaf.decode()
                tenant = names.tenant_of_leaf(namespace, name)
                leaves = [name]
                if tenant is not None:
                    registry = names.tenant_registry(namespace, tenant)
                    async for user_leaf, _ in client.zscan_iter(registry, count=BATCH_SIZE):
                        leaves.append(user_leaf.decode())
                pipe = client.pipeline(transaction=False)
                for each in leaves:
                    pipe.zcount(each, f"({now_ms}", "+inf")
                live = sum(int(count) for count in await pipe.execute())
                counts[tenant] = counts.get(tenant, 0) + live
        return counts

    async def entry_sizes(self, namespace: str, samples: int) -> list[int]:
        """``MEMORY USAGE`` in bytes of up to ``samples`` entries of ``namespace``."""
        client, names = self._store.client, self._store.keyspace
        keys: list[bytes] = []

        async def sample(leaf: bytes) -> None:
            members = await client.zrange(leaf, 0, samples - len(keys) - 1)
            keys.extend(cast(list[bytes], members))

        async with errors_translated():
            registry = names.namespace_registry(namespace)
            for leaf in cast(list[bytes], await client.zrange(registry, 0, BATCH_SIZE)):
                if len(keys) >= samples:
                    break
                await sample(leaf)
                # A tenant's users' entries are in leaves of its own registry (a per-user
                # namespace has them only).
                users = names.registry_of_leaf(leaf.decode())
                for user_leaf in cast(list[bytes], await client.zrange(users, 0, BATCH_SIZE)):
                    if len(keys) >= samples:
                        break
                    await sample(user_leaf)
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.memory_usage(key)
            sizes = await pipe.execute() if keys else []
        return [int(size) for size in sizes if size is not None]

    async def invalidate(self, target: InvalidationTarget) -> int:
        return await self._store.invalidate(target)

    async def count_keys(self, on_batch: Callable[[int], object] | None = None) -> int:
        counted = 0
        async with errors_translated():
            async for batch in self._store.keys_of_prefix():
                counted += len(batch)
                if on_batch is not None:
                    on_batch(len(batch))
        return counted

    async def flush(self, on_batch: Callable[[int], object] | None = None) -> int:
        return await self._store.clear(on_batch)

    async def aclose(self) -> None:
        await self._store.aclose()


def _by_node(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``INFO`` as a cluster client answers it, per node; one server's under ``"server"``."""
    if "redis_version" not in info and info and isinstance(next(iter(info.values())), dict):
        return {str(node): node_info for node, node_info in info.items()}
    return {"server": info}
