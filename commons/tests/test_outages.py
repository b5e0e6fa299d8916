"""Outages of a Redis Cluster and of a Sentinel set-up keep the promises a single server keeps.

A single server's outages are specified in ``test_faults.py``; here the same promises hold when
every node of a Redis Cluster (3 primaries, 3 replicas) or the master and replica behind a Sentinel
is black-holed (SIGSTOP) or killed:

- every cached GET is answered by its handler (200, its body), within a bound;
- after ``CACHE_FAILURE_THRESHOLD`` failures the breaker opens (state ``degraded``) and requests no
  longer wait on Redis;
- an invalidation made during the outage does not raise, is kept, and is applied before Redis is
  read again: the value it invalidated is never a hit afterwards;
- the cache returns to Redis once it answers.

And at start-up: ``init_cache()`` with ``REDIS_CLUSTER=true`` and nothing listening starts degraded
(or refuses with ``CacheUnavailableError`` under ``CACHE_FAIL_FAST=true``), and ``commons-cache
check`` says so in one line.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from commons.cache import (
    CacheSettings,
    CacheUnavailableError,
    cache,
    cache_status,
    init_cache,
    invalidate_namespace,
)
from commons.cache.backends.redis.near import HEARTBEAT_SECONDS, SILENCE_LIMIT_SECONDS
from commons.testing.redis_cluster import LocalRedisCluster, info_field
from commons.testing.redis_sentinel import LocalSentinel
from commons.testing.redis_server import (
    RedisServer,
    find_redis_server,
    free_port,
    redis_server_version,
)
from commons.utilities.context import get_tenant_id

pytestmark = pytest.mark.slow

TIMEOUT = 0.2
FAST_FAILING = {
    "REDIS_SOCKET_TIMEOUT_SECONDS": TIMEOUT,
    "REDIS_CONNECT_TIMEOUT_SECONDS": TIMEOUT,
    "CACHE_RECOVERY_INTERVAL_SECONDS": 0.2,
}
#: Longest a request may take before the breaker opens. On a cluster a command that timed out
#: makes the client re-read the slot map from the nodes it knows (6 here), each within a timeout.
REQUEST_BOUND = (1 + 6) * TIMEOUT + 0.5
#: Requests served while the breaker is open never touch Redis.
OPEN_BREAKER_BOUND = 0.75 * TIMEOUT
#: How long the way back may take once every node answers again (a cluster settles first).
RECOVERY_BOUND = 20.0


# -- the service under test ---------------------------------------------------------------------


@dataclass
class Service:
    """An app with one tenant-scoped cached route whose body shows the tenant's version."""

    client: httpx.AsyncClient = field(init=False)
    versions: defaultdict[str, int] = field(default_factory=lambda: defaultdict(lambda: 1))

    def expected(self, tenant: str) -> dict[str, Any]:
        return {"tenant": tenant, "version": self.versions[tenant]}

    async def get(self, tenant: str = "acme", *, bound: float = REQUEST_BOUND) -> httpx.Response:
        """GETs the tenant's config; checks it is the handler's answer, given within ``bound``."""
        started = time.perf_counter()
        response = await self.client.get("/config", headers={"X-Test-Tenant": tenant})
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, response.text
        assert response.json() == self.expected(tenant)
        assert elapsed <= bound, f"GET took {elapsed:.3f}s, allowed {bound}s"
        return response


@pytest.fixture
def start_service(
    make_identity_app: Callable[[], FastAPI],
    make_settings: Callable[..., CacheSettings],
    app_clients: Callable[[FastAPI], httpx.AsyncClient],
) -> Callable[..., Any]:
    """``await start_service(redis_url, **settings)``: init_cache, the app and its client (closed
    after the test)."""

    async def start(redis_url: str, **overrides: object) -> Service:
        await init_cache(make_settings(redis_url, **{**FAST_FAILING, **overrides}))
        service = Service()
        app = make_identity_app()

        @app.get("/config")
        @cache(expire=60, namespace="config")
        async def config() -> dict[str, Any]:
            tenant = get_tenant_id()
            assert tenant is not None
            return service.expected(tenant)

        service.client = app_clients(app)
        return service

    return start


