"""Invalidations survive a crashed master (behind Sentinel or on a cluster) and a Sentinel
switch-over, in every process.

Redis replicates asynchronously, so a master can acknowledge an invalidation its replica never
receives. Behind Sentinel and on a cluster an invalidation is confirmed on a replica (``WAIT``) and,
unconfirmed, kept and applied again once Redis answers, on whichever server is then the master.
Every process asks Sentinel for the master about once a second, so reads leave a demoted master.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from commons.cache import (
    CacheSettings,
    cache,
    cache_status,
    close_cache,
    init_cache,
    invalidate_namespace,
)
from commons.cache.backends.redis import RedisStore
from commons.testing import current_layer
from commons.testing.redis_cluster import LocalRedisCluster, info_field
from commons.testing.redis_sentinel import LocalSentinel
from commons.testing.redis_server import RedisServer, find_redis_server, redis_server_version

from _support import client_for

pytestmark = pytest.mark.slow

#: Longest a process may serve an invalidated value once Sentinel names the new master: its next
#: look at Sentinel (every second) plus the invalidating process's replay (its probe interval).
SWITCH_OVER_WINDOW_SECONDS = 3.0


@pytest.fixture
def client(sentinel_client: httpx.AsyncClient) -> httpx.AsyncClient:
    return sentinel_client


async def get(client: httpx.AsyncClient) -> httpx.Response:
    return await client.get("/config", headers={"X-Test-Tenant": "t1"})


def set_version(client: httpx.AsyncClient, n: int) -> None:
    app: FastAPI = client._transport.app  # type: ignore[attr-defined]
    app.state.version["n"] = n


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)


def switch_over(sentinel: LocalSentinel, replica: RedisServer) -> None:
    """``SENTINEL FAILOVER`` (asked again until accepted), then waits until ``replica`` is the
    master Sentinel names."""
    assert sentinel.sentinel is not None
    wait_until(
        lambda: (
            not sentinel.sentinel.command(  # type: ignore[union-attr]
                "SENTINEL", "FAILOVER", sentinel.master_name
            ).startswith(b"-")
        ),
        20,
        "SENTINEL FAILOVER being accepted",
    )
    wait_until(lambda: sentinel_switched(sentinel, replica), 20, "the switch")


async def test_an_invalidation_no_replica_received_survives_the_master_crashing(
    client: httpx.AsyncClient, sentinel: LocalSentinel
) -> None:
    master, replica = sentinel.servers
    await get(client)
    assert (await get(client)).headers["X-FastAPI-Cache"] == "HIT"
    wait_until(lambda: replica.command("DBSIZE") == master.command("DBSIZE"), 5, "replication")

    # Hold the replication stream: the replica stops reading, and a large write fills the socket
    # buffers between the two, so what the master writes next stays in its own memory.
    replica.pause()
    master.command("SET", "filler", b"x" * (32 << 20))
    set_version(client, 2)
    await invalidate_namespace("tenant_config")
    acknowledged = time.monotonic()
    master.kill()
    replica.resume()

    # Sentinel promotes the replica, which never received the invalidation.
    while sentinel.master_port() != replica.port or cache_status().backend != "redis":
        assert (await get(client)).json() == {"version": 2}
        assert time.monotonic() - acknowledged < 30, "the cache did not return to Redis"
        await asyncio.sleep(0.05)
    print(f"back on Redis {time.monotonic() - acknowledged:.2f} s after the invalidation")
    assert info_field(replica, "replication", "role") == "master"
    for _ in range(3):
        assert (await get(client)).json() == {"version": 2}
    assert (await get(client)).headers["X-FastAPI-Cache"] == "HIT"


# A second process: its own cache layer on the same Sentinel, reading the route every 20 ms and
# printing when, what version and how (X-FastAPI-Cache) it served, until the stop file appears.
# Its handler answers the version file; the tenant is bound in an async dependency, as the guide
# has it, so that its answers are cached.
_READER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from pathlib import Path
    import httpx
    from fastapi import Depends, FastAPI
    from commons.cache import CacheSettings, cache, close_cache, init_cache
    from commons.utilities.context import set_tenant_id

    sentinels, master_name, version_file, stop_file = sys.argv[1:5]
    app = FastAPI()

    async def bind_tenant() -> None:
        set_tenant_id("t1")

    @app.get("/config", dependencies=[Depends(bind_tenant)])
    @cache(namespace="tenant_config")
    async def config() -> dict[str, int]:
        return {"version": int(Path(version_file).read_text())}

    async def main() -> None:
        await init_cache(CacheSettings(
            CACHE_PREFIX="test-cache", CACHE_TTL_SECONDS=60, REDIS_URL="redis://unused:1/0",
            CACHE_RECOVERY_INTERVAL_SECONDS=0.2, REDIS_SENTINELS=sentinels,
            REDIS_SENTINEL_MASTER=master_name,
        ))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            while not Path(stop_file).exists():
                response = await http.get("/config")
                status = response.headers.get("X-FastAPI-Cache")
                print(json.dumps([time.time(), response.json()["version"], status]), flush=True)
                await asyncio.sleep(0.02)
        await close_cache()

    asyncio.run(main())
    """
)


