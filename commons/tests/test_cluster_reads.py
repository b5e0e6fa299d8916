"""Reads on a Redis Cluster: one pipelined connection and one near cache per primary.

A real cluster of 3 primaries and 3 replicas; "no command sent" is read from each primary's own
``INFO commandstats``; invalidations are made by another store (its own connections, as another
replica process would have); faults are real (``CLIENT KILL``, a slot migrated with ``MIGRATE``).
The service-level behaviour on a cluster (failovers, migrations under requests) is in
``test_cluster.py``; two replica processes are held to the model in ``model_check``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from commons.cache.backends.factory import redis_store
from commons.cache.backends.near import FlushReason, NearCache
from commons.cache.backends.redis import RedisStore
from commons.cache.scope import CacheScope, InvalidationTarget
from commons.cache.settings import CacheSettings
from commons.testing.events import NEAR_CACHE_BACKGROUND_COMMANDS as BACKGROUND_COMMANDS
from commons.testing.events import RecordedEvents as Recorder
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


def read_commands(cluster: LocalRedisCluster) -> dict[int, int]:
    """Per primary (port), the calls of every command but the near cache's background ones."""
    counts: dict[int, int] = {}
    for node in cluster.current_primaries():
        total = 0
        for line in bulk_text(node.command("INFO", "commandstats")).splitlines():
            name, _, fields = line.partition(":")
            command = name.removeprefix("cmdstat_")
            if command and command != name and command not in BACKGROUND_COMMANDS:
                total += int(fields.split(",")[0].removeprefix("calls="))
        counts[node.port] = total
    return counts


def cluster_store(url: str, recorder: Recorder | None) -> RedisStore:
    settings = CacheSettings(  # type: ignore[call-arg]
        REDIS_URL=url,
        CACHE_PREFIX=PREFIX,
        REDIS_SOCKET_TIMEOUT_SECONDS=0.5,
        CACHE_NEAR_CACHE_MAX_BYTES=3 << 20,
    )
    return redis_store(settings, serving=recorder)


def near_caches(store: RedisStore) -> list[NearCache]:
    reads = store._cluster_reads
    assert reads is not None
    return reads.near_caches


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def store(redis_cluster_url: str, recorder: Recorder) -> AsyncIterator[RedisStore]:
    """A service's store on the cluster (near caches on), every tenant's entry filled and held."""
    redis = cluster_store(redis_cluster_url, recorder)
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


async def test_another_stores_write_replaces_the_held_value(
    store: RedisStore, other: RedisStore
) -> None:
    tenant = TENANTS[3]
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


async def test_a_slot_migrated_away_drops_its_entry_and_its_new_owner_answers(
    store: RedisStore, recorder: Recorder, redis_cluster: LocalRedisCluster
) -> None:
    key = key_of(TENANTS[5])
    slot = redis_cluster.key_slot(key)
    source = redis_cluster.owner_of_slot(slot)
    target = next(p for p in redis_cluster.current_primaries() if p.port != source.port)
    messages = recorder.messages
    migrate(redis_cluster, slot, source, target, key)

    # MIGRATE deleted the key on the source, which announced it; the next read finds the source
    # answering MOVED, empties its near cache and is answered by the new owner.
    await eventually(lambda: _true(recorder.messages > messages), "the deletion announced")
    read = await store.read(key, scope_of(TENANTS[5]))
    assert read.value == b"v1"
    assert FlushReason.MOVED in recorder.flushes

    async def held_again() -> bool:
        hits = recorder.near_hits
        assert (await store.read(key, scope_of(TENANTS[5]))).value == b"v1"
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
