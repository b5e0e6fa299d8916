"""Reads on a Redis Cluster: one pipelined connection and one near cache per primary.

A real cluster of 3 primaries and 3 replicas; "no command sent" is read from each primary's own
``INFO commandstats``; invalidations are made by another store (its own connections, as another
replica process would have); faults are real (``CLIENT KILL``, a slot migrated with ``MIGRATE``).
The service-level behaviour on a cluster (failovers, migrations under requests) is in
``test_cluster.py``; two replica processes are held to the model in ``model_check``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from commons.cache.backends.factory import redis_store
from commons.cache.backends.redis import RedisStore
from commons.cache.backends.redis.cluster import OnCluster
from commons.cache.backends.redis.near import FlushReason, NearCache
from commons.cache.keyspace import Keyspace
from commons.cache.scope import CacheScope, InvalidationTarget, tag_namespace
from commons.cache.settings import CacheSettings
from commons.testing.events import NEAR_CACHE_BACKGROUND_COMMANDS as BACKGROUND_COMMANDS
from commons.testing.events import RecordedEvents as Recorder
from commons.testing.proxy import LoopbackProxy
from commons.testing.redis_cluster import LocalRedisCluster, bulk_text
from commons.testing.redis_server import RedisServer
from commons.testing.waiting import eventually

pytestmark = pytest.mark.slow

PREFIX = "cluster-reads"
NAMESPACE = "reports"
TENANTS = [str(n) for n in range(12)]
#: How soon another store's invalidation must be seen (the near cache's promise on loopback).
COHERENCE_SECONDS = 0.05


def key_of(tenant: str) -> str:
    return f"{PREFIX}:{NAMESPACE}:tenant_{tenant}:/r"


def scope_of(tenant: str) -> CacheScope:
    return CacheScope(NAMESPACE, tenant)


#: What each primary's replica sends it whatever the reads do (``REPLCONF ACK``, every second).
REPLICATION_COMMANDS = frozenset({"replconf"})


def read_commands(cluster: LocalRedisCluster) -> dict[int, int]:
    """Per primary (port), the calls of every command but the near cache's background ones and
    replication's."""
    counts: dict[int, int] = {}
    for node in cluster.current_primaries():
        total = 0
        for line in bulk_text(node.command("INFO", "commandstats")).splitlines():
            name, _, fields = line.partition(":")
            command = name.removeprefix("cmdstat_")
            ignored = command in BACKGROUND_COMMANDS or command in REPLICATION_COMMANDS
            if command and command != name and not ignored:
                total += int(fields.split(",")[0].removeprefix("calls="))
        counts[node.port] = total
    return counts


def cluster_store(url: str, recorder: Recorder | None, **settings: Any) -> RedisStore:
    configured = CacheSettings(  # type: ignore[call-arg]
        REDIS_URL=url,
        CACHE_PREFIX=PREFIX,
        REDIS_SOCKET_TIMEOUT_SECONDS=0.5,
        CACHE_NEAR_CACHE_MAX_BYTES=3 << 20,
        **settings,
    )
    return redis_store(configured, serving=recorder)


def near_caches(store: RedisStore) -> list[NearCache]:
    topology = store.topology
    assert isinstance(topology, OnCluster)
    return topology.reads.near_caches


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def store(redis_cluster_url: str, recorder: Recorder) -> AsyncIterator[RedisStore]:
    """A service's store on the cluster (near caches on), every tenant's entry filled and held.

    Its maximum age is long: confirmations are MGETs too, and none is due while a test counts the
    reads' commands."""
    redis = cluster_store(redis_cluster_url, recorder, CACHE_NEAR_CACHE_MAX_AGE_SECONDS=300)
    await redis.ping()
    assert redis.is_cluster
    try:
        for tenant in TENANTS:
            generation = await redis.generation(scope_of(tenant))
            assert await redis.write(key_of(tenant), b"v1", 60, scope_of(tenant), generation)
        await eventually(lambda: held_everywhere(redis, recorder), "every entry held")
        yield redis
    finally:
        await redis.aclose()


@pytest.fixture
async def other(redis_cluster_url: str) -> AsyncIterator[RedisStore]:
    """Another replica's store on the same cluster."""
    redis = cluster_store(redis_cluster_url, None)
    await redis.ping()
    try:
        yield redis
    finally:
        await redis.aclose()


