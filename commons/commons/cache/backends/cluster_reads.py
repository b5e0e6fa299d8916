"""Reads on a Redis Cluster: one pipelined reader per primary, routed by the client's slot map.

redis-py's cluster client spends most of a hit's time around each command: finding the slot's
node, checking a connection out of that node's pool and back in, arming a read, parsing. A hit on
a cluster is two commands (the entry, then its scope's generations, which live in the
namespace's slot), so it paid that twice: a cluster answered 0.27x the hits of one node from one
process. Here each primary gets a :class:`~commons.cache.backends.pipelined_reads.PipelinedReader`
of its own, opened with the node's connection settings, and a read goes to the primary that
redis-py's slot map names for its key.

Why a read cannot be answered by the wrong server: the readers never send ``READONLY``, so a
server that does not own a key's slot (a primary the slot moved away from, a primary demoted to
replica) answers ``MOVED`` or ``ASK`` instead of a value. Such a reply, a slot the map does not
cover, ``TRYAGAIN``, ``CLUSTERDOWN`` or a connection that cannot be opened sends that read down
redis-py's own path (:meth:`ClusterReads.read` returns ``None``), which follows the redirect,
refreshes the slot map and retries as it always has. A timeout is not retried there: it is an
outage, as on one server, and the caller's breaker counts it.

The order of the two reads is kept (the entry first, then the generations): an invalidation in
between shows as another generation, a miss.
"""

from __future__ import annotations

from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from commons.cache.backends.pipelined_reads import (
    PipelinedReader,
    connection_opener,
    encode_command,
)

__all__ = ["ClusterReads"]

#: Error replies that say the slot is served elsewhere or not at all right now.
_ROUTING_REPLIES = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")


class ClusterReads:
    """Pipelined reads on the primaries of ``client``'s cluster.

    Args:
        client: The cluster client whose slot map routes the reads.
        timeout: Seconds a read waits for its reply.
        max_pending: Reads that may wait on one primary at once.
    """

    def __init__(self, client: RedisCluster, *, timeout: float, max_pending: int) -> None:
        self._client = client
        self._timeout = timeout
        self._max_pending = max_pending
        #: Readers by node name (``host:port``); a node's reader lives as long as the store.
        self._readers: dict[str, PipelinedReader] = {}
        self._closed = False

    async def read(self, key: str, generation_keys: list[str]) -> list[bytes | None] | None:
        """The entry under ``key``, then the values of ``generation_keys``; ``None`` when the
        slot map cannot route them here (the caller then reads through redis-py).

        Raises:
            redis.exceptions.RedisError: A timeout, or an error reply that is not about routing.
        """
        entry_reader = self._reader_for(key)
        generations_reader = self._reader_for(generation_keys[0])
        if entry_reader is None or generations_reader is None:
            return None
        try:
            value = await entry_reader.get(key)
            generations = await generations_reader.mget_encoded(
                encode_command(b"MGET", generation_keys), len(generation_keys)
            )
        except redis_errors.TimeoutError:
            raise
        except redis_errors.ConnectionError:
            # A node that cannot be reached may have been replaced: redis-py finds out.
            return None
        except redis_errors.ResponseError as exc:
            if str(exc).startswith(_ROUTING_REPLIES):
                return None
            raise
        return [value, *generations]

    def _reader_for(self, key: str) -> PipelinedReader | None:
        """The reader of the primary the slot map names for ``key``, opened on first use."""
        client = self._client
        owners = client.nodes_manager.slots_cache.get(client.keyslot(key))
        if not owners or self._closed:
            return None
        node = owners[0]
        reader = self._readers.get(node.name)
        if reader is None:
            opener = connection_opener(node.connection_class, node.connection_kwargs)
            if opener is None:
                return None
            reader = self._readers[node.name] = PipelinedReader(
                opener, timeout=self._timeout, max_pending=self._max_pending
            )
        return reader

    async def aclose(self) -> None:
        """Closes every reader; later reads go through redis-py."""
        self._closed = True
        readers, self._readers = self._readers, {}
        for reader in readers.values():
            await reader.aclose()
