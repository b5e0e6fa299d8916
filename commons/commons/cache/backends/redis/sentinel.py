"""A master behind Sentinel: followed through a failover, and invalidations confirmed by a replica.

Reads and writes go through redis-py's client of the master Sentinel names (its pool looks the
master up again whenever a connection to it fails, ``sentinel_master.py``); no pipelined reader
and no near cache, whose connections would not follow a failover. About once a second the store
asks the Sentinels which server is the master, in the background, so that pooled connections
leave a master that a switch-over demoted; an invalidation asks first, and waits for a replica to
have its deletion wherever one could be promoted without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.asyncio import Redis

from commons.cache.backends.base import StoredRead
from commons.cache.backends.redis.expiry import ExpiryMemo
from commons.cache.backends.redis.sentinel_master import (
    MasterPool,
    SentinelView,
    on_a_master,
    replica_may_be_promoted,
)
from commons.cache.backends.redis.topology import (
    REPLICA_CONFIRM_TIMEOUT_MS,
    Fill,
    Topology,
    command_budget,
)
from commons.cache.backends.redis.translation import REDIS_FAILURES
from commons.cache.errors import BackendUnavailableError, BackendUnconfirmedError
from commons.cache.keyspace import Keyspace
from commons.cache.scope import CacheScope

__all__ = ["SENTINEL_MASTER_CHECK_SECONDS", "BehindSentinel", "sentinel_pool"]

logger = logging.getLogger("commons.cache")

#: Behind Sentinel, how often a process asks the Sentinels which server is the master, so that
#: reads and writes leave a demoted master's pooled connections within about this time.
SENTINEL_MASTER_CHECK_SECONDS = 1.0


def sentinel_pool(client: Redis) -> MasterPool | None:
    """The pool of Sentinel's master, when ``client`` talks to one."""
    pool = client.connection_pool
    if isinstance(pool, MasterPool) and pool.is_master:
        return pool
    return None


class BehindSentinel(Topology):
    """The master that Sentinel names, through redis-py's client of it."""

    def __init__(
        self, client: Redis, pool: MasterPool, names: Keyspace, expiries: ExpiryMemo
    ) -> None:
        super().__init__(client, names, expiries, command_budget(pool.connection_kwargs))
        self._pool = pool
        self._master_checked_at = 0.0
        self._master_check: asyncio.Task[None] | None = None

    async def read(self, key: str, scope: CacheScope) -> StoredRead:
        self._check_master()
        return await super().read(key, scope)

    async def write(self, fill: Fill) -> bool:
        self._check_master()
        return await super().write(fill)

    def _check_master(self) -> None:
        """Asks Sentinel for the master at most every :data:`SENTINEL_MASTER_CHECK_SECONDS`, in
        the background: reads and writes never wait for it. When Sentinel names another master,
        every connection to the old one is dropped (those in use once their command is
        answered); new ones go to the new master.
        Without this, pooled connections to a demoted master would go on serving its reads.
        """
        if self._master_check is not None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._master_checked_at < SENTINEL_MASTER_CHECK_SECONDS:
            return
        self._master_checked_at = loop.time()
        self._master_check = loop.create_task(self._recheck_master())

    async def _recheck_master(self) -> None:
        try:
            await _leave_other_servers(self._pool)
        finally:
            self._master_check = None

    async def follow_master(self) -> SentinelView | None:
        """Asks Sentinel for the master before an invalidation walks the indexes; returns the
        answer (``None``: no Sentinel answered).

        After a failover, pooled connections to the demoted master still answer reads (as a
        replica, possibly mid-resync); an invalidation that read the indexes there could miss
        entries the new master holds. Asking first drops every connection to an old master.
        """
        _, view = await self._pool.locate_master()
        return view

    async def unlink_confirmed(self, generation_key: str, view: SentinelView | None) -> None:
        """``UNLINK``s a generation, confirmed by a replica (``WAIT``) where one could be promoted.

        Redis replicates asynchronously: a master that crashes, or that Sentinel demotes while
        the replica it promotes no longer follows it, loses what it acknowledged last. So where
        Sentinel could promote a replica lacking it, the deletion is followed, on the same
        connection, by ``WAIT 1`` for up to :data:`REPLICA_CONFIRM_TIMEOUT_MS`; without that
        confirmation it fails as an outage would, and the layer keeps the invalidation, stops
        reading Redis and applies it again once Redis answers (on the promoted replica after a
        failover). Without a replica that could be promoted (see
        :func:`replica_may_be_promoted`, which reads ``view``, the Sentinels' answer of this
        invalidation): one ``UNLINK``, no wait. With no answer (every Sentinel away) the master
        that answers takes it if it says it is a master, confirmed by a replica.
        """
        # One connection for both commands: WAIT counts the replicas that have this connection's
        # last write.
        single = Redis(connection_pool=self._pool, single_connection_client=True)
        try:
            if view is None or not view.names_a_master:
                # The last master known, no Sentinel naming it now: only while it says so (or
                # the master it follows, if it is now a replica).
                await single.initialize()
                if single.connection is None or not await on_a_master(
                    single.connection, self._pool
                ):
                    raise BackendUnavailableError("no Sentinel names a master, nor does the server")
            await single.unlink(generation_key)
            connection = single.connection
            server = (connection.host, connection.port) if connection is not None else None
            if not replica_may_be_promoted(view, server):
                return
            confirmed = int(
                await single.execute_command("WAIT", 1, REPLICA_CONFIRM_TIMEOUT_MS)  # type: ignore[no-untyped-call]  # redis-py: untyped
            )
        finally:
            await single.aclose()
        if confirmed < 1:
            raise BackendUnconfirmedError(
                f"no replica confirmed the invalidation within {REPLICA_CONFIRM_TIMEOUT_MS} ms"
            )

    async def aclose(self) -> None:
        check, self._master_check = self._master_check, None
        if check is not None:
            check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await check
        await super().aclose()


async def _leave_other_servers(pool: MasterPool) -> None:
    """Drops every pooled connection to another server than the master Sentinel names.

    Not only when this check is the first to learn of a switch: a connection that redis-py
    made meanwhile has already told the pool, which then drops its idle connections only,
    and those that were busy then went back to the pool still talking to the old master.
    """
    try:
        view = await pool.ask()
    except REDIS_FAILURES as exc:
        logger.debug("Sentinel not asked for the master: %s", exc)
        return
    if view is None or not view.names_a_master:
        # No Sentinel names a master: the connections stay where they are.
        return
    found = view.address
    in_use = list(getattr(pool, "_in_use_connections", ()))
    idle = list(getattr(pool, "_available_connections", ()))
    if any(_connected_elsewhere(connection, found) for connection in [*in_use, *idle]):
        # Idle connections now; those in use once their command is answered (redis-py
        # disconnects a connection marked so when it is released).
        for connection in in_use:
            if _connected_elsewhere(connection, found):
                connection.mark_for_reconnect()
        with contextlib.suppress(*REDIS_FAILURES):
            await pool.disconnect(inuse_connections=False)


def _connected_elsewhere(connection: Any, master: tuple[str, int]) -> bool:
    """Whether a pooled connection is open to another server than ``master``."""
    return bool(connection.is_connected) and (connection.host, connection.port) != master
