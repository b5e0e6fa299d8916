"""Builds the Redis client from the settings: one server, a Cluster, or a master behind Sentinel.

The time budget
---------------
redis-py's asyncio client otherwise waits 5 s for each reply and retries with backoff, so a
black-holed Redis would cost a request many seconds. Here every connection attempt and every
command is bounded by the settings' timeouts, and only a dropped connection is retried, once and
at once: that covers a pooled connection that a restarted server closed, without multiplying the
wait when the server is unreachable. The cluster client gets the same timeouts and one retry,
which redis-py spends on re-reading the slot map (after a failover or a resharding).

Topologies
----------
- ``redis://``, ``rediss://`` (TLS, with ``REDIS_TLS_*``), ``unix://``; ``user:password@`` in the
  URL logs in as a Redis 6 ACL user (without a user name: the ``default`` user).
- ``REDIS_CLUSTER=true``: :class:`redis.asyncio.cluster.RedisCluster`, the URL naming any one node.
  ``auto`` (the default) starts with a plain client and lets the store ask the node on its first
  contact (``HELLO``, whose reply names the server's mode and which Redis grants every user); a
  node in cluster mode is then replaced by the cluster client that :func:`cluster_client_factory`
  builds. Detection waits for the first
  contact, so a service that starts while Redis is down still finds out when Redis comes back.
- ``REDIS_SENTINELS`` + ``REDIS_SENTINEL_MASTER``: the master's address comes from the Sentinels
  and is looked up again whenever a connection to it fails, so the client follows a failover; the
  store also asks about once a second (see ``sentinel.py``), so pooled connections leave a
  master that a switch-over demoted. Every Sentinel is asked at once, and while none answers the
  last master known is used as long as it says it is one (``sentinel_master.py``).
  ``REDIS_URL`` still gives the scheme, credentials and database; its host and port are not used.
  The Sentinels themselves are reached in plain TCP without a password.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from commons.cache.backends.redis.sentinel_master import MasterPool
from commons.cache.settings import CacheSettings

__all__ = [
    "RedisClient",
    "cluster_client_factory",
    "create_cluster_client",
    "create_redis_client",
    "reports_cluster_mode",
]

#: What the store talks to: one server (possibly found through Sentinel) or a cluster.
RedisClient: TypeAlias = Redis | RedisCluster


def _retry() -> Retry:
    return Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,))


_CONNECTION_PARAMETERS = inspect.signature(Connection).parameters


@cache
def _quiet_handshake(client_class: type) -> dict[str, Any]:
    """The options that keep ``client_class`` from announcing itself on connecting.

    - ``CLIENT SETINFO``: redis-py names itself that way to a server that reports 7.2 or later
      (Valkey does too) and ignores a refusal, which ``ACL LOG`` still records. Without it, the
      one documented ACL line holds on Redis 6.2, 7.0, 7.2+ and Valkey alike, and no new
      connection reads redis-py's version from the package metadata (milliseconds of event-loop
      time, multiplied by a burst of reconnects). Newer clients take ``driver_info=None``, older
      ones (and the cluster client until it caught up) ``lib_name=None``.
    - ``CLIENT MAINT_NOTIFICATIONS`` (redis-py 8+, on every RESP3 connection): for managed
      servers that announce their own maintenance; Redis 6.2 refuses it under the documented ACL
      line. The cache follows failovers and slot moves by itself (the breaker, redirects,
      Sentinel), so it asks for none.

    Each is asked of the class's own signature: redis-py's releases added them class by class.
    """
    parameters = inspect.signature(client_class).parameters
    options: dict[str, Any] = {}
    if "driver_info" in parameters:
        options["driver_info"] = None
    elif "lib_name" in parameters and "driver_info" not in _CONNECTION_PARAMETERS:
        options.update(lib_name=None, lib_version=None)
    # (redis-py 7.2's cluster client passes lib_name on to connections that deprecate it: it
    # keeps naming itself there, and a refusal is ignored.)
    if "maint_notifications_config" in parameters:
        from redis.maint_notifications import MaintNotificationsConfig

        options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    return options


def _timeouts(settings: CacheSettings) -> dict[str, Any]:
    return {
        "socket_connect_timeout": settings.REDIS_CONNECT_TIMEOUT_SECONDS,
        "socket_timeout": settings.REDIS_SOCKET_TIMEOUT_SECONDS,
        "health_check_interval": 0,
        "decode_responses": False,
    }


def _tls_options(settings: CacheSettings) -> dict[str, Any]:
    """redis-py's ``ssl_*`` options for a ``rediss://`` URL (nothing for other schemes)."""
    if settings.REDIS_URL is None or urlsplit(settings.REDIS_URL).scheme != "rediss":
        return {}
    return {
        "ssl_ca_certs": settings.REDIS_TLS_CA_FILE,
        "ssl_certfile": settings.REDIS_TLS_CERT_FILE,
        "ssl_keyfile": settings.REDIS_TLS_KEY_FILE,
        "ssl_check_hostname": settings.REDIS_TLS_CHECK_HOSTNAME,
        "ssl_cert_reqs": "required",
    }


def _url(settings: CacheSettings) -> str:
    if settings.REDIS_URL is None:
        raise ValueError("REDIS_URL is not set")
    return settings.REDIS_URL


