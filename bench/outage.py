"""Outage: latency of a cached GET while Redis is black-holed (SIGSTOP), ours against the guide's.

The route is the same in every variant: the guide's ``fastapi_cache.decorator.cache`` with a
tenant key builder, on a FastAPI app served in-process. Only the library under it differs:

- **ours**: ``init_cache()`` of ``commons.cache`` with its default settings (0.5 s connect and
  socket timeouts, breaker after 3 failures, probe every 2 s);
- **stock**: the guide's own design, ``redis.asyncio.from_url(url)`` pinged once, then
  ``FastAPICache.init(RedisBackend(client), prefix=...)``; once with redis-py's defaults and once
  with 0.5 s timeouts (the issue's two measurements).

The entry is cached (a HIT) before Redis is stopped; the clock starts at the SIGSTOP. Two loads:
*in a row* (one client, each GET after the previous one) and *at once* (all GETs issued together,
as a burst of traffic would). Every GET must answer 200 with the handler's body.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench._common import fmt_ratio, percentile

PREFIX = "ib-cache"
TENANT = "acme"
BODY = {"tenant_id": TENANT, "display_name": "Acme", "currency": "EUR"}
#: How long ours is asked in a row after the stop, at least: past the near cache's silence limit
#: (it answers from memory for up to a second, then empties), and past the read timeouts that
#: open the breaker after it (CACHE_FAILURE_THRESHOLD of REDIS_SOCKET_TIMEOUT_SECONDS), with room
#: to spare: what a client pays over the whole outage, not its first fraction of a second.
ROW_SECONDS = 4.0
#: redis-py's default pool size: a larger burst would fail its excess at once (MaxConnectionsError)
#: instead of waiting on Redis, in every variant.
POOL_SIZE = 100


class _CountingHandler(logging.Handler):
    """Counts WARNING-and-above records (and keeps tracebacks off the console)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def _make_app() -> Any:
    from fastapi import Depends, FastAPI
    from fastapi_cache.decorator import cache

    from commons.cache import tenant_cache_key_builder
    from commons.utilities.context import RequestContextMiddleware, set_tenant_id

    async def bind_tenant() -> None:
        set_tenant_id(TENANT)

    app = FastAPI(dependencies=[Depends(bind_tenant)])
    app.add_middleware(RequestContextMiddleware)

    @app.get("/v1/tenant/config")
    @cache(expire=300, namespace="tenant_config", key_builder=tenant_cache_key_builder)
    async def tenant_config() -> dict[str, str]:
        return dict(BODY)

    return app


async def _get(client: Any) -> float:
    started = time.perf_counter()
    response = await client.get("/v1/tenant/config")
    elapsed = time.perf_counter() - started
    if response.status_code != 200 or response.json() != BODY:
        raise RuntimeError(f"wrong answer in the outage: {response.status_code} {response.text}")
    return elapsed


async def _in_a_row(client: Any, count: int) -> list[float]:
    return [await _get(client) for _ in range(count)]


async def _in_a_row_spanning(client: Any, count: int) -> list[float]:
    """At least ``count`` GETs in a row, and for at least :data:`ROW_SECONDS`."""
    until = time.perf_counter() + ROW_SECONDS
    latencies: list[float] = []
    while len(latencies) < count or time.perf_counter() < until:
        latencies.append(await _get(client))
    return latencies


async def _at_once(client: Any, count: int) -> list[float]:
    return list(await asyncio.gather(*(_get(client) for _ in range(count))))


Load = Callable[[Any, int], Awaitable[list[float]]]