async def cached_then_read_elsewhere(
    client: httpx.AsyncClient, sentinel: LocalSentinel, version_file: Path, stop_file: Path
) -> asyncio.subprocess.Process:
    """Version 1 cached by this process and replicated; then a second process (``_READER``)
    reading it, until ``stop_file`` appears."""
    master, replica = sentinel.servers
    await get(client)
    assert (await get(client)).headers["X-FastAPI-Cache"] == "HIT"
    wait_until(lambda: replica.command("DBSIZE") == master.command("DBSIZE"), 5, "replication")
    write_atomically(version_file, "1")
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _READER,
        sentinel.sentinels,
        sentinel.master_name,
        str(version_file),
        str(stop_file),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def sentinel_switched(sentinel: LocalSentinel, to: RedisServer) -> bool:
    """Whether Sentinel's record of the master names ``to``, with no failover under way."""
    assert sentinel.sentinel is not None
    reply = sentinel.sentinel.command("SENTINEL", "MASTER", sentinel.master_name)
    values = [part for part in reply.split(b"\r\n") if part and part[:1] not in b"*$"]
    fields = dict(zip(values[::2], values[1::2], strict=False))
    flags = fields.get(b"flags", b"").split(b",")
    return fields.get(b"port") == str(to.port).encode() and b"failover_in_progress" not in flags


def write_atomically(path: Path, text: str) -> None:
    """Replaces ``path``'s content in one step: the other process never reads it half-written."""
    staged = path.with_suffix(".staged")
    staged.write_text(text)
    os.replace(staged, path)


async def test_no_process_serves_an_invalidation_the_old_master_acknowledged_in_a_switch_over(
    client: httpx.AsyncClient, sentinel: LocalSentinel, tmp_path: Path
) -> None:
    """An invalidation acknowledged while ``SENTINEL FAILOVER`` runs, once the replica is
    promoted: the old master still takes writes (Sentinel names it until the switch), and loses
    them when Sentinel converts it into a replica of the new one, seconds later."""
    master, replica = sentinel.servers
    version_file, stop_file = tmp_path / "version", tmp_path / "stop"
    reader = await cached_then_read_elsewhere(client, sentinel, version_file, stop_file)
    try:
        assert reader.stdout is not None
        # The second process reads the entry (from Redis: it never computed it).
        assert json.loads(await reader.stdout.readline())[1:] == [1, "HIT"]

        assert sentinel.sentinel is not None
        wait_until(
            lambda: (
                not sentinel.sentinel.command(  # type: ignore[union-attr]
                    "SENTINEL", "FAILOVER", sentinel.master_name
                ).startswith(b"-")
            ),
            20,
            "SENTINEL FAILOVER being accepted",
        )
        wait_until(
            lambda: info_field(replica, "replication", "role") == "master", 20, "the promotion"
        )
        assert info_field(master, "replication", "role") == "master", "demoted too early"
        set_version(client, 2)
        write_atomically(version_file, "2")
        await invalidate_namespace("tenant_config")
        acknowledged = time.time()

        # This process never serves the old value again, through the whole switch-over.
        deadline = time.monotonic() + 30
        while (
            not sentinel_switched(sentinel, replica)
            or info_field(master, "replication", "master_link_status") != "up"
            or cache_status().backend != "redis"
        ):
            assert (await get(client)).json() == {"version": 2}
            assert time.monotonic() < deadline, "the switch-over did not complete"
            await asyncio.sleep(0.05)
        switched = time.time()
        for _ in range(40):
            assert (await get(client)).json() == {"version": 2}
            await asyncio.sleep(0.05)
        assert cache_status().backend == "redis"
    finally:
        stop_file.write_text("")
        out, err = await asyncio.wait_for(reader.communicate(), 30)
    assert reader.returncode == 0, err.decode()
    served = [json.loads(line) for line in out.decode().splitlines()]
    old = [at for at, version, _ in served if version == 1 and at > acknowledged]
    window = max(old) - acknowledged if old else 0.0
    print(
        f"the second process served the old value {window:.2f} s after the"
        f" invalidation; the switch-over ended {switched - acknowledged:.2f} s after it"
    )
    assert window <= SWITCH_OVER_WINDOW_SECONDS
    assert served[-1][1] == 2
    assert served[-1][0] > switched


