"""What the near cache's tracking costs Redis: ours (broadcast tracking of the generation keys'
prefix) beside the default mode it replaced (every key each connection read is tracked).

One private redis-server holds 100,000 entries of one namespace over 100 tenants. Each
"process" is a store of its own (its own read and subscribed connections, so Redis sees another
tracking client); it reads every entry once. Measured from Redis' ``INFO``: ``tracking_total_items``
(what the per-key tracking table holds) and ``used_memory`` above what the same server used
before the reads, for 1, 2 and 4 processes; then after ten restarts of one process reading 10,000
entries (each closes its connections before the next starts), with no process left; and, with
``tracking-table-max-keys 1000`` below 10,000 entries read, the share of a second pass answered
from the near cache and the invalidation messages received. Both modes run in the same process,
one after the other on a flushed server, the default mode by a near cache that asks for it.
"""

from __future__ import annotations

import asyncio
from typing import Any

NAMESPACE = "reports"
TENANTS = 100
PREFIX = "bench-tracking"
VALUE = b"x" * 200


def _entry(n: int) -> tuple[str, Any]:
    from commons.cache.scope import CacheScope

    tenant = str(n % TENANTS)
    return f"{PREFIX}:{NAMESPACE}:tenant_{tenant}:/r/{n}:0", CacheScope(NAMESPACE, tenant)


def _near_cache_class(mode: str) -> Any:
    from commons.cache.backends.redis.near import NearCache
    from commons.cache.backends.redis.pipelined_reads import encode_command

    if mode == "ours":
        return NearCache

    class DefaultModeNearCache(NearCache):
        """Tracks as before: every key each read connection read (``CLIENT TRACKING ON``)."""

        def tracking_command(self) -> tuple[int, tuple[bytes, ...]] | None:
            ours = super().tracking_command()
            subscriber = self.tracking._subscriber
            if ours is None or subscriber is None:
                return None
            command = encode_command(
                b"CLIENT", ["TRACKING", "ON", "REDIRECT", str(subscriber.client_id)]
            )
            return ours[0], (command,)

    return DefaultModeNearCache


class _Counts:
    """The near cache's events a pass needs: hits and invalidation messages."""

    def __init__(self) -> None:
        from commons.cache.events import CacheEvents

        counts = self

        class Events(CacheEvents):
            def near_cache_hit(self, namespace: str) -> None:
                counts.hits += 1

            def near_cache_invalidation(self, keys: int) -> None:
                counts.messages += 1

        self.hits = 0
        self.messages = 0
        self.events = Events()


async def _open_store(url: str, mode: str, counts: _Counts | None = None) -> Any:
    from redis.asyncio import Redis

    from commons.cache.backends.redis import RedisStore

    near = _near_cache_class(mode)(
        max_entries=200_000,
        max_bytes=1 << 30,
        events=(counts or _Counts()).events,
        max_age_seconds=3600,
    )
    store = RedisStore(Redis.from_url(url), PREFIX, near_cache=near)
    await store.ping()
    for _ in range(500):
        if near.live:
            break
        await store.read(*_entry(0))  # starts the subscribed connection
        await asyncio.sleep(0.01)
    return store


async def _read_all(store: Any, entries: int) -> None:
    for start in range(0, entries, 50):
        await asyncio.gather(*(store.read(*_entry(n)) for n in range(start, start + 50)))


async def _fill(client: Any, url: str, entries: int) -> None:
    await client.flushall()
    writer = await _open_store(url, "ours")
    try:
        for tenant in range(TENANTS):
            await writer.generation(_entry(tenant)[1])
    finally:
        await writer.aclose()
    for start in range(0, entries, 5_000):
        pipe = client.pipeline(transaction=False)
        for n in range(start, min(start + 5_000, entries)):
            pipe.set(_entry(n)[0], VALUE, ex=3600)
        await pipe.execute()


async def _server_cost(client: Any) -> tuple[int, int]:
    """(tracking_total_items, used_memory)."""
    stats = await client.info("stats")
    memory = await client.info("memory")
    return int(stats["tracking_total_items"]), int(memory["used_memory"])