async def _measure(variant: str, load: Load, count: int) -> tuple[list[float], int]:
    """Latencies of ``count`` GETs while Redis is stopped, and the warnings logged meanwhile."""
    import httpx
    from fastapi_cache import FastAPICache
    from fastapi_cache.backends.redis import RedisBackend
    from redis.asyncio import Redis

    from commons.cache import CacheSettings, close_cache, init_cache
    from commons.testing.redis_server import RedisServer

    with RedisServer() as server:
        client: Redis | None = None
        if variant == "ours":
            await init_cache(CacheSettings(REDIS_URL=server.url, CACHE_PREFIX=PREFIX))
        else:
            # The guide's init_cache(): from_url(url), PING, RedisBackend.
            timeouts = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
            client = Redis.from_url(server.url, **(timeouts if variant == "stock-0.5s" else {}))
            await client.ping()
            FastAPICache.reset()
            FastAPICache.init(RedisBackend(client), prefix=PREFIX)
        transport = httpx.ASGITransport(app=_make_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            await http.get("/v1/tenant/config")
            warm = await http.get("/v1/tenant/config")
            if warm.headers.get("X-FastAPI-Cache") != "HIT":
                raise RuntimeError(f"{variant}: the entry was not cached before the outage")
            counter = _CountingHandler()
            root = logging.getLogger()
            root.addHandler(counter)
            # Long-lived objects (FastAPI, pydantic, the app) out of the collector's way, so its
            # pauses are not counted as the cache's.
            gc.collect()
            gc.freeze()
            server.pause()
            try:
                latencies = await load(http, count)
            finally:
                server.resume()
                gc.unfreeze()
                root.removeHandler(counter)
        if variant == "ours":
            await close_cache()
        else:
            FastAPICache.reset()
            assert client is not None
            await client.aclose()
    return latencies, counter.count


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


async def _run(quick: bool) -> dict[str, Any]:
    n = 50 if quick else 200
    burst = min(n, POOL_SIZE)
    # The stock design waits for its timeouts on every GET, so in a row it runs few of them:
    # each costs the same (timeout on the GET, then on the SET), as its spread shows.
    stock_in_a_row = {"stock-0.5s": 5 if quick else 20, "stock-defaults": 1 if quick else 3}
    variants = ("ours", "stock-0.5s", "stock-defaults")
    row_latencies: dict[str, dict[str, list[float]]] = {"in a row": {}, "at once": {}}
    logged: dict[str, int] = {}
    for variant in variants:
        count = n if variant == "ours" else stock_in_a_row[variant]
        in_a_row = _in_a_row_spanning if variant == "ours" else _in_a_row
        row_latencies["in a row"][variant], _ = await _measure(variant, in_a_row, count)
        row_latencies["at once"][variant], logged[variant] = await _measure(
            variant, _at_once, burst
        )

    stats: list[tuple[str, str, Callable[[list[float]], float]]] = [
        ("in a row", "p50", lambda v: percentile(v, 50)),
        ("in a row", "p99", lambda v: percentile(v, 99)),
        ("in a row", "max", max),
        ("at once", "p50", lambda v: percentile(v, 50)),
        ("at once", "p99", lambda v: percentile(v, 99)),
        ("at once", "max", max),
    ]
    rows: list[list[Any]] = []
    chart: dict[str, list[float]] = {v: [] for v in variants}
    labels: list[str] = []
    for load, name, stat in stats:
        values = {v: stat(row_latencies[load][v]) for v in variants}
        rows.append(
            [
                f"{load}: {name}",
                _ms(values["ours"]),
                _ms(values["stock-0.5s"]),
                _ms(values["stock-defaults"]),
                fmt_ratio(values["stock-0.5s"] / values["ours"]),
                fmt_ratio(values["stock-defaults"] / values["ours"]),
            ]
        )
        if name in ("p50", "p99"):
            labels.append(f"{load} {name}")
            for v in variants:
                chart[v].append(_ms(values[v]))
    rows.append(
        [
            f"warning log lines, {burst} GETs at once",
            logged["ours"],
            logged["stock-0.5s"],
            logged["stock-defaults"],
            fmt_ratio(logged["stock-0.5s"] / max(logged["ours"], 1)),
            fmt_ratio(logged["stock-defaults"] / max(logged["ours"], 1)),
        ]
    )
    slow_ours = sum(1 for s in row_latencies["in a row"]["ours"] if s >= 0.1)
    counts = ", ".join(
        f"{v} {len(row_latencies['in a row'][v])} in a row and {burst} at once" for v in variants
    )
    notes = (
        f"Cached GET (a HIT before the outage) of one tenant's config while Redis is stopped with "
        f"SIGSTOP; the clock starts at the stop. GETs per variant: {counts}. The stock design "
        "pays its timeouts on every GET (on the read, then on the write), so its GETs in a row "
        "are few to keep the run bounded: each costs the same, alone or in a burst. Ours in a "
        f"row for {ROW_SECONDS:.0f} s at least: {slow_ours} of its GETs took 100 ms or more (once "
        "the near cache gave up on the silent server, about a second in, each GET pays one read "
        "timeout until the breaker opens: CACHE_FAILURE_THRESHOLD of them, 0.5 s each by "
        "default); "
        "at once, every GET already in flight when Redis stopped pays one read timeout (none "
        "pays a second one on the write); the burst is redis-py's default pool size (100), as a "
        "larger one fails its excess at once with MaxConnectionsError in every variant. Same "
        "route code (fastapi-cache2's @cache with a tenant key builder) in all variants; ours "
        "uses its default settings. In-process ASGI client, so a burst also queues on the event "
        "loop; gc.freeze() before each run. All answers were 200 with the handler's body."
    )
    return {
        "name": "outage",
        "title": "Cached GET while Redis is black-holed (SIGSTOP)",
        "columns": [
            "load: statistic",
            "ours (ms)",
            "stock, 0.5 s timeouts (ms)",
            "stock, redis-py defaults (ms)",
            "0.5 s stock ÷ ours",
            "default stock ÷ ours",
        ],
        "rows": rows,
        "notes": notes,
        "chart": {
            "type": "bar",
            "labels": labels,
            "series": {
                "ours": chart["ours"],
                "stock, 0.5 s timeouts": chart["stock-0.5s"],
                "stock, redis-py defaults": chart["stock-defaults"],
            },
            "unit": "ms",
        },
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Runs the outage benchmark; ``quick`` shrinks it to a smoke test."""
    return asyncio.run(_run(quick))