async def test_a_process_degraded_by_an_unconfirmed_invalidation_still_invalidates_on_the_master(
    client: httpx.AsyncClient, sentinel: LocalSentinel, tmp_path: Path
) -> None:
    """A replica slow to confirm (its ``WAIT`` times out) degrades the invalidating process,
    which then serves from its memory tier. The master answered, though: what that process
    invalidates next reaches it before returning, where every other process reads, rather than
    at the next probe's replay."""
    replica = sentinel.servers[1]
    # Probes far apart: only the invalidation itself can bring the update to the master in time.
    await close_cache()
    await init_cache(
        CacheSettings(
            CACHE_PREFIX="test-cache",
            CACHE_TTL_SECONDS=60,
            REDIS_URL="redis://unused:1/0",
            CACHE_RECOVERY_INTERVAL_SECONDS=30,
            REDIS_SENTINELS=sentinel.sentinels,
            REDIS_SENTINEL_MASTER=sentinel.master_name,
        )
    )
    version_file, stop_file = tmp_path / "version", tmp_path / "stop"
    reader = await cached_then_read_elsewhere(client, sentinel, version_file, stop_file)
    try:
        assert reader.stdout is not None
        assert json.loads(await reader.stdout.readline())[1:] == [1, "HIT"]
        replica.pause()  # it confirms nothing from now on
        set_version(client, 2)
        write_atomically(version_file, "2")
        await invalidate_namespace("tenant_config")
        assert cache_status().backend == "degraded", "an unconfirmed invalidation degrades"
        await asyncio.sleep(0.5)  # the other process caches version 2 meanwhile

        set_version(client, 3)
        write_atomically(version_file, "3")
        await invalidate_namespace("tenant_config")
        acknowledged = time.time()
        for _ in range(20):
            assert (await get(client)).json() == {"version": 3}
            await asyncio.sleep(0.05)
    finally:
        replica.resume()
        stop_file.write_text("")
        out, err = await asyncio.wait_for(reader.communicate(), 30)
    assert reader.returncode == 0, err.decode()
    served = [json.loads(line) for line in out.decode().splitlines()]
    assert any(status == "HIT" and version == 2 for _, version, status in served)
    assert served[-1][1] == 3
    # A read printed this long after the invalidation returned began after it (the reads are
    # 20 ms apart; the rest is a loaded machine's slack).
    old = [
        at - acknowledged for at, version, _ in served if version < 3 and at > acknowledged + 0.2
    ]
    assert old == [], f"the other process served an old version up to {max(old):.2f} s after"


async def seconds_until_the_invalidation_is_read(
    client: httpx.AsyncClient, new_master: RedisServer
) -> float:
    """Another process's invalidation, made on ``new_master``: how long until reads see it."""
    set_version(client, 2)
    new_master.command("UNLINK", "test-cache:#gen:{tenant_config}")
    invalidated = time.monotonic()
    for _ in range(1000):
        if (await get(client)).json() == {"version": 2}:
            break
        await asyncio.sleep(0.02)
    left_after = time.monotonic() - invalidated
    print(f"reads left the demoted master {left_after:.2f} s after the invalidation")
    return left_after


async def test_reads_leave_a_demoted_master_within_a_second(
    client: httpx.AsyncClient, sentinel: LocalSentinel
) -> None:
    """A process that only reads learns of the switch-over from Sentinel: its pooled connections
    to the old master (which answers as a master until Sentinel converts it, seconds later) are
    dropped, and it reads another process's invalidation on the new master."""
    master, replica = sentinel.servers
    await get(client)
    assert (await get(client)).headers["X-FastAPI-Cache"] == "HIT"
    wait_until(lambda: replica.command("DBSIZE") == master.command("DBSIZE"), 5, "replication")
    switch_over(sentinel, replica)

    # Another process invalidates on the new master.
    left_after = await seconds_until_the_invalidation_is_read(client, replica)
    assert info_field(master, "replication", "role") == "master"
    assert left_after <= 1.5
    assert (await get(client)).json() == {"version": 2}


