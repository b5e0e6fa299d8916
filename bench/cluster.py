"""Redis Cluster beside one node: hit throughput and invalidation time, in one run.

Both topologies are private processes on loopback started here: one ``redis-server``, and a
cluster of 3 primaries with a replica each. The same :class:`RedisStore` code runs on both (the
cluster client is chosen by detection, as in a service). *Hits* are ``get_with_ttl`` calls on
cached entries from 64 concurrent tasks in one process; *invalidation* removes one namespace of
entries spread over many tenants (and so over every slot and primary on the cluster). On one
machine the cluster's primaries share its cores, so the cluster is not expected to be faster here:
the numbers show what cluster routing costs a single client, not what sharding buys in production.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench._common import fmt_ratio, median, ratio

PREFIX = "bench-cache"
NAMESPACE = "reports"
TENANTS = 50
CONCURRENCY = 64
VALUE = b'{"rows":[' + b",".join(b'{"id":%d,"v":"x"}' % i for i in range(20)) + b"]}"


def _keys(entries: int) -> list[tuple[str, str]]:
    return [
        (
            f"{PREFIX}:{NAMESPACE}:tenant_{i % TENANTS}:/reports/{i}:"
            "d41d8cd98f00b204e9800998ecf8427e",
            str(i % TENANTS),
        )
        for i in range(entries)
    ]


async def _measure(url: str, entries: int, hits: int, rounds: int) -> dict[str, float]:
    from commons.cache.backends.redis import RedisStore
    from commons.cache.connection import cluster_client_factory, create_redis_client
    from commons.cache.scope import CacheScope, InvalidationTarget
    from commons.cache.settings import CacheSettings

    # Generous timeouts: this measures throughput on a shared machine, not fail-open behaviour.
    settings = CacheSettings(  # type: ignore[call-arg]
        REDIS_URL=url,
        CACHE_PREFIX=PREFIX,
        REDIS_SOCKET_TIMEOUT_SECONDS=5.0,
        REDIS_CONNECT_TIMEOUT_SECONDS=5.0,
    )
    store = RedisStore(
        create_redis_client(settings), PREFIX, cluster_factory=cluster_client_factory(settings)
    )
    await store.ping()
    keys = _keys(entries)

    async def fill() -> None:
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def put(key: str, tenant: str) -> None:
            async with semaphore:
                await store.set(key, VALUE, 600, CacheScope(NAMESPACE, tenant))

        await asyncio.gather(*(put(key, tenant) for key, tenant in keys))

    throughput, invalidation = [], []
    per_task = hits // CONCURRENCY
    try:
        for _ in range(rounds):
            await fill()

            async def reader(offset: int) -> None:
                for i in range(per_task):
                    key = keys[(offset * per_task + i) % len(keys)][0]
                    assert (await store.get_with_ttl(key))[1] is not None

            started = time.perf_counter()
            await asyncio.gather(*(reader(n) for n in range(CONCURRENCY)))
            throughput.append(per_task * CONCURRENCY / (time.perf_counter() - started))

            started = time.perf_counter()
            removed = await store.invalidate(InvalidationTarget(NAMESPACE))
            invalidation.append((time.perf_counter() - started) * 1000)
            assert removed == entries, (removed, entries)
    finally:
        await store.aclose()
    return {
        "hits_per_s": median(throughput),
        "invalidate_ms": median(invalidation),
        "cluster": float(store.is_cluster),
    }


async def _run(quick: bool) -> dict[str, Any]:
    from commons.testing.redis_cluster import LocalRedisCluster
    from commons.testing.redis_server import RedisServer

    entries, hits, rounds = (1_000, 6_400, 2) if quick else (5_000, 32_000, 3)
    with RedisServer() as single:
        one = await _measure(single.url, entries, hits, rounds)
    with LocalRedisCluster(primaries=3, replicas_per_primary=1) as cluster:
        three = await _measure(cluster.url, entries, hits, rounds)
    assert three["cluster"] == 1.0
    assert one["cluster"] == 0.0
    return {
        "name": "cluster",
        "title": "Redis Cluster (3 primaries + 3 replicas) beside one node",
        "columns": ["measure", "one node", "cluster", "cluster / one node"],
        "rows": [
            [
                f"hits/s ({CONCURRENCY} concurrent readers, one process)",
                round(one["hits_per_s"]),
                round(three["hits_per_s"]),
                fmt_ratio(ratio(three["hits_per_s"], one["hits_per_s"])),
            ],
            [
                f"invalidate a namespace of {entries:,} entries ({TENANTS} tenants), ms",
                round(one["invalidate_ms"], 1),
                round(three["invalidate_ms"], 1),
                fmt_ratio(ratio(three["invalidate_ms"], one["invalidate_ms"])),
            ],
        ],
        "notes": (
            f"Median of {rounds} rounds; the same RedisStore on both, the cluster client chosen by "
            "detection. All processes share this machine's cores, so the cluster cannot show the "
            "capacity that separate hosts give it; the ratio is the client-side cost of cluster "
            "routing (per-slot UNLINK on invalidation, slot lookup on every command)."
        ),
    }


def run(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(_run(quick))


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