async def wait_for_backend(backend: str, within: float = RECOVERY_BOUND) -> None:
    deadline = time.monotonic() + within
    while cache_status().backend != backend:
        assert time.monotonic() < deadline, f"not {backend} in time: {cache_status()}"
        await asyncio.sleep(0.02)


# -- outages --------------------------------------------------------------------------------------


@dataclass
class Outage:
    """Every server of a topology black-holed (SIGSTOP) or killed, and brought back."""

    servers: Sequence[RedisServer]
    fault: str

    def begin(self) -> None:
        for server in self.servers:
            if self.fault == "black-holed":
                server.pause()
            else:
                server.kill()

    def end(self) -> None:
        for server in self.servers:
            if self.fault == "black-holed":
                server.resume()
            else:
                server.start()  # same port, no data


async def assert_the_outage_promises(service: Service, outage: Outage) -> None:
    await service.get("acme")
    assert (await service.get("acme")).headers["X-FastAPI-Cache"] == "HIT"
    assert cache_status().backend == "redis"

    outage.begin()
    try:
        # On one server and on a cluster the near cache answers what it holds until it gives up
        # a silent link (a killed server closes it at once).
        await asyncio.sleep(SILENCE_LIMIT_SECONDS + HEARTBEAT_SECONDS + 0.2)
        # Each request is the handler's answer, in bounded time, until the breaker opens.
        for _ in range(3):  # CACHE_FAILURE_THRESHOLD
            await service.get("acme")
        assert cache_status().backend == "degraded", cache_status()
        for _ in range(5):
            await service.get("acme", bound=OPEN_BREAKER_BOUND)

        # An update during the outage: its invalidation is kept, not raised.
        service.versions["acme"] = 2
        await invalidate_namespace("config", tenant_id="acme")
        assert cache_status().pending_invalidations == 1
        await service.get("acme", bound=OPEN_BREAKER_BOUND)
    finally:
        outage.end()

    await wait_for_backend("redis")
    assert cache_status().pending_invalidations == 0
    # Redis still holds version 1 after a black hole; it was invalidated before any read.
    after = await service.get("acme")
    assert after.headers["X-FastAPI-Cache"] == "MISS"
    assert after.json()["version"] == 2
    assert (await service.get("acme")).headers["X-FastAPI-Cache"] == "HIT"


# -- Redis Cluster --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[LocalRedisCluster]:
    """A cluster of this module's own: its tests stop, kill and restart every node."""
    if redis_server_version(find_redis_server()) < (7,):
        pytest.skip("the cluster fixture needs redis-server 7+")
    with LocalRedisCluster(primaries=3, replicas_per_primary=1) as cluster:
        yield cluster


@pytest.fixture
def cluster(own_cluster: LocalRedisCluster) -> Iterator[LocalRedisCluster]:
    """The module's cluster, healthy and empty; every node running again after the test."""
    own_cluster.wait_until_healthy()
    for node in own_cluster.current_primaries():
        node.command("FLUSHALL")
    try:
        yield own_cluster
    finally:
        for node in own_cluster.nodes:
            if node.process is not None and node.process.poll() is None:
                node.resume()
            else:
                node.start()
        own_cluster.wait_until_healthy()


def dbsize(node: RedisServer) -> int:
    return int(node.command("DBSIZE").strip(b":\r\n"))


@pytest.mark.parametrize("fault", ["black-holed", "killed"])
async def test_a_whole_cluster_down_keeps_every_outage_promise(
    start_service: Callable[..., Any], cluster: LocalRedisCluster, fault: str
) -> None:
    service = await start_service(cluster.url)

    await assert_the_outage_promises(service, Outage(cluster.nodes, fault))


