"""Redis Cluster beside one node: hit throughput, invalidation time and outage latency, in one run.

Both topologies are private processes on loopback started here: one ``redis-server``, and a
cluster of 3 primaries with a replica each. The same :class:`RedisStore` code runs on both (the
cluster client is chosen by detection, as in a service). *Hits* are ``get_with_ttl`` calls on
cached entries from 64 concurrent tasks in one process; *invalidation* removes one namespace of
entries spread over many tenants (and so over every slot and primary on the cluster). On one
machine the cluster's primaries share its cores, so the cluster is not expected to be faster here:
the numbers show what cluster routing costs a single client, not what sharding buys in production.
*Outage*: a cached GET through a FastAPI app (the route of ``bench/outage.py``, ``init_cache()``
with its default settings), in a row, while every server of the topology is black-holed (SIGSTOP).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bench._common import fmt_ratio, median, ratio

if TYPE_CHECKING:
    from commons.testing.redis_server import RedisServer

PREFIX = "bench-cache"
NAMESPACE = "reports"
TENANTS = 50
CONCURRENCY = 64
#: Cached GETs in a row while every node is black-holed, and what counts as a GET that waited.
OUTAGE_GETS = 40
SLOW_MS = 100
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


async def _measure(
    url: str, entries: int, hits: int, rounds: int, *, near: bool
) -> dict[str, float]:
    from commons.cache.backends.factory import redis_store
    from commons.cache.events import CacheEvents
    from commons.cache.scope import CacheScope, InvalidationTarget
    from commons.cache.settings import CacheSettings

    # Generous timeouts: this measures throughput on a shared machine, not fail-open behaviour.
    settings = CacheSettings(  # type: ignore[call-arg]
        REDIS_URL=url,
        CACHE_PREFIX=PREFIX,
        REDIS_SOCKET_TIMEOUT_SECONDS=5.0,
        REDIS_CONNECT_TIMEOUT_SECONDS=5.0,
    )
    # serving: a service's store, with the near cache (per primary on the cluster).
    store = redis_store(settings, serving=CacheEvents() if near else None)
    await store.ping()
    keys = _keys(entries)

    async def fill() -> None:
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def put(key: str, tenant: str) -> None:
            async with semaphore:
                # As the layer fills: the scope's generations, then the entry under them.
                scope = CacheScope(NAMESPACE, tenant)
                await store.write(key, VALUE, 600, scope, await store.generation(scope))

        await asyncio.gather(*(put(key, tenant) for key, tenant in keys))

    throughput, invalidation = [], []
    per_task = hits // CONCURRENCY
    try:
        for _ in range(rounds):
            await fill()

            async def reader(offset: int) -> None:
                for i in range(per_task):
                    key, tenant = keys[(offset * per_task + i) % len(keys)]
                    read = await store.read(key, CacheScope(NAMESPACE, tenant))
                    assert read.value is not None, key
                    assert read.generation is not None, key

            if near:
                # Each entry once, so that the timed reads are the near cache's hits.
                await asyncio.sleep(0.2)  # the primaries' subscribed connections
                await asyncio.gather(*(reader(n) for n in range(CONCURRENCY)))
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


async def _black_holed(url: str, servers: Sequence[RedisServer], gets: int) -> dict[str, float]:
    """Cached GETs in a row while every one of ``servers`` is stopped (SIGSTOP): latencies in ms."""
    import httpx

    from bench.outage import _get, _make_app
    from commons.cache import CacheSettings, cache_status, close_cache, init_cache
    from commons.cache.backends.redis.near import SILENCE_LIMIT_SECONDS

    await init_cache(CacheSettings(REDIS_URL=url, CACHE_PREFIX=PREFIX))  # the default settings
    try:
        transport = httpx.ASGITransport(app=_make_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            await http.get("/v1/tenant/config")
            warm = await http.get("/v1/tenant/config")
            if warm.headers.get("X-FastAPI-Cache") != "HIT":
                raise RuntimeError("the entry was not cached before the outage")
            for server in servers:
                server.pause()
            try:
                # On one server the near cache answers what it holds until its silence limit;
                # the measured GETs are those after it, which Redis would have to answer.
                await asyncio.sleep(SILENCE_LIMIT_SECONDS + 0.2)
                latencies = [await _get(http) for _ in range(gets)]  # each checks a 200 and body
                state = cache_status().backend
            finally:
                for server in servers:
                    server.resume()
    finally:
        await close_cache()
    if state != "degraded":
        raise RuntimeError(f"the breaker did not open during the outage ({state})")
    ms = [seconds * 1000 for seconds in latencies]
    waited = [each for each in ms if each >= SLOW_MS]
    return {
        "p50_ms": median(ms),
        "max_ms": max(ms),
        "slow": float(len(waited)),
        "waited_ms": sum(waited),
    }


async def _run(quick: bool) -> dict[str, Any]:
    from commons.testing.redis_cluster import LocalRedisCluster
    from commons.testing.redis_server import RedisServer

    entries, hits, rounds = (1_000, 6_400, 2) if quick else (5_000, 32_000, 3)
    gets = 20 if quick else OUTAGE_GETS
    with RedisServer() as single:
        one = await _measure(single.url, entries, hits, rounds, near=True)
        one_off = await _measure(single.url, entries, hits, rounds, near=False)
        one_down = await _black_holed(single.url, [single], gets)
    with LocalRedisCluster(primaries=3, replicas_per_primary=1) as cluster:
        three = await _measure(cluster.url, entries, hits, rounds, near=True)
        three_off = await _measure(cluster.url, entries, hits, rounds, near=False)
        three_down = await _black_holed(cluster.url, cluster.nodes, gets)
    assert three["cluster"] == 1.0
    assert one["cluster"] == 0.0
    outage = f"cached GET while every node is black-holed, {gets} in a row"
    return {
        "name": "cluster",
        "title": "Redis Cluster (3 primaries + 3 replicas) beside one node",
        "columns": ["measure", "one node", "cluster", "cluster / one node"],
        "rows": [
            [
                f"hits/s ({CONCURRENCY} concurrent readers, one process), near cache on",
                round(one["hits_per_s"]),
                round(three["hits_per_s"]),
                fmt_ratio(ratio(three["hits_per_s"], one["hits_per_s"])),
            ],
            [
                f"hits/s ({CONCURRENCY} concurrent readers, one process), near cache off",
                round(one_off["hits_per_s"]),
                round(three_off["hits_per_s"]),
                fmt_ratio(ratio(three_off["hits_per_s"], one_off["hits_per_s"])),
            ],
            [
                f"invalidate a namespace of {entries:,} entries ({TENANTS} tenants), ms",
                round(one["invalidate_ms"], 1),
                round(three["invalidate_ms"], 1),
                fmt_ratio(ratio(three["invalidate_ms"], one["invalidate_ms"])),
            ],
            *(
                [
                    f"{outage}: {label}",
                    round(one_down[field], 2),
                    round(three_down[field], 2),
                    fmt_ratio(ratio(three_down[field], one_down[field])),
                ]
                for label, field in (
                    ("p50, ms", "p50_ms"),
                    ("max, ms", "max_ms"),
                    (f"GETs that took {SLOW_MS} ms or more", "slow"),
                    ("time those GETs took, ms", "waited_ms"),
                )
            ),
        ],
        "notes": (
            f"Median of {rounds} rounds; the same RedisStore on both, the cluster client chosen by "
            "detection; hits are reads of an entry and its scope's generations (RedisStore.read), "
            "with the near cache (the default; per primary on the cluster) and without it (one "
            "MGET per hit on one node, two on the cluster, each on its slot's primary's "
            "pipelined connection). All processes share this machine's cores, so the cluster "
            "cannot show the capacity that separate hosts give it; the ratio is the client-side "
            "cost of cluster routing (per-slot UNLINK on invalidation, two reads per hit). Outage: "
            "init_cache() with the default settings (0.5 s timeouts, breaker after 3 failures); "
            "every GET answered 200 with the handler's body, and the breaker was open at the end. "
            "The GETs that took long are those before the breaker opened, each waiting one "
            "timeout."
        ),
    }


def run(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(_run(quick))


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