async def held_everywhere(store: RedisStore, recorder: Recorder) -> bool:
    hits = recorder.near_hits
    for tenant in TENANTS:
        read = await store.read(key_of(tenant), scope_of(tenant))
        assert read.value == b"v1"
    return recorder.near_hits - hits == len(TENANTS)


# -- hits --------------------------------------------------------------------------------------


async def test_held_entries_are_answered_by_the_primaries_near_caches_with_no_command_sent(
    store: RedisStore, recorder: Recorder, redis_cluster: LocalRedisCluster
) -> None:
    before, hits = read_commands(redis_cluster), recorder.near_hits

    for _ in range(5):
        for tenant in TENANTS:
            assert (await store.read(key_of(tenant), scope_of(tenant))).value == b"v1"

    assert read_commands(redis_cluster) == before
    assert recorder.near_hits - hits == 5 * len(TENANTS)


async def test_each_primary_holds_its_share_of_the_memory_bound(store: RedisStore) -> None:
    nears = near_caches(store)

    assert len(nears) == 3
    assert all(near._max_bytes == 1 << 20 for near in nears)
    assert sum(near.bytes_held for near in nears) > 0
    # cache_status() reports them summed over the primaries.
    assert store.near_cache_held() == (
        sum(len(near) for near in nears),
        sum(near.bytes_held for near in nears),
    )


async def test_a_full_primarys_near_cache_keeps_what_it_holds_over_keys_read_once(
    store: RedisStore,
) -> None:
    # Each primary's near cache holds 1 MiB here: about eighty entries of 12 KB.
    scope = scope_of("0")
    generation = await store.generation(scope)
    keys = [f"{key_of('0')}/{index}" for index in range(600)]
    for key in keys:
        assert await store.write(key, b"x" * 12_000, 60, scope, generation)
    for key in keys:
        await store.read(key, scope)  # the first ones fill the primaries', the others read once

    reads = [await store.read(key, scope) for key in keys[:40]]
    assert all(read.from_memory for read in reads)
    # A key read again soon (the sweep read it once) comes in.
    assert not (await store.read(keys[-1], scope)).from_memory
    assert (await store.read(keys[-1], scope)).from_memory


# -- coherence ---------------------------------------------------------------------------------


async def test_another_stores_invalidation_is_seen_within_the_coherence_bound(
    store: RedisStore, other: RedisStore, recorder: Recorder
) -> None:
    for tenant in TENANTS:
        await other.invalidate(InvalidationTarget(NAMESPACE, tenant))
        loop = asyncio.get_running_loop()
        returned = loop.time()
        while (await store.read(key_of(tenant), scope_of(tenant))).value is not None:
            assert loop.time() - returned < COHERENCE_SECONDS, f"tenant {tenant} still held"
            await asyncio.sleep(0.001)
    assert recorder.messages > 0


async def test_another_stores_update_replaces_the_held_value(
    store: RedisStore, other: RedisStore
) -> None:
    """Another process's update: its invalidation retires the scope's generation (announced to
    this one), then its fill stores the new value under the new generation."""
    tenant = TENANTS[3]
    await other.invalidate(InvalidationTarget(NAMESPACE, tenant))
    generation = await other.generation(scope_of(tenant))
    assert await other.write(key_of(tenant), b"v2", 60, scope_of(tenant), generation)

    async def sees_v2() -> bool:
        return (await store.read(key_of(tenant), scope_of(tenant))).value == b"v2"

    await eventually(sees_v2, "the new value")


async def test_losing_the_subscriber_of_the_generations_primary_makes_every_entry_of_them_miss(
    store: RedisStore, recorder: Recorder, redis_cluster: LocalRedisCluster
) -> None:
    """The entries are held by their own slots' primaries; their generations by the namespace
    slot's primary, whose subscribed connection is killed: no entry is answered from memory."""
    generations_slot = redis_cluster.key_slot(store.generation_keys(scope_of("0"))[0])
    owner = redis_cluster.owner_of_slot(generations_slot)
    elsewhere = [
        tenant
        for tenant in TENANTS
        if redis_cluster.owner_of_slot(redis_cluster.key_slot(key_of(tenant))).port != owner.port
    ]
    assert elsewhere, "every entry landed on the generations' primary"

    killed = owner.command("CLIENT", "KILL", "TYPE", "pubsub")
    assert killed != b":0\r\n", "no subscribed connection on the primary"
    assert killed.startswith(b":"), killed
    hits = recorder.near_hits
    await eventually(
        lambda: _true(FlushReason.TRACKING_LOST in recorder.flushes), "the loss noticed"
    )

    for tenant in elsewhere:
        assert (await store.read(key_of(tenant), scope_of(tenant))).value == b"v1"
    assert recorder.near_hits == hits