async def test_a_cluster_that_lost_a_shard_answers_clusterdown_and_that_is_an_outage(
    start_service: Callable[..., Any], cluster: LocalRedisCluster
) -> None:
    service = await start_service(cluster.url)
    await service.get("acme")
    # A shard that holds none of the route's keys (its entry, its namespace's helper keys): the
    # others answer, but only with CLUSTERDOWN once the cluster has noticed the loss.
    primary = next(node for node in cluster.current_primaries() if dbsize(node) == 0)
    replica = cluster.replica_of(primary)

    replica.kill()
    primary.kill()
    # The other nodes mark the shard failed, then answer CLUSTERDOWN for every slot.
    deadline = time.monotonic() + 20
    alive = [node for node in cluster.nodes if node not in (primary, replica)]
    while any(info_field(node, "cluster", "cluster_state") != "fail" for node in alive):
        assert time.monotonic() < deadline, "the cluster never noticed the lost shard"
        await asyncio.sleep(0.05)

    # Redis did not refuse a command: it cannot serve it. The breaker opens.
    for _ in range(3):
        await service.get("acme")
    assert cache_status().backend == "degraded", cache_status()
    # redis-py answers a CLUSTERDOWN by reading the slot map again, which may meet the dead
    # nodes first: either way an outage, never "Redis refuses reads".
    reason = cache_status().reason
    assert "CLUSTERDOWN" in reason or "connecting to" in reason, reason
    await service.get("acme", bound=OPEN_BREAKER_BOUND)

    primary.start()
    replica.start()
    await asyncio.to_thread(cluster.wait_until_healthy)
    await wait_for_backend("redis")


async def test_init_cache_on_a_cluster_url_with_nothing_listening_starts_degraded(
    start_service: Callable[..., Any],
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"

    service = await start_service(url, REDIS_CLUSTER="true")

    assert cache_status().backend == "degraded"
    await service.get("acme", bound=OPEN_BREAKER_BOUND)
    hit = await service.get("acme", bound=OPEN_BREAKER_BOUND)
    assert hit.headers["X-FastAPI-Cache"] == "HIT"


async def test_fail_fast_on_a_cluster_url_with_nothing_listening_refuses_to_start(
    make_settings: Callable[..., CacheSettings],
) -> None:
    settings = make_settings(
        f"redis://127.0.0.1:{free_port()}/0",
        REDIS_CLUSTER="true",
        CACHE_FAIL_FAST=True,
        **FAST_FAILING,
    )

    with pytest.raises(CacheUnavailableError, match="CACHE_FAIL_FAST"):
        await init_cache(settings)
    assert cache_status().backend == "disabled"


def test_a_cluster_url_naming_a_database_is_refused_when_the_settings_load(
    make_settings: Callable[..., CacheSettings],
) -> None:
    # A cluster has database 0 only: the client could never be built.
    with pytest.raises(ValidationError, match="REDIS_CLUSTER=true"):
        make_settings("redis://127.0.0.1:7000/1", REDIS_CLUSTER="true")


def test_check_on_a_cluster_url_with_nothing_listening_is_one_line_and_exit_1() -> None:
    environ = {k: v for k, v in os.environ.items() if k not in CacheSettings.model_fields}
    environ |= {
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "REDIS_CLUSTER": "true",
        "CACHE_PREFIX": "svc-a",
    }

    result = subprocess.run(
        [sys.executable, "-m", "commons.cache", "check"],
        env=environ,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: Redis at redis://127.0.0.1:")


# -- Sentinel -------------------------------------------------------------------------------------


@pytest.fixture
def sentinel() -> Iterator[LocalSentinel]:
    with LocalSentinel() as running:
        yield running


@pytest.mark.parametrize("fault", ["black-holed", "killed"])
async def test_a_master_and_replica_down_behind_sentinel_keep_every_outage_promise(
    start_service: Callable[..., Any], sentinel: LocalSentinel, fault: str
) -> None:
    service = await start_service(
        "redis://unused:1/0",
        REDIS_SENTINELS=sentinel.sentinels,
        REDIS_SENTINEL_MASTER=sentinel.master_name,
    )

    await assert_the_outage_promises(service, Outage(sentinel.servers, fault))
