"""Behind Sentinel: the master, asked of every Sentinel at once, and kept while none answers.

redis-py asks its Sentinels one after the other, each within the timeouts, whenever a connection
to the master is made and whenever the store asks who the master is: with every Sentinel
black-holed, one timeout per Sentinel, and then no master at all, although the master itself
answers. Sentinel is how a failover is learned, not the way to the data, so here:

- :class:`MasterPool` asks every Sentinel at once (``SENTINEL MASTER`` and ``SENTINEL REPLICAS``
  pipelined on each) and takes the first valid answer: one timeout at most, however many
  Sentinels are away. When none answers it keeps the master it knew, and a connection made to
  that address is used only if the server says it is a master (``HELLO``'s ``role``, which Redis
  grants every user, as ``ROLE`` would say). A server that says it is a replica names the master
  it follows (``ROLE``): after a failover the Sentinels were not there to announce, the demoted
  master leads to the promoted one, which is used if it says it is a master. Otherwise the
  connection fails as an outage does. While no Sentinel answers, they are asked again only after
  :data:`SILENT_SENTINELS_RETRY_SECONDS`, so a burst of new connections and an invalidation's own
  connection cost one timeout between them, not one each.
- :func:`replica_may_be_promoted` reads the same answer to decide whether an invalidation must be
  confirmed by a replica (``WAIT``, see ``sentinel.py``). Without an answer nothing says no
  replica could be promoted, so it must: a master cut off from its replica and from the Sentinels
  that replaced it cannot confirm, and the invalidation is kept, as before.

What this does not change: a master that does not answer is an outage, found again through the
Sentinels once one answers; a demoted master refuses writes (``READONLY``) and says it is a
replica, so nothing is written there unconfirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    SentinelConnectionPool,
    SentinelManagedConnection,
)

__all__ = [
    "SILENT_SENTINELS_RETRY_SECONDS",
    "MasterPool",
    "SentinelView",
    "master_followed",
    "on_a_master",
    "replica_may_be_promoted",
    "reports_master_role",
    "sentinel_flags",
]

#: While no Sentinel answers, how long the last master known is used without asking them again.
SILENT_SENTINELS_RETRY_SECONDS = 0.5

_FAILURES = (redis_errors.RedisError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class SentinelView:
    """What one Sentinel says of the master and its replicas (its parsed replies)."""

    master: dict[str, Any]
    replicas: list[dict[str, Any]] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        return (str(self.master.get("ip")), int(self.master.get("port", 0)))

    @property
    def names_a_master(self) -> bool:
        """As redis-py's ``check_master_state``: a master that no Sentinel counts as down."""
        master = self.master
        return bool(master.get("is_master")) and not (
            master.get("is_sdown") or master.get("is_odown")
        )


def sentinel_flags(state: dict[str, Any]) -> set[str]:
    """The flags of a Sentinel state reply (a text in RESP2, a set in RESP3)."""
    flags = state.get("flags", "")
    return set(flags.split(",")) if isinstance(flags, str) else set(flags)


async def _ask(sentinel: Redis, service_name: str) -> SentinelView:
    pipe = sentinel.pipeline(transaction=False)
    pipe.sentinel_master(service_name)
    pipe.sentinel_slaves(service_name)
    master, replicas = await pipe.execute()
    return SentinelView(master, list(replicas))


async def ask_sentinels(sentinels: list[Redis], service_name: str) -> SentinelView | None:
    """What the Sentinels say, all asked at once: the first answer that names a valid master,
    else the first answer (a master counted down, a failover under way), else ``None`` when no
    Sentinel answers. Each is bounded by its own timeouts, so all of them by one timeout."""
    asked = [asyncio.ensure_future(_ask(sentinel, service_name)) for sentinel in sentinels]
    first: SentinelView | None = None
    try:
        for next_answer in asyncio.as_completed(asked):
            with contextlib.suppress(*_FAILURES):
                view = await next_answer
                if view.names_a_master:
                    return view
                first = first or view
        return first
    finally:
        for task in asked:
            task.cancel()
        # Their connections close as they are cancelled; none is left unawaited.
        await asyncio.gather(*asked, return_exceptions=True)


async def reports_master_role(connection: Any) -> bool:
    """Whether the server behind ``connection`` (connected) says it is a master: ``HELLO``
    without arguments (the protocol stays as it is) names its role."""
    await connection.send_command("HELLO")
    reply = await connection.read_response()
    if isinstance(reply, dict):
        pairs = list(reply.items())
    else:
        pairs = list(zip(reply[::2], reply[1::2], strict=False))
    for key, value in pairs:
        if (key.decode() if isinstance(key, bytes) else str(key)) == "role":
            return (value.decode() if isinstance(value, bytes) else str(value)) == "master"
    return False


async def master_followed(connection: Any) -> tuple[str, int] | None:
    """The master that the replica behind ``connection`` (connected) follows, from ``ROLE``;
    ``None`` when the server is no replica or the command is refused (an ACL without it)."""
    try:
        await connection.send_command("ROLE")
        reply = await connection.read_response()
    except redis_errors.ResponseError:
        return None
    if not isinstance(reply, list) or len(reply) < 3:
        return None
    role = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    if role not in ("slave", "replica"):
        return None
    host = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
    return host, int(reply[2])