async def _processes(client: Any, url: str, mode: str, processes: int, entries: int) -> dict:
    await _fill(client, url, entries)
    _, baseline = await _server_cost(client)
    stores = [await _open_store(url, mode) for _ in range(processes)]
    try:
        for store in stores:
            await _read_all(store, entries)
        items, used = await _server_cost(client)
    finally:
        for store in stores:
            await store.aclose()
    return {"items": items, "memory_mb": (used - baseline) / 1e6}


async def _restarts(client: Any, url: str, mode: str, restarts: int, entries: int) -> dict:
    await _fill(client, url, entries)
    _, baseline = await _server_cost(client)
    for _ in range(restarts):
        store = await _open_store(url, mode)
        await _read_all(store, entries)
        await store.aclose()
    await asyncio.sleep(0.2)  # the closed connections are gone on the server's side
    items, used = await _server_cost(client)
    clients = len(await client.client_list())
    return {"items": items, "memory_mb": (used - baseline) / 1e6, "clients_left": clients - 1}


async def _small_table(client: Any, url: str, mode: str, entries: int, table: int) -> dict:
    await _fill(client, url, entries)
    await client.config_set("tracking-table-max-keys", table)
    counts = _Counts()
    store = await _open_store(url, mode, counts)
    try:
        await _read_all(store, entries)
        hits, messages = counts.hits, counts.messages
        await _read_all(store, entries)
        share = (counts.hits - hits) / entries
        received = counts.messages - messages
    finally:
        await store.aclose()
        await client.config_set("tracking-table-max-keys", 0)
    return {"near_share": share, "messages": received}


async def _run(quick: bool) -> dict[str, Any]:
    from redis.asyncio import Redis

    from commons.testing.redis_server import RedisServer

    entries = 10_000 if quick else 100_000
    reader = 1_000 if quick else 10_000
    restarts = 3 if quick else 10
    table = reader // 10
    counts = [1, 2] if quick else [1, 2, 4]
    modes = ("default mode", "ours")
    results: dict[str, dict[str, Any]] = {mode: {} for mode in modes}
    with RedisServer() as server:
        client = Redis.from_url(server.url)
        try:
            for n in counts:
                for mode in modes:
                    results[mode][f"{n} processes"] = await _processes(
                        client, server.url, mode, n, entries
                    )
            for mode in modes:
                results[mode]["restarts"] = await _restarts(
                    client, server.url, mode, restarts, reader
                )
                results[mode]["small table"] = await _small_table(
                    client, server.url, mode, reader, table
                )
        finally:
            await client.aclose()

    def cost_row(label: str, case: str) -> list[Any]:
        default, ours = results["default mode"][case], results["ours"][case]
        return [
            label,
            default["items"],
            round(default["memory_mb"], 1),
            ours["items"],
            round(ours["memory_mb"], 1),
        ]

    rows = [
        cost_row(f"{n} process{'es' if n > 1 else ''} read {entries:,} keys", f"{n} processes")
        for n in counts
    ]
    rows.append(
        cost_row(f"after {restarts} restarts of a {reader:,}-key reader (none left)", "restarts")
    )
    default, ours = results["default mode"]["small table"], results["ours"]["small table"]
    rows.append(
        [
            f"tracking-table-max-keys {table:,}, {reader:,} keys read twice: near-cache share "
            "of the second pass / messages",
            f"{default['near_share']:.0%} / {default['messages']:,}",
            "",
            f"{ours['near_share']:.0%} / {ours['messages']:,}",
            "",
        ]
    )
    return {
        "name": "tracking",
        "title": "Near cache: what tracking costs Redis (default mode beside ours)",
        "columns": [
            "case",
            "default mode: tracking_total_items",
            "default mode: used_memory (MB)",
            "ours: tracking_total_items",
            "ours: used_memory (MB)",
        ],
        "rows": rows,
        "notes": (
            "used_memory is above the server's own after the entries were written, before the "
            "reads, with the reading clients still connected: their connections and buffers (about "
            "1 to 1.6 MB here) are in both columns, and all of ours. Ours tracks "
            "only the generation keys' prefix in broadcast mode: Redis keeps no table of keys "
            "read. The default mode keeps every key each connection read until the key changes, "
            "even after the connection closed (redis/redis#9231), and evicts tracked keys past "
            "tracking-table-max-keys by announcing them, generations included."
        ),
        "data": results,
    }


def run(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(_run(quick))


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
