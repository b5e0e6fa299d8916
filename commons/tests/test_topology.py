"""One object per Redis topology: the store picks it from its client, and a read on one server
never runs a line of cluster code."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from commons.cache.backends.factory import redis_store
from commons.cache.backends.redis import RedisStore
from commons.cache.backends.redis.cluster import OnCluster
from commons.cache.backends.redis.connection import create_redis_client
from commons.cache.backends.redis.one_server import OneServer
from commons.cache.backends.redis.read_channel import encode_command
from commons.cache.backends.redis.sentinel import BehindSentinel
from commons.cache.events import CacheEvents
from commons.cache.scope import CacheScope
from commons.cache.settings import CacheSettings

PREFIX = "topology"
SCOPE = CacheScope("reports", "t1")
KEY = f"{PREFIX}:reports:tenant_t1:/r:d41d8cd98f00b204e9800998ecf8427e"
PACKAGE = Path(RedisStore.__module__.replace(".", "/")).parent.as_posix()


def modules_run_by(calls: list[str]) -> set[str]:
    """The Redis package's modules whose code ran, by file name."""
    return {Path(name).name for name in calls if PACKAGE in Path(name).as_posix()}


async def traced_read(store: RedisStore) -> set[str]:
    """The package's modules that one ``read`` ran code of."""
    calls: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            calls.append(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        await store.read(KEY, SCOPE)
    finally:
        sys.setprofile(None)
    return modules_run_by(calls)


@pytest.mark.parametrize("near_cache", [True, False], ids=["near-cache", "no-near-cache"])
async def test_a_read_on_one_server_never_runs_cluster_code(
    redis_url: str, near_cache: bool
) -> None:
    settings = CacheSettings(  # type: ignore[call-arg]
        REDIS_URL=redis_url, CACHE_PREFIX=PREFIX, CACHE_NEAR_CACHE=near_cache
    )
    store = redis_store(settings, serving=CacheEvents())
    try:
        await store.ping()  # the first contact: REDIS_CLUSTER=auto finds no cluster
        assert isinstance(store.topology, OneServer)
        generation = await store.generation(SCOPE)
        assert await store.write(KEY, b"body", 60, SCOPE, generation)

        first, again = await traced_read(store), await traced_read(store)

        assert first & {"cluster.py", "cluster_reads.py"} == set()
        assert again & {"cluster.py", "cluster_reads.py"} == set()
        assert "one_server.py" in first
    finally:
        await store.aclose()


async def test_a_one_server_client_gets_the_one_server_topology(redis_url: str) -> None:
    store = RedisStore(Redis.from_url(redis_url), PREFIX)
    try:
        assert isinstance(store.topology, OneServer)
        assert not store.is_cluster
    finally:
        await store.aclose()


async def test_a_client_of_sentinels_master_gets_the_sentinel_topology() -> None:
    settings = CacheSettings(  # type: ignore[call-arg]
        REDIS_URL="redis://unused", REDIS_SENTINELS="127.0.0.1:1", REDIS_SENTINEL_MASTER="cache"
    )
    # Nothing is sent to the Sentinels until the store is used.
    store = RedisStore(create_redis_client(settings), PREFIX)
    try:
        assert isinstance(store.topology, BehindSentinel)
        assert store.near_cache is None
    finally:
        await store.aclose()


@pytest.mark.slow
async def test_a_cluster_client_gets_the_cluster_topology(redis_cluster_url: str) -> None:
    store = RedisStore(RedisCluster.from_url(redis_cluster_url), PREFIX)
    try:
        assert isinstance(store.topology, OnCluster)
        assert store.is_cluster
    finally:
        await store.aclose()


@pytest.mark.slow
async def test_auto_mode_replaces_the_one_server_topology_when_it_meets_a_cluster_node(
    redis_cluster_url: str,
) -> None:
    settings = CacheSettings(REDIS_URL=redis_cluster_url, CACHE_PREFIX=PREFIX)  # type: ignore[call-arg]
    store = redis_store(settings, serving=CacheEvents())
    try:
        assert isinstance(store.topology, OneServer)

        await store.ping()

        assert isinstance(store.topology, OnCluster)
        assert store.is_cluster
    finally:
        await store.aclose()


async def test_a_read_asks_for_its_own_scope_s_generations_whichever_scope_was_read_before(
    redis_url: str,
) -> None:
    # The read's encoded generations are remembered by the scope's fields: scopes that differ in
    # any one of them never share them. A new field of CacheScope must join that memo's key.
    assert [field.name for field in dataclasses.fields(CacheScope)] == [
        "namespace",
        "tenant_id",
        "user_id",
        "tags",
    ]
    scopes = [
        SCOPE,
        CacheScope("other", "t1"),
        CacheScope("reports", "t2"),
        CacheScope("reports", "t1", "u1"),
        CacheScope("reports", "t1", None, ("tag",)),
    ]
    store = RedisStore(Redis.from_url(redis_url), PREFIX)
    try:
        topology = store.topology
        assert isinstance(topology, OneServer)
        for scope in [*scopes, *reversed(scopes)]:
            read_keys = topology.read_keys(KEY, scope)

            assert topology._read_command(KEY, scope) == (
                encode_command(b"MGET", read_keys),
                len(read_keys),
            )
    finally:
        await store.aclose()