async def test_reads_leave_a_demoted_master_whoever_learned_of_the_switch_first(
    client: httpx.AsyncClient, sentinel: LocalSentinel
) -> None:
    """A connection that was busy when the process learned of the switch-over (a new connection
    asked Sentinel first and only the idle ones were dropped) goes back to the pool still talking
    to the old master; it too is dropped within a second, and reads see another process's
    invalidation on the new master."""
    master, replica = sentinel.servers
    await get(client)
    assert (await get(client)).headers["X-FastAPI-Cache"] == "HIT"
    wait_until(lambda: replica.command("DBSIZE") == master.command("DBSIZE"), 5, "replication")
    layer = current_layer()
    assert layer is not None
    assert isinstance(layer._redis, RedisStore)
    pool = layer._redis.client.connection_pool
    busy = await pool.get_connection()
    switch_over(sentinel, replica)
    # A new connection asks Sentinel, which names the new master: the idle connections are
    # dropped, the busy one is not; released last, it is the next one reads take.
    fresh = await pool.get_connection()
    assert (fresh.port, busy.port) == (replica.port, master.port)
    await pool.release(fresh)
    await pool.release(busy)

    left_after = await seconds_until_the_invalidation_is_read(client, replica)
    assert info_field(master, "replication", "role") == "master"
    assert left_after <= 1.5


@pytest.fixture
def own_cluster() -> Iterator[LocalRedisCluster]:
    """A cluster of the test's own: the test kills one of its primaries."""
    binary = find_redis_server()
    if redis_server_version(binary) < (7,):
        pytest.skip(f"the cluster fixture needs redis-server 7+ ({binary} is older)")
    with LocalRedisCluster(primaries=3, replicas_per_primary=1) as cluster:
        yield cluster


async def test_an_invalidation_no_replica_received_survives_a_cluster_primary_crashing(
    own_cluster: LocalRedisCluster,
    make_settings: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
) -> None:
    app = make_identity_app()
    version = app.state.version = {"n": 1}

    @app.get("/config")
    @cache(namespace="tenant_config")
    async def config() -> dict[str, int]:
        return {"version": version["n"]}

    await init_cache(make_settings(own_cluster.url))
    client = client_for(app)
    try:
        await get(client)
        assert (await get(client)).headers["X-FastAPI-Cache"] == "HIT"
        # Every generation key of the namespace carries its hash tag: one slot, one shard.
        primary = own_cluster.owner_of_slot(own_cluster.key_slot("{tenant_config}"))
        replica = own_cluster.replica_of(primary)
        wait_until(lambda: replica.command("DBSIZE") == primary.command("DBSIZE"), 5, "replication")
        # CLUSTER SLOTS lists a replica once the nodes have heard of its replication offset: on
        # every node, replicas included (the cache reads the map from whichever node answers).
        wait_until(
            lambda: all(
                str(replica.port).encode() in node.command("CLUSTER", "SLOTS")
                for node in own_cluster.nodes
            ),
            5,
            "the replica in the slot map",
        )

        # Hold that shard's replication stream (see the Sentinel test above).
        replica.pause()
        primary.command("SET", "{tenant_config}:filler", b"x" * (32 << 20))
        set_version(client, 2)
        await invalidate_namespace("tenant_config")
        # Unconfirmed: kept, as during an outage.
        assert cache_status().backend == "degraded"
        assert cache_status().pending_invalidations == 1
        acknowledged = time.monotonic()
        primary.kill()
        replica.resume()

        # The cluster promotes the replica (cluster-node-timeout), which never received it.
        while own_cluster.role(replica) != "master" or cache_status().backend != "redis":
            assert (await get(client)).json() == {"version": 2}
            assert time.monotonic() - acknowledged < 30, "the cache did not return to Redis"
            await asyncio.sleep(0.05)
        print(f"back on Redis {time.monotonic() - acknowledged:.2f} s after the invalidation")
        for _ in range(3):
            assert (await get(client)).json() == {"version": 2}
        assert (await get(client)).headers["X-FastAPI-Cache"] == "HIT"
    finally:
        await client.aclose()
        await close_cache()


async def test_an_invalidation_right_after_a_switch_over_survives_the_old_master_promoted_back(
    client: httpx.AsyncClient, sentinel: LocalSentinel
) -> None:
    """After a switch-over the old master still reports itself a master until Sentinel converts
    it (seconds): it takes no write of the new master meanwhile, yet Sentinel may promote it
    again. An invalidation acknowledged in that window, with no replica to confirm it, was
    applied on the new master alone and served old once the old master was promoted back."""
    master, replica = sentinel.servers
    assert (await get(client)).json() == {"version": 1}
    switch_over(sentinel, replica)
    await asyncio.sleep(1.5)  # the process follows the new master
    assert info_field(master, "replication", "role") == "master", "converted too early"
    set_version(client, 2)
    await invalidate_namespace("tenant_config")

    switch_over(sentinel, master)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        assert (await get(client)).json() == {"version": 2}
        await asyncio.sleep(0.1)