def create_redis_client(settings: CacheSettings) -> RedisClient:
    """The client for the configured topology, with the configured timeouts and retry policy.

    ``REDIS_CLUSTER=true`` gives a cluster client; Sentinels give a client of the current master;
    otherwise a client of the one server in ``REDIS_URL`` (see :func:`cluster_client_factory` for
    the ``auto`` mode).

    Raises:
        ValueError: REDIS_URL is not set.
    """
    url = _url(settings)
    if settings.REDIS_CLUSTER == "true":
        return create_cluster_client(settings)
    if settings.REDIS_SENTINELS is not None:
        return _create_sentinel_master_client(settings)
    # At REDIS_MAX_CONNECTIONS a request does not wait for a connection: the pool refuses at
    # once, the layer takes that as a miss (not an outage) and the handler answers. A blocking
    # pool would bound waiting too, but costs every command a quarter of its client time.
    pool = ConnectionPool.from_url(
        url,
        max_connections=settings.REDIS_MAX_CONNECTIONS,
        retry=_retry(),
        retry_on_timeout=False,
        **_timeouts(settings),
        **_tls_options(settings),
        **_quiet_handshake(Redis),
    )
    return Redis.from_pool(pool)


def create_cluster_client(settings: CacheSettings) -> RedisCluster:
    """A Redis Cluster client started from the node in ``REDIS_URL``.

    Raises:
        ValueError: REDIS_URL is not set.
    """
    return RedisCluster.from_url(
        _url(settings),
        retry=_retry(),
        **_timeouts(settings),
        **_tls_options(settings),
        **_quiet_handshake(RedisCluster),
    )


def cluster_client_factory(settings: CacheSettings) -> Callable[[], RedisCluster] | None:
    """With ``REDIS_CLUSTER=auto`` on a TCP URL without Sentinels: builds the cluster client.

    The store calls it when the node it first reaches reports cluster mode; ``None`` when the
    settings already decide the topology.
    """
    if settings.REDIS_CLUSTER != "auto" or settings.REDIS_SENTINELS is not None:
        return None
    if urlsplit(_url(settings)).scheme == "unix":
        return None

    def build() -> RedisCluster:
        return create_cluster_client(settings)

    return build


async def reports_cluster_mode(client: Redis) -> bool:
    """Whether the server behind ``client`` runs with ``cluster-enabled yes``.

    Asked with ``HELLO`` (no arguments: the connection's protocol stays as it is), whose reply
    names the server's mode. Redis never refuses ``HELLO`` to a logged-in user, so a service user
    without ``INFO`` (an ``@dangerous`` command) is detected too. A server older than Redis 6 has
    no ``HELLO``: it is asked ``INFO cluster``.
    """
    try:
        reply = await client.execute_command("HELLO")  # type: ignore[no-untyped-call]  # redis-py: untyped
    except ResponseError:
        info = await client.info("cluster")
        return str(info.get("cluster_enabled", "0")) == "1"
    return _hello_field(reply, "mode") == "cluster"


def _hello_field(reply: object, name: str) -> str | None:
    """One field of a ``HELLO`` reply: a map (RESP3) or a flat list of pairs (RESP2)."""
    if isinstance(reply, dict):
        pairs = list(reply.items())
    elif isinstance(reply, list | tuple):
        pairs = list(zip(reply[::2], reply[1::2], strict=False))
    else:
        return None
    for key, value in pairs:
        text = key.decode() if isinstance(key, bytes) else str(key)
        if text == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


class SentinelMasterClient(Redis):
    """A client of the master that Sentinel names; closing it also closes the Sentinel links."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        pool = self.connection_pool
        try:
            await super().aclose(close_connection_pool)
        finally:
            if isinstance(pool, SentinelConnectionPool):
                for sentinel in pool.sentinel_manager.sentinels:
                    await sentinel.aclose()


def _create_sentinel_master_client(settings: CacheSettings) -> Redis:
    assert settings.REDIS_SENTINELS is not None
    assert settings.REDIS_SENTINEL_MASTER is not None
    parts = urlsplit(_url(settings))
    sentinels = []
    for address in settings.REDIS_SENTINELS.split(","):
        host, _, port = address.strip().rpartition(":")
        sentinels.append((host.strip("[]"), int(port)))
    options: dict[str, Any] = {
        **_timeouts(settings),
        **_tls_options(settings),
        "retry": _retry(),
        "retry_on_timeout": False,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "db": int(parts.path.strip("/") or 0),
        **_quiet_handshake(Redis),
    }
    if parts.scheme == "rediss":
        options["ssl"] = True
    sentinel = Sentinel(
        sentinels,
        sentinel_kwargs={
            "socket_connect_timeout": settings.REDIS_CONNECT_TIMEOUT_SECONDS,
            "socket_timeout": settings.REDIS_SOCKET_TIMEOUT_SECONDS,
            # Not redis-py's default for a client (three retries with back-off up to 10 s each,
            # from 6.0): a Sentinel that does not answer costs one timeout.
            "retry": _retry(),
            **_quiet_handshake(Redis),
        },
    )
    master: SentinelMasterClient = sentinel.master_for(
        settings.REDIS_SENTINEL_MASTER,
        redis_class=SentinelMasterClient,
        connection_pool_class=MasterPool,
        **options,
    )
    return master
