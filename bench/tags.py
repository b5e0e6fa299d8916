"""Tags: what invalidating a tag costs as the entries carrying it grow, and what tags cost a hit.

- **Invalidation**: ``invalidate_tags(tag)`` of a tag carried by 1, 1,000 and 100,000 entries
  (filled through the cache layer's own read-then-fill, in 20 namespaces and 100 tenants), the
  caller's wait and the Redis stall: the longest round trip of a second client in its own process
  PINGing Redis in a tight loop meanwhile (``idle PING max``: the same monitor with nothing
  running, this machine's noise). Each round is checked: a sample of the entries misses after it.
- **Hits**: requests per second of three routes served side by side from one FastAPI app
  in-process (``httpx.ASGITransport``), their entries carrying 0, 1 and 3 tags, warmed first so
  every measured request is a HIT; on Redis with the near cache (the default), without it
  (every hit one ``MGET`` of the entry and its generations: 3 keys with no tag, 6 with one, 12
  with three), and on a Redis Cluster of 3 primaries (tagged entries are read through redis-py,
  each slot's generations at once). The routes' order rotates every round; the ratio to the
  untagged route is the median of each round's ratio.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench._common import fmt_ratio, median, ping_monitor

ENTRY_COUNTS = (1, 1_000, 100_000)
QUICK_ENTRY_COUNTS = (1, 1_000, 10_000)
NAMESPACES = 20
TENANTS = 100
TAG = "insight:7"
#: Entries filled at once (each a read, a generation check and a fill), within the pool of
#: REDIS_MAX_CONNECTIONS (100): a fill that finds no free connection is skipped.
FILL_CONCURRENCY = 64
#: Passes over the entries a fill skipped.
FILL_ATTEMPTS = 5
#: Entries read back after each invalidation: every one must miss.
CHECKED_AFTER = 200
TAG_COUNTS = (0, 1, 3)


async def _fill_tagged(count: int, epoch: int) -> list[Any]:
    """``count`` entries carrying TAG, filled as a route fills them; their keys."""
    from commons.cache.scope import CacheScope, ScopedKey
    from commons.testing import current_layer
    from commons.testing.entries import fill

    layer = current_layer()
    assert layer is not None
    keys = []
    for n in range(count):
        namespace, tenant = f"ns{n % NAMESPACES}", str(n % TENANTS)
        text = f"{layer.prefix}:{namespace}:tenant_{tenant}:/r/{epoch}/{n}:0"
        keys.append(ScopedKey(text, CacheScope(namespace, tenant, None, (TAG, f"item:{n}"))))
    missing = keys
    for _ in range(FILL_ATTEMPTS):
        left = []
        for start in range(0, len(missing), FILL_CONCURRENCY):
            batch = missing[start : start + FILL_CONCURRENCY]
            stored = await asyncio.gather(*(fill(key, b'{"v":1}', 3600) for key in batch))
            left += [key for key, value in zip(batch, stored, strict=True) if value is None]
        if not left:
            return keys
        # A timeout on a loaded machine skips a fill (and may degrade the cache for a moment).
        missing = left
        await asyncio.sleep(1)
    raise RuntimeError(f"{len(missing)} of {count:,} entries not stored")


async def _invalidation_rounds(
    host: str, port: int, counts: tuple[int, ...], rounds: int
) -> dict[int, dict[str, float]]:
    from commons.cache import cache_status, invalidate_tags
    from commons.testing.entries import served

    measured: dict[int, dict[str, float]] = {}
    for count in counts:
        waits, stalls, idles = [], [], []
        for round_index in range(rounds):
            keys = await _fill_tagged(count, round_index)
            sample = keys[:: max(1, len(keys) // CHECKED_AFTER)]
            assert cache_status().backend == "redis", cache_status()
            assert all([await served(key) is not None for key in sample]), "not warm"
            with ping_monitor(host, port) as stats:
                started = time.perf_counter()
                await invalidate_tags(TAG)
                waited = time.perf_counter() - started
            assert not any([await served(key) is not None for key in sample]), "served after"
            with ping_monitor(host, port) as idle:
                await asyncio.sleep(max(waited, 0.002))
            waits.append(waited * 1000)
            stalls.append(stats["max_ms"])
            idles.append(idle["max_ms"])
        measured[count] = {
            "caller_ms": median(waits),
            "caller_ms_worst": max(waits),
            "stall_ms": median(stalls),
            "stall_ms_worst": max(stalls),
            "idle_ms": median(idles),
        }
    return measured


def _hit_app() -> Any:
    from fastapi import FastAPI

    from commons.cache import cache, global_cache_key_builder

    app = FastAPI()
    for count in TAG_COUNTS:
        tags = [f"tag{n}:{{rid}}" for n in range(count)] or None

        async def item(rid: str) -> dict[str, object]:
            return {"rid": rid, "rows": list(range(20))}

        cached = cache(namespace=f"tags{count}", key_builder=global_cache_key_builder, tags=tags)
        app.get(f"/{count}/{{rid}}")(cached(item))
    return app


async def _hit_rates(settings: Any, requests: int, rounds: int) -> dict[int, dict[str, float]]:
    import httpx

    from commons.cache import close_cache, init_cache

    app = _hit_app()
    await init_cache(settings)
    rates: dict[int, list[float]] = {count: [] for count in TAG_COUNTS}
    ratios: dict[int, list[float]] = {count: [] for count in TAG_COUNTS}
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for count in TAG_COUNTS:
                for _ in range(3):
                    await client.get(f"/{count}/r1")
                answer = await client.get(f"/{count}/r1")
                assert answer.headers["X-FastAPI-Cache"] == "HIT", answer.headers
            for round_index in range(rounds):
                order = TAG_COUNTS[round_index % 3 :] + TAG_COUNTS[: round_index % 3]
                this_round = {}
                for count in order:
                    started = time.perf_counter()
                    for _ in range(requests):
                        answer = await client.get(f"/{count}/r1")
                        if answer.headers["X-FastAPI-Cache"] != "HIT":
                            raise RuntimeError(f"/{count}/r1: {answer.headers}")
                    this_round[count] = requests / (time.perf_counter() - started)
                for count in TAG_COUNTS:
                    rates[count].append(this_round[count])
                    ratios[count].append(this_round[count] / this_round[0])
    finally:
        await close_cache()
    return {
        count: {"rps": median(rates[count]), "ratio": median(ratios[count])} for count in TAG_COUNTS
    }


async def _run(quick: bool) -> dict[str, Any]:
    from commons.cache import close_cache, init_cache
    from commons.cache.settings import CacheSettings
    from commons.testing.redis_cluster import LocalRedisCluster
    from commons.testing.redis_server import RedisServer

    rounds = 1 if quick else 3
    requests = 200 if quick else 2_000
    counts = QUICK_ENTRY_COUNTS if quick else ENTRY_COUNTS
    with RedisServer() as server:
        # Filling 100,000 entries keeps a shared machine busy: a generous time budget, so that
        # no command times out and the cache stays on Redis throughout.
        patient = CacheSettings(
            REDIS_URL=server.url, CACHE_PREFIX="bench", REDIS_SOCKET_TIMEOUT_SECONDS=5
        )
        await init_cache(patient)
        try:
            invalidation = await _invalidation_rounds(server.host, server.port, counts, rounds)
        finally:
            await close_cache()
        await asyncio.to_thread(server.command, "FLUSHALL")
        hits = {
            "Redis, near cache": await _hit_rates(
                CacheSettings(REDIS_URL=server.url, CACHE_PREFIX="bench"), requests, rounds
            ),
            "Redis, no near cache": await _hit_rates(
                CacheSettings(REDIS_URL=server.url, CACHE_PREFIX="bench", CACHE_NEAR_CACHE=False),
                requests,
                rounds,
            ),
        }
    with LocalRedisCluster() as cluster:
        hits["Redis Cluster, 3 primaries"] = await _hit_rates(
            CacheSettings(REDIS_URL=cluster.url, CACHE_PREFIX="bench"), requests, rounds
        )
    return _result(invalidation, hits, rounds, requests)


def _result(
    invalidation: dict[int, dict[str, float]],
    hits: dict[str, dict[int, dict[str, float]]],
    rounds: int,
    requests: int,
) -> dict[str, Any]:
    blank = ["", "", ""]
    rows: list[list[Any]] = [
        [
            f"invalidate a tag carried by {count:,} entr{'y' if count == 1 else 'ies'}",
            round(m["caller_ms"], 2),
            round(m["stall_ms"], 2),
            round(m["idle_ms"], 2),
            *blank,
        ]
        for count, m in invalidation.items()
    ]
    smallest, largest = invalidation[min(invalidation)], invalidation[max(invalidation)]
    growth = largest["caller_ms"] / smallest["caller_ms"]
    for where, rates in hits.items():
        rows.append(
            [
                f"hits, {where} (req/s; ratio to no tag)",
                "",
                "",
                "",
                *(
                    f"{rates[count]['rps']:,.0f} ({fmt_ratio(rates[count]['ratio'])})"
                    for count in TAG_COUNTS
                ),
            ]
        )
    notes = (
        f"Median of {rounds} round(s). Invalidation: the caller's wait for invalidate_tags() and "
        "the longest PING round trip of a second client (own process) meanwhile; worst rounds: "
        + "; ".join(
            f"{count:,} entries {m['caller_ms_worst']:.2f} ms wait / {m['stall_ms_worst']:.2f} "
            "ms stall"
            for count, m in invalidation.items()
        )
        + f". The wait at {max(invalidation):,} entries is {growth:.2f}x the wait at "
        f"{min(invalidation):,}: one UNLINK of the tag's generation, whatever the entries (which "
        "are not removed: they expire with their time to live). Hits: "
        f"{requests:,} requests per route and round, one at a time, in-process through FastAPI; "
        "an entry with k tags depends on 3 + 3k generations at user scope, here 1 + k "
        "(global entries). On a cluster a tagged entry is read as an untagged one, per primary "
        "(the entry, then each slot's generations at once), and held by the primaries' near "
        "caches."
    )
    return {
        "name": "tags",
        "title": "Tags: invalidating a tag by entries carrying it; hits with 0 / 1 / 3 tags",
        "columns": [
            "case",
            "caller's wait (ms)",
            "Redis PING stall (ms)",
            "idle PING max (ms)",
            "0 tags",
            "1 tag",
            "3 tags",
        ],
        "rows": rows,
        "notes": notes,
        "chart": {
            "type": "bar",
            "labels": list(hits),
            "series": {
                f"{count} tag{'s' if count != 1 else ''}": [
                    rates[count]["rps"] for rates in hits.values()
                ]
                for count in TAG_COUNTS
            },
            "unit": "req/s",
        },
        "data": {
            "invalidation": {str(count): m for count, m in invalidation.items()},
            "hits": {
                where: {str(count): r for count, r in rates.items()}
                for where, rates in hits.items()
            },
        },
    }


def run(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(_run(quick))


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
