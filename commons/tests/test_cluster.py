"""The cache on a Redis Cluster of 3 primaries and 3 replicas, through a FastAPI app.

Entries keep the guide's exact keys and so spread over every slot and primary; a namespace's
indexes share one slot (its hash tag). Nothing may raise ``CROSSSLOT``; invalidation and the flush
reach every primary; a slot migration (``ASK``, then ``MOVED``) and a primary's failover are
survived with the resilience guarantees: a request never fails, and once an invalidation has
completed (or, during an outage, once Redis is read again) no pre-invalidation entry is served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from commons.cache import (
    CacheSettings,
    cache,
    cache_status,
    close_cache,
    init_cache,
    invalidate_namespace,
    tenant_user_cache_key_builder,
)
from commons.cache.backends.redis import RedisStore
from commons.cache.scope import CacheScope, InvalidationTarget
from commons.testing import current_layer
from commons.testing.redis_cluster import LocalRedisCluster, bulk_text, info_field

from _support import client_for

pytestmark = pytest.mark.slow

TENANTS = [str(n) for n in range(12)]
#: Longest any request may take while a primary is down (timeouts are 0.5 s).
REQUEST_BOUND_SECONDS = 2.5


@dataclass
class Service:
    """An app with a tenant-scoped and a user-scoped cached route; bodies show their version."""

    app: FastAPI
    client: httpx.AsyncClient
    versions: dict[str, int]

    async def get(self, path: str, tenant: str, user: str = "u1") -> httpx.Response:
        return await self.client.get(path, headers={"X-Test-Tenant": tenant, "X-Test-User": user})


@pytest.fixture
async def service(
    redis_cluster_url: str,
    make_settings: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
) -> AsyncIterator[Service]:
    versions = {"config": 1, "profile": 1}
    app = make_identity_app()

    @app.get("/config")
    @cache(namespace="tenant_config")
    async def config() -> dict[str, int]:
        return {"version": versions["config"]}

    @app.get("/me")
    @cache(namespace="profile", key_builder=tenant_user_cache_key_builder)
    async def profile() -> dict[str, int]:
        return {"version": versions["profile"]}

    await init_cache(make_settings(redis_cluster_url))
    client = client_for(app)
    try:
        yield Service(app, client, versions)
    finally:
        await client.aclose()
        await close_cache()


def store() -> RedisStore:
    layer = current_layer()
    assert layer is not None
    redis = layer._redis
    assert isinstance(redis, RedisStore)
    return redis


def cluster_client() -> RedisCluster:
    client = store().client
    assert isinstance(client, RedisCluster)
    return client


async def keys_of(prefix: str = "test-cache") -> set[str]:
    return {key.decode() async for key in cluster_client().scan_iter(match=f"{prefix}:*")}


def primaries_holding(cluster: LocalRedisCluster, keys: set[str]) -> set[int]:
    return {cluster.owner_of_slot(cluster.key_slot(key)).port for key in keys}


async def warm(service: Service, path: str = "/config") -> None:
    for tenant in TENANTS:
        response = await service.get(path, tenant)
        assert response.status_code == 200


async def cache_header(service: Service, path: str, tenant: str, user: str = "u1") -> str:
    return (await service.get(path, tenant, user)).headers["X-FastAPI-Cache"]


# -- detection and layout ----------------------------------------------------------------------


async def test_a_cluster_node_in_redis_url_is_detected_and_served_by_the_cluster_client(
    service: Service,
) -> None:
    assert cache_status().backend == "redis"
    assert store().is_cluster


async def test_entries_keep_the_guides_keys_and_spread_over_every_primary(
    service: Service, redis_cluster: LocalRedisCluster
) -> None:
    await warm(service)

    entries = {key for key in await keys_of() if "#" not in key}
    assert entries == {
        key
        for key in entries
        if key.startswith("test-cache:tenant_config:tenant_") and key.count(":") == 4
    }
    assert len(entries) == len(TENANTS)
    assert len(primaries_holding(redis_cluster, entries)) == 3


async def test_a_namespaces_indexes_share_one_slot(
    service: Service, redis_cluster: LocalRedisCluster
) -> None:
    await warm(service, "/me")

    indexes = {key for key in await keys_of() if "#" in key}
    assert len(indexes) > len(TENANTS)
    assert {redis_cluster.key_slot(key) for key in indexes} == {redis_cluster.key_slot("{profile}")}


# -- behaviour ---------------------------------------------------------------------------------


async def test_a_cached_route_misses_then_hits(service: Service) -> None:
    for tenant in TENANTS:
        assert await cache_header(service, "/config", tenant) == "MISS"
    for tenant in TENANTS:
        assert await cache_header(service, "/config", tenant) == "HIT"


async def test_a_burst_of_hits_shares_one_read_connection_per_primary(
    service: Service, redis_cluster: LocalRedisCluster
) -> None:
    """Hits travel pipelined on one connection per primary, not on a pooled connection each."""
    await warm(service)
    await warm(service)  # the read connections are open now
    before = {
        node.port: int(info_field(node, "clients", "connected_clients"))
        for node in redis_cluster.current_primaries()
    }
    responses = await asyncio.gather(*(service.get("/config", tenant) for tenant in TENANTS * 20))
    assert {r.headers["X-FastAPI-Cache"] for r in responses} == {"HIT"}
    assert all(r.json() == {"version": 1} for r in responses)
    after = {
        node.port: int(info_field(node, "clients", "connected_clients"))
        for node in redis_cluster.current_primaries()
    }
    assert after == before


async def test_invalidating_a_namespace_removes_its_entries_from_every_primary(
    service: Service,
) -> None:
    await warm(service)
    await warm(service, "/me")
    service.versions["config"] = 2

    await invalidate_namespace("tenant_config")

    for tenant in TENANTS:
        response = await service.get("/config", tenant)
        assert response.headers["X-FastAPI-Cache"] == "MISS"
        assert response.json() == {"version": 2}
        assert await cache_header(service, "/me", tenant) == "HIT"


async def test_invalidating_one_tenant_leaves_the_other_tenants_cached(service: Service) -> None:
    await warm(service)

    await invalidate_namespace("tenant_config", tenant_id="3")

    for tenant in TENANTS:
        expected = "MISS" if tenant == "3" else "HIT"
        assert await cache_header(service, "/config", tenant) == expected


async def test_invalidating_one_user_leaves_the_tenants_other_users_cached(
    service: Service,
) -> None:
    users = [f"user{n}" for n in range(8)]
    for user in users:
        await service.get("/me", "7", user)

    await invalidate_namespace("profile", tenant_id="7", user_id="user5")

    for user in users:
        expected = "MISS" if user == "user5" else "HIT"
        assert await cache_header(service, "/me", "7", user) == expected


async def test_two_prefixes_on_one_cluster_never_touch_each_others_entries(
    service: Service, redis_cluster_url: str
) -> None:
    theirs = "other-cache:tenant_config:tenant_1:/config:d41d8cd98f00b204e9800998ecf8427e"
    other = RedisStore(RedisCluster.from_url(redis_cluster_url), "other-cache")
    try:
        await other.set(theirs, b"theirs", 60, CacheScope("tenant_config", "1"))
        await invalidate_namespace("tenant_config")
        assert (await other.get_with_ttl(theirs))[1] == b"theirs"

        await warm(service)
        assert await other.invalidate(InvalidationTarget("tenant_config")) == 1
        await other.clear()
    finally:
        await other.aclose()
    for tenant in TENANTS:
        assert await cache_header(service, "/config", tenant) == "HIT"


async def test_clear_removes_the_prefix_from_every_primary_and_nothing_else(
    service: Service, redis_cluster: LocalRedisCluster
) -> None:
    await warm(service)
    await warm(service, "/me")
    unrelated = [f"unrelated:{n}" for n in range(30)]
    for key in unrelated:
        await cluster_client().set(key, b"x")

    layer = current_layer()
    assert layer is not None
    removed = await layer.clear()

    assert removed >= 2 * len(TENANTS)
    assert await keys_of() == set()
    assert await keys_of("unrelated") == set(unrelated)


# -- resharding and failover -------------------------------------------------------------------


async def test_entries_are_still_read_and_invalidated_while_their_slot_migrates(
    service: Service, redis_cluster: LocalRedisCluster
) -> None:
    await warm(service)
    key = next(k for k in await keys_of() if k.startswith("test-cache:tenant_config:tenant_5:"))
    slot = redis_cluster.key_slot(key)
    source = redis_cluster.owner_of_slot(slot)
    target = next(p for p in redis_cluster.current_primaries() if p.port != source.port)
    source_id, target_id = redis_cluster.node_id(source), redis_cluster.node_id(target)
    bulk_text(target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id))
    bulk_text(source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id))
    bulk_text(source.command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", key))

    # Mid-migration the source answers ASK for the key: the client follows it.
    assert await cache_header(service, "/config", "5") == "HIT"

    for node in redis_cluster.current_primaries():
        bulk_text(node.command("CLUSTER", "SETSLOT", slot, "NODE", target_id))
    # The slot now belongs to the target: MOVED, and the client learns the new owner.
    assert await cache_header(service, "/config", "5") == "HIT"

    service.versions["config"] = 2
    await invalidate_namespace("tenant_config", tenant_id="5")
    response = await service.get("/config", "5")
    assert response.headers["X-FastAPI-Cache"] == "MISS"
    assert response.json() == {"version": 2}
    assert cache_status().backend == "redis"


async def test_an_invalidation_follows_its_generation_to_the_node_importing_it(
    service: Service, redis_cluster: LocalRedisCluster
) -> None:
    """Mid-migration, with the generation already on the importing node (``ASK``) and several
    pooled connections to that node, an invalidation is applied at once: no replica goes on
    serving the entry, and this one does not take the redirect for an outage."""
    await warm(service)
    generation = "test-cache:#gen:{tenant_config}:t:5"
    assert generation in await keys_of()
    slot = redis_cluster.key_slot(generation)
    source = redis_cluster.owner_of_slot(slot)
    target = next(p for p in redis_cluster.current_primaries() if p.port != source.port)
    source_id, target_id = redis_cluster.node_id(source), redis_cluster.node_id(target)
    bulk_text(target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id))
    bulk_text(source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id))
    source_admin = Redis(host=source.host, port=source.port)
    await source_admin.execute_command(
        "MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", generation
    )
    # Concurrent reads open several connections to every node, the importing one included.
    await asyncio.gather(*(service.get("/config", tenant) for tenant in TENANTS * 3))

    service.versions["config"] = 2
    await invalidate_namespace("tenant_config", tenant_id="5")
    assert cache_status().backend == "redis"
    assert (await service.get("/config", "5")).json() == {"version": 2}
    # The rest of the slot (the namespace's other generations, its indexes), then its owner.
    while keys := await source_admin.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        await source_admin.execute_command(
            "MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys
        )
    for node in redis_cluster.current_primaries():
        bulk_text(node.command("CLUSTER", "SETSLOT", slot, "NODE", target_id))
    assert (await service.get("/config", "5")).json() == {"version": 2}
    assert cache_status().backend == "redis"
    await source_admin.aclose()


@pytest.mark.every_event_loop
async def test_connections_closed_under_running_commands_answer_from_the_handler(
    service: Service,
) -> None:
    """redis-py's cluster client closes every node's connections when a command meets
    ``CLUSTERDOWN`` (a failing node), also those another request is sending on at that moment,
    which then fails inside redis-py (``'NoneType' object has no attribute 'writelines'``), or
    under uvloop inside the transport (``RuntimeError: ... the handler is closed``), rather than
    with a Redis error. Every request still gets its answer from the handler."""
    await warm(service)
    client = cluster_client()

    async def close_under_them() -> None:
        await asyncio.sleep(0.001)
        await client.aclose()

    for _ in range(5):
        service.versions["config"] += 1
        await invalidate_namespace("tenant_config")
        *responses, _ = await asyncio.gather(
            *(service.get("/config", tenant) for tenant in TENANTS * 3), close_under_them()
        )
        assert {r.status_code for r in responses} == {200}
    # Back on Redis before the cache is closed (the probe is not interrupted half-way).
    for _ in range(100):
        if cache_status().backend == "redis":
            break
        await asyncio.sleep(0.05)
    assert cache_status().backend == "redis"


async def test_an_invalidation_after_the_primaries_closed_the_idle_connections_still_applies(
    service: Service, redis_cluster: LocalRedisCluster
) -> None:
    """Connections that a primary closed while they sat idle in the pool (Redis's own idle
    ``timeout``, a NAT or load balancer that resets them; here ``CLIENT KILL``) are not an
    outage: the next invalidation is sent again on a new connection and applies, and the
    process stays on Redis. (Found by the model check's network faults on a cluster: the
    invalidation failed with ``Connection closed by server`` and the process degraded, its
    invalidation kept, while another process could still answer the old entry.)"""
    await warm(service)
    service.versions["config"] += 1
    await invalidate_namespace("tenant_config")  # the invalidation's connections, now pooled
    await warm(service)
    for node in redis_cluster.current_primaries():
        node.command("CLIENT", "KILL", "TYPE", "normal")
    service.versions["config"] += 1
    await invalidate_namespace("tenant_config")
    assert cache_status().backend == "redis", cache_status().reason
    assert (await service.get("/config", "5")).json() == {"version": 3}


async def test_a_manual_failover_keeps_the_entries_and_invalidation_still_reaches_them(
    service: Service, redis_cluster: LocalRedisCluster
) -> None:
    await warm(service)
    key = next(k for k in await keys_of() if k.startswith("test-cache:tenant_config:tenant_2:"))
    primary = redis_cluster.owner_of_slot(redis_cluster.key_slot(key))
    replica = redis_cluster.replica_of(primary)

    bulk_text(replica.command("CLUSTER", "FAILOVER"))
    await wait_for(lambda: redis_cluster.role(replica) == "master")
    await asyncio.to_thread(redis_cluster.wait_until_healthy)

    for tenant in TENANTS:
        assert await cache_header(service, "/config", tenant) == "HIT"
    service.versions["config"] = 2
    await invalidate_namespace("tenant_config")
    for tenant in TENANTS:
        assert (await service.get("/config", tenant)).json() == {"version": 2}
    assert cache_status().backend == "redis"


async def test_a_killed_primary_fails_open_and_its_promoted_replica_gets_no_stale_entries(
    service: Service, redis_cluster: LocalRedisCluster
) -> None:
    await warm(service)
    key = next(k for k in await keys_of() if k.startswith("test-cache:tenant_config:tenant_4:"))
    primary = redis_cluster.owner_of_slot(redis_cluster.key_slot(key))
    replica = redis_cluster.replica_of(primary)
    await asyncio.sleep(0.2)  # the entries reach the replica (asynchronous replication)

    primary.kill()
    try:
        # Until the replica takes over: every answer correct, none slow.
        service.versions["config"] = 2
        await invalidate_namespace("tenant_config")
        deadline = time.monotonic() + 20
        while redis_cluster.role(replica) != "master":
            assert time.monotonic() < deadline, "the replica was never promoted"
            for tenant in ("4", "5"):
                started = time.monotonic()
                response = await service.get("/config", tenant)
                assert time.monotonic() - started < REQUEST_BOUND_SECONDS
                assert response.status_code == 200
                assert response.json() == {"version": 2}
        await asyncio.to_thread(redis_cluster.wait_until_healthy)

        # The cache returns to the cluster, and the invalidation made during the outage was
        # applied first: the promoted replica's copy of version 1 is never served.
        await wait_for(lambda: cache_status().backend == "redis", within=15)
        for tenant in TENANTS:
            response = await service.get("/config", tenant)
            assert response.json() == {"version": 2}
    finally:
        primary.start()  # rejoins as a replica of the promoted node
        await asyncio.to_thread(redis_cluster.wait_until_healthy)


async def wait_for(condition: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)