class MasterPool(SentinelConnectionPool):
    """redis-py's pool of Sentinel's master, which asks every Sentinel at once and keeps the
    last master it knew while none answers (its connections then check the server's role)."""

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        ssl = bool(kwargs.get("ssl", False))
        kwargs["connection_class"] = MasterSSLConnection if ssl else MasterConnection
        kwargs.pop("ssl", None)
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]  # redis-py: untyped
        self._silent_since: float | None = None

    async def ask(self) -> SentinelView | None:
        """Asks every Sentinel at once; follows the master it names (idle connections to
        another one are dropped, as redis-py does)."""
        view = await ask_sentinels(self.sentinel_manager.sentinels, self.service_name)
        self._silent_since = asyncio.get_running_loop().time() if view is None else None
        if view is not None and view.names_a_master:
            await self.move_to(view.address)
        return view

    async def move_to(self, address: tuple[str, int]) -> None:
        """Takes ``address`` as the master; idle connections to another one are dropped."""
        if self.master_address != address:
            self.master_address = address
            await self.disconnect(inuse_connections=False)

    def _sentinels_recently_silent(self) -> bool:
        if self._silent_since is None:
            return False
        elapsed = asyncio.get_running_loop().time() - self._silent_since
        return elapsed < SILENT_SENTINELS_RETRY_SECONDS

    async def locate_master(self) -> tuple[tuple[str, int], SentinelView | None]:
        """The master's address and the Sentinels' answer. The address is the one a Sentinel
        named just now if the answer names a master that is not down; else (no Sentinel answers,
        or none names such a master) the last one known, to be used only while the server says
        it is a master.

        Raises:
            MasterNotFoundError: No Sentinel names a master and none was ever known.
        """
        known: tuple[str, int] | None = self.master_address
        if known is not None and self._sentinels_recently_silent():
            return known, None
        view = await self.ask()
        if view is not None and view.names_a_master:
            return view.address, view
        if self.master_address is None:
            raise MasterNotFoundError(f"No Sentinel names a master for {self.service_name!r}")
        return self.master_address, view

    async def get_master_address(self) -> tuple[str, int]:
        address, _ = await self.locate_master()
        return address


class MasterConnection(SentinelManagedConnection):
    """A connection of :class:`MasterPool`: to an address no Sentinel confirmed, only while the
    server says it is a master."""

    async def _connect_retry(self) -> None:
        if self._reader:
            return
        pool: MasterPool = self.connection_pool
        address, view = await pool.locate_master()
        await self.connect_to(address)  # type: ignore[no-untyped-call]  # redis-py: untyped
        if view is not None and view.names_a_master:
            return
        if not await on_a_master(self, pool):
            raise redis_errors.ConnectionError(
                f"no Sentinel answered and {address[0]}:{address[1]} is no longer a master"
            )


async def on_a_master(connection: Any, pool: MasterPool) -> bool:
    """Whether ``connection`` (connected, to an address no Sentinel confirmed just now) ends on a
    server that says it is a master: its own server, or the master that server follows as a
    replica (which the pool then takes as the master). Disconnected when it does not."""
    if await reports_master_role(connection):
        return True
    followed = await master_followed(connection)
    await connection.disconnect()
    if followed is None:
        return False
    await connection.connect_to(followed)
    if await reports_master_role(connection):
        await pool.move_to(followed)
        return True
    await connection.disconnect()
    return False


class MasterSSLConnection(MasterConnection, SSLConnection):
    pass


def replica_may_be_promoted(view: SentinelView | None, server: tuple[str, int] | None) -> bool:
    """Whether what ``server`` acknowledged may be missing from a master Sentinel promotes.

    True on a server that Sentinel does not name as the master (a demoted one, or the old master
    while a failover is under way: the replica being promoted no longer follows it), and on the
    master while it has a replica that Sentinel does not count as down, including one that still
    reports itself a master: right after a switch-over the old master takes none of the new
    master's writes until Sentinel converts it, seconds later, and a ``SENTINEL FAILOVER`` may
    promote it again meanwhile (what was acknowledged then is kept and applied again once a
    replica confirms it). False on the master when its replicas are down, and on the replica
    being promoted: none that Sentinel could promote would hold the old generation. True when no
    Sentinel answered: nothing says otherwise.
    """
    if view is None:
        return True
    master, replicas = view.master, view.replicas
    if "failover_in_progress" in sentinel_flags(master):
        promoted = [
            (replica.get("ip"), replica.get("port"))
            for replica in replicas
            if "promoted" in sentinel_flags(replica)
        ]
        return server not in promoted
    if server != (master.get("ip"), master.get("port")):
        return True
    # A replica whose link is down, or that Sentinel has not asked yet, may still be promoted.
    return any(
        not sentinel_flags(replica) & {"s_down", "o_down", "disconnected"} for replica in replicas
    )