async def test_a_slot_migrated_away_keeps_its_entry_right_and_its_new_owner_answers_the_update(
    store: RedisStore, recorder: Recorder, redis_cluster: LocalRedisCluster, other: RedisStore
) -> None:
    """The entry's slot moves to another primary: the entry held, still under the scope's
    generations, stays right (answered, perhaps from memory); another replica's update then
    retires the generation, which drops it, and the new owner answers the new value."""
    tenant = TENANTS[5]
    key, scope = key_of(tenant), scope_of(tenant)
    slot = redis_cluster.key_slot(key)
    source = redis_cluster.owner_of_slot(slot)
    target = next(p for p in redis_cluster.current_primaries() if p.port != source.port)
    migrate(redis_cluster, slot, source, target, key)
    assert (await store.read(key, scope)).value == b"v1"

    await other.invalidate(InvalidationTarget(NAMESPACE, tenant))
    assert await other.write(key, b"v2", 60, scope, await other.generation(scope))

    async def updated() -> bool:
        return (await store.read(key, scope)).value == b"v2"

    await eventually(updated, "the new value, from the new owner")

    async def held_again() -> bool:
        hits = recorder.near_hits
        assert (await store.read(key, scope)).value == b"v2"
        return recorder.near_hits > hits

    await eventually(held_again, "held by the new owner's near cache")


def migrate(
    cluster: LocalRedisCluster, slot: int, source: RedisServer, target: RedisServer, key: str
) -> None:
    source_id, target_id = cluster.node_id(source), cluster.node_id(target)
    bulk_text(target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id))
    bulk_text(source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id))
    bulk_text(source.command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", key))
    for node in cluster.current_primaries():
        bulk_text(node.command("CLUSTER", "SETSLOT", slot, "NODE", target_id))


async def _true(value: bool) -> bool:
    return value


async def test_without_the_near_cache_every_hit_reads_its_primaries(
    redis_cluster_url: str, redis_cluster: LocalRedisCluster
) -> None:
    redis = cluster_store(redis_cluster_url, None)
    await redis.ping()
    try:
        generation = await redis.generation(scope_of("1"))
        assert await redis.write(key_of("1"), b"v1", 60, scope_of("1"), generation)
        before = sum(read_commands(redis_cluster).values())
        for _ in range(10):
            assert (await redis.read(key_of("1"), scope_of("1"))).value == b"v1"
        assert sum(read_commands(redis_cluster).values()) - before == 20  # an MGET on each side
    finally:
        await redis.aclose()


# -- tagged entries: each tag's generations in the tag's own slot -----------------------------

TAGGED_TENANT = TENANTS[0]
TAGGED_KEY = f"{PREFIX}:{NAMESPACE}:tenant_{TAGGED_TENANT}:/tagged"


def tagged_scope(*tags: str) -> CacheScope:
    return CacheScope(NAMESPACE, TAGGED_TENANT, tags=tags)


def primary_port(cluster: LocalRedisCluster, key: str) -> int:
    return cluster.owner_of_slot(cluster.key_slot(key)).port


def tag_primary_port(cluster: LocalRedisCluster, tag: str) -> int:
    """The port of the primary holding ``tag``'s generations (the tagged scope's second group)."""
    return primary_port(cluster, Keyspace(PREFIX).generation_groups(tagged_scope(tag))[1][0])


def tags_held_by(cluster: LocalRedisCluster, ports: list[int]) -> tuple[str, ...]:
    """One tag per port of ``ports``, whose generations that primary holds."""
    tags: list[str] = []
    for port in ports:
        candidates = (f"item:{n}" for n in range(1000) if f"item:{n}" not in tags)
        tags.append(next(tag for tag in candidates if tag_primary_port(cluster, tag) == port))
    return tuple(tags)


def third_primary(cluster: LocalRedisCluster) -> int:
    """A primary that holds neither the tagged entry nor its namespace's generations."""
    taken = {
        primary_port(cluster, TAGGED_KEY),
        primary_port(cluster, Keyspace(PREFIX).generation_keys(tagged_scope())[0]),
    }
    return next(n.port for n in cluster.current_primaries() if n.port not in taken)


async def fill_and_hold(store: RedisStore, recorder: Recorder, scope: CacheScope) -> bytes:
    """Writes the tagged entry under ``scope``'s generations, then reads it until the near caches
    answer it; the generations it was written under."""
    generation = await store.generation(scope)
    assert await store.write(TAGGED_KEY, b"tagged", 60, scope, generation)

    async def held() -> bool:
        hits = recorder.near_hits
        read = await store.read(TAGGED_KEY, scope)
        assert (read.value, read.generation) == (b"tagged", generation)
        return recorder.near_hits > hits

    await eventually(held, "the tagged entry held")
    return generation


@pytest.mark.parametrize("tag_count", [1, 3])
async def test_a_held_tagged_entry_is_answered_with_no_command_sent_wherever_its_tags_live(
    redis_cluster_url: str, redis_cluster: LocalRedisCluster, tag_count: int
) -> None:
    """One tag on a primary holding neither the entry nor its namespace's generations; three
    tags on the three primaries, one each."""
    recorder = Recorder()
    # Confirmations are MGETs too: none is due while the reads are counted.
    redis = cluster_store(redis_cluster_url, recorder, CACHE_NEAR_CACHE_MAX_AGE_SECONDS=300)
    await redis.ping()
    try:
        if tag_count == 1:
            ports = [third_primary(redis_cluster)]
        else:
            ports = sorted(node.port for node in redis_cluster.current_primaries())
        scope = tagged_scope(*tags_held_by(redis_cluster, ports))
        assert len({tag_primary_port(redis_cluster, tag) for tag in scope.tags}) == tag_count
        generation = await fill_and_hold(redis, recorder, scope)
        before, hits = read_commands(redis_cluster), recorder.near_hits

        for _ in range(5):
            read = await redis.read(TAGGED_KEY, scope)
            assert (read.value, read.generation) == (b"tagged", generation)

        assert read_commands(redis_cluster) == before
        assert recorder.near_hits - hits == 5
    finally:
        await redis.aclose()


async def test_another_stores_invalidation_of_a_tag_on_a_third_primary_misses_the_held_entry(
    store: RedisStore, other: RedisStore, recorder: Recorder, redis_cluster: LocalRedisCluster
) -> None:
    """The tag's generations are on neither the entry's primary nor the namespace's: the tag
    primary's message drops them, and with them the entry held elsewhere."""
    (tag,) = tags_held_by(redis_cluster, [third_primary(redis_cluster)])
    scope = tagged_scope(tag, "insights")
    generation = await fill_and_hold(store, recorder, scope)
    messages = recorder.messages

    await other.invalidate(InvalidationTarget(tag_namespace(tag), TAGGED_TENANT))
    loop = asyncio.get_running_loop()
    returned = loop.time()
    while (await store.read(TAGGED_KEY, scope)).generation == generation:
        assert loop.time() - returned < COHERENCE_SECONDS, "the tagged entry still held"
        await asyncio.sleep(0.001)

    assert recorder.messages > messages
    untagged = await store.read(key_of(TAGGED_TENANT), scope_of(TAGGED_TENANT))
    assert untagged.value == b"v1"


async def test_losing_the_subscriber_of_a_tags_primary_makes_its_tagged_entries_miss(
    store: RedisStore, recorder: Recorder, redis_cluster: LocalRedisCluster
) -> None:
    """The entry and its namespace's generations are held by primaries whose sessions go on;
    the subscribed connection of the primary holding the tag's generations is killed."""
    port = third_primary(redis_cluster)
    (tag,) = tags_held_by(redis_cluster, [port])
    scope = tagged_scope(tag)
    generation = await fill_and_hold(store, recorder, scope)
    [owner] = [node for node in redis_cluster.current_primaries() if node.port == port]

    killed = owner.command("CLIENT", "KILL", "TYPE", "pubsub")
    assert killed != b":0\r\n", "no subscribed connection on the tag's primary"
    hits = recorder.near_hits
    await eventually(
        lambda: _true(FlushReason.TRACKING_LOST in recorder.flushes), "the loss noticed"
    )

    read = await store.read(TAGGED_KEY, scope)
    assert (read.value, read.generation) == (b"tagged", generation)
    assert recorder.near_hits == hits


# -- a half-open read connection to one primary, on real processes -------------------------------

#: The service's CACHE_NEAR_CACHE_MAX_AGE_SECONDS: no old answer may come after it.
MAX_AGE_SECONDS = 1.0
#: Allowance past that bound for a loaded machine (a read, a reconnection).
SLACK_SECONDS = 1.0


@pytest.fixture
def proxied_cluster() -> Iterator[tuple[LocalRedisCluster, RedisServer, LoopbackProxy]]:
    """A cluster of 3 primaries whose namespace ``res`` lives on a primary that clients reach
    through a loopback proxy (it announces the proxy's port: ``cluster-announce-port``)."""
    with LocalRedisCluster(primaries=3, replicas_per_primary=0) as cluster:
        owner = cluster.owner_of_slot(
            cluster.key_slot(Keyspace("fault").generation_keys(CacheScope("res"))[0])
        )
        with LoopbackProxy(owner.port) as proxy:
            bus_port = bulk_text(owner.command("CONFIG", "GET", "cluster-port")).split()[-1]
            owner.command("CONFIG", "SET", "cluster-announce-bus-port", bus_port)
            owner.command("CONFIG", "SET", "cluster-announce-port", proxy.port)

            def announced_everywhere() -> bool:
                return all(
                    f":{proxy.port}@" in bulk_text(node.command("CLUSTER", "NODES"))
                    for node in cluster.nodes
                )

            deadline = time.monotonic() + 10
            while not announced_everywhere():
                assert time.monotonic() < deadline, "the nodes never named the proxy's port"
                time.sleep(0.05)
            yield cluster, owner, proxy


def commons_cache(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``commons-cache`` command, run as an operator runs it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CACHE_", "REDIS_"))}
    return subprocess.run(
        [str(Path(sys.executable).with_name("commons-cache")), *args],
        env={**environ, "REDIS_URL": redis_url, "CACHE_PREFIX": "fault"},
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_a_half_open_read_connection_to_one_primary_answers_no_old_hit_past_the_maximum_age(
    proxied_cluster: tuple[LocalRedisCluster, RedisServer, LoopbackProxy],
    start_replicas: Callable[..., list[str]],
    tmp_path: Path,
) -> None:
    """A NAT drops the service's idle read connection to the primary holding the namespace's
    generations (Redis forgets what it tracked and tells no one); the subscribed connection
    stays healthy. After ``commons-cache invalidate`` returned, no HIT of the old value comes
    later than the maximum age (it came for 10 s and more before the bound existed)."""
    cluster, owner, proxy = proxied_cluster
    database = tmp_path / "res.sqlite"
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.execute("CREATE TABLE res (tenant TEXT PRIMARY KEY, version INTEGER)")
        conn.execute("INSERT INTO res VALUES ('acme', 1)")
    other_node = next(node for node in cluster.nodes if node is not owner)
    env = {"REDIS_URL": other_node.url, "CACHE_PREFIX": "fault"}
    (service,) = start_replicas(
        1,
        **env,
        REPLICA_DB=str(database),
        REPLICA_READ_SECONDS="0",
        CACHE_NEAR_CACHE_MAX_AGE_SECONDS=str(MAX_AGE_SECONDS),
    )
    tenant = {"X-Test-Tenant": "acme"}
    async with httpx.AsyncClient(base_url=service, timeout=10) as client:

        async def near_hit() -> bool:
            before = read_commands(cluster)
            answer = await client.get("/res", headers=tenant)
            assert answer.json() == {"version": 1}
            return read_commands(cluster) == before

        await eventually(near_hit, "the old value answered from the near cache")
        readers = proxy.connections_that_sent(b"TRACKING")
        assert readers, "no read connection to the proxied primary"
        for reader in readers:
            reader.sever_silently()
        with contextlib.closing(sqlite3.connect(database)) as conn, conn:
            conn.execute("UPDATE res SET version = 2 WHERE tenant = 'acme'")
        invalidated = await asyncio.to_thread(
            commons_cache, other_node.url, "invalidate", "res", "--tenant", "acme"
        )
        assert invalidated.returncode == 0, invalidated.stderr
        returned = time.monotonic()

        answers = []
        while time.monotonic() - returned < MAX_AGE_SECONDS + SLACK_SECONDS + 1.0:
            answer = await client.get("/res", headers=tenant)
            answers.append((time.monotonic() - returned, answer.json()["version"]))
            await asyncio.sleep(0.02)

    old = [at for at, version in answers if version == 1]
    assert not old or old[-1] < MAX_AGE_SECONDS + SLACK_SECONDS, answers
    assert answers[-1][1] == 2
