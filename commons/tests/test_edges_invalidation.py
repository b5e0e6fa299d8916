"""Invalidation: once ``invalidate_namespace()`` (or a flush) returns, no request gets the old data.

- Helper keys (``{prefix}:#...``: indexes, registries) can disappear: deleted by hand, or evicted
  by Redis under memory pressure. Losing them must never let an invalidated entry be served.
- A request that starts after an invalidation returned never receives a value computed before it,
  not even by joining a computation (a miss's, or a stale entry's refresh) already under way.
- A flush that runs while the service reads and writes leaves nothing of the old data, and the
  invalidations after it still reach every entry.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi_cache import FastAPICache
from redis.asyncio import Redis

from commons.cache import CacheSettings, cache, close_cache, init_cache, invalidate_namespace
from commons.testing.redis_server import RedisServer
from commons.utilities.context import get_tenant_id

REPO_ROOT = Path(__file__).resolve().parents[2]


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30
    )


def as_tenant(tenant: str) -> dict[str, str]:
    return {"X-Test-Tenant": tenant}


class Data:
    """The service's data: one version per tenant (1 until changed)."""

    def __init__(self) -> None:
        self.versions: defaultdict[str, int] = defaultdict(lambda: 1)

    def change_all(self, version: int, tenants: list[str]) -> None:
        for tenant in tenants:
            self.versions[tenant] = version


def build_reports_app(make_identity_app: Callable[[], FastAPI], data: Data) -> FastAPI:
    """``GET /reports/{n}``: tenant-scoped, namespace ``reports``, answers the tenant's version."""
    app = make_identity_app()

    @app.get("/reports/{n}")
    @cache(namespace="reports")
    async def report(n: int) -> dict[str, object]:
        tenant = str(get_tenant_id())
        return {"tenant": tenant, "n": n, "version": data.versions[tenant], "pad": "x" * 400}

    return app


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def on_redis(
    redis_url: str, make_settings: Callable[..., CacheSettings]
) -> AsyncIterator[CacheSettings]:
    settings = make_settings(redis_url)
    await init_cache(settings)
    try:
        yield settings
    finally:
        await close_cache()


# -- losing helper keys ---------------------------------------------------------------------------


async def test_invalidation_works_after_every_helper_key_is_deleted(
    on_redis: CacheSettings, raw_redis: Redis, make_identity_app: Callable[[], FastAPI]
) -> None:
    """With every ``{prefix}:#...`` key gone, invalidating a tenant still removes its entries:
    the next GET is a miss with the new data."""
    data = Data()
    app = build_reports_app(make_identity_app, data)

    async with client_for(app) as client:
        miss = await client.get("/reports/1", headers=as_tenant("acme"))
        hit = await client.get("/reports/1", headers=as_tenant("acme"))
        helper_keys = [
            key async for key in raw_redis.scan_iter(match=f"{on_redis.CACHE_PREFIX}:#*")
        ]
        for key in helper_keys:
            await raw_redis.delete(key)
        data.versions["acme"] = 2
        await invalidate_namespace("reports", tenant_id="acme")
        after = await client.get("/reports/1", headers=as_tenant("acme"))

    assert (miss.headers["X-FastAPI-Cache"], miss.json()["version"]) == ("MISS", 1)
    assert (hit.headers["X-FastAPI-Cache"], hit.json()["version"]) == ("HIT", 1)
    assert (after.headers["X-FastAPI-Cache"], after.json()["version"]) == ("MISS", 2)


EVICTION_TENANTS = [f"t{n:03d}" for n in range(100)]
EVICTION_PATHS = range(10)
EVICTED_AT_LEAST = 100


async def evicted_keys(client: Redis) -> int:
    return int((await client.info("stats"))["evicted_keys"])


async def test_no_old_version_is_served_after_redis_evicted_under_memory_pressure(
    own_redis: RedisServer,
    make_settings: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
) -> None:
    """Redis full under ``allkeys-lru`` evicts what was least recently used: entries that are
    read often outlive the helper keys written with them. Invalidating every tenant afterwards
    still means no GET returns the old version (a miss is fine)."""
    raw = Redis.from_url(own_redis.url)
    await raw.config_set("maxmemory-policy", "allkeys-lru")
    await raw.config_set("maxmemory", 8 * 1024 * 1024)
    await init_cache(make_settings(own_redis.url))
    data = Data()
    app = build_reports_app(make_identity_app, data)
    urls = [(tenant, f"/reports/{n}") for tenant in EVICTION_TENANTS for n in EVICTION_PATHS]

    async def get_all() -> list[httpx.Response]:
        responses: list[httpx.Response] = []
        for start in range(0, len(urls), 50):
            chunk = urls[start : start + 50]
            responses += await asyncio.gather(
                *(client.get(url, headers=as_tenant(tenant)) for tenant, url in chunk)
            )
        return responses

    try:
        async with client_for(app) as client:
            filled = await get_all()
            # Redis keeps idle times in whole seconds: reads from now on are more recent than
            # the writes of the fill, helper keys included.
            await asyncio.sleep(1.5)
            for _ in range(2):
                read = await get_all()
            junk = 0
            # Well past the first eviction: about a tenth of the keys go.
            while await evicted_keys(raw) < EVICTED_AT_LEAST:
                pipe = raw.pipeline(transaction=False)
                for _ in range(20):
                    pipe.set(f"junk:{junk}", os.urandom(8 * 1024))
                    junk += 1
                await pipe.execute()
                assert junk < 5000, "Redis did not evict as expected"
            data.change_all(2, EVICTION_TENANTS)
            await invalidate_namespace("reports")
            after = await get_all()
    finally:
        await close_cache()
        await raw.aclose()

    assert {r.json()["version"] for r in filled} == {1}
    assert {r.headers["X-FastAPI-Cache"] for r in read} == {"HIT"}
    old = [(r.json()["tenant"], r.json()["n"]) for r in after if r.json()["version"] != 2]
    assert old == [], f"{len(old)} GETs returned the invalidated version"


# -- read your writes -----------------------------------------------------------------------------


class SlowData:
    """One version, read at the start of each computation, which then takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.version = 1
        self.seconds = seconds
        self.reads: list[int] = []
        self.started = asyncio.Event()

    async def read(self) -> dict[str, int]:
        version = self.version
        self.reads.append(version)
        self.started.set()
        await asyncio.sleep(self.seconds)
        return {"version": version}


def build_slow_app(
    make_identity_app: Callable[[], FastAPI], data: SlowData, *, stale_ttl: int | None = None
) -> FastAPI:
    app = make_identity_app()

    @app.get("/slow")
    @cache(namespace="slow", expire=1 if stale_ttl else None, stale_ttl=stale_ttl)
    async def slow() -> dict[str, int]:
        return await data.read()

    return app


async def test_a_request_after_an_invalidation_never_joins_a_computation_started_before_it(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    """R1 misses and computes v1; the data changes to v2 and the invalidation returns; R2,
    starting after that, gets v2 rather than R1's v1, and so does every later GET."""
    data = SlowData(seconds=0.5)
    app = build_slow_app(make_identity_app, data)

    async with client_for(app) as client:
        first = asyncio.create_task(client.get("/slow", headers=as_tenant("acme")))
        await asyncio.wait_for(data.started.wait(), 5)
        data.version = 2
        await invalidate_namespace("slow", tenant_id="acme")
        second = await client.get("/slow", headers=as_tenant("acme"))
        first_response = await first
        later = await client.get("/slow", headers=as_tenant("acme"))

    assert first_response.json() == {"version": 1}
    assert (second.headers["X-FastAPI-Cache"], second.json()) == ("MISS", {"version": 2})
    assert later.json() == {"version": 2}


async def test_a_request_after_an_invalidation_never_joins_a_stale_entrys_refresh(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    """R1 gets a stale v1 and starts the refresh, which reads v1; the data changes to v2 and the
    invalidation returns; R2, starting after that, gets v2 (a miss), and so does every later GET."""
    data = SlowData(seconds=0.5)
    app = build_slow_app(make_identity_app, data, stale_ttl=60)

    async with client_for(app) as client:
        filled = await client.get("/slow", headers=as_tenant("acme"))
        await asyncio.sleep(1.2)  # past the entry's 1 s of freshness, well within its stale_ttl
        data.started.clear()
        # The client returns once the refresh (a background task of R1's response) is done.
        first = asyncio.create_task(client.get("/slow", headers=as_tenant("acme")))
        await asyncio.wait_for(data.started.wait(), 5)
        data.version = 2
        await invalidate_namespace("slow", tenant_id="acme")
        second = await client.get("/slow", headers=as_tenant("acme"))
        first_response = await first
        later = await client.get("/slow", headers=as_tenant("acme"))

    assert (filled.headers["X-FastAPI-Cache"], filled.json()) == ("MISS", {"version": 1})
    assert (first_response.headers["X-FastAPI-Cache"], first_response.json()) == (
        "STALE",
        {"version": 1},
    )
    assert data.reads[:2] == [1, 1], "the refresh was expected to read v1"
    assert (second.headers["X-FastAPI-Cache"], second.json()) == ("MISS", {"version": 2})
    assert later.json() == {"version": 2}


# -- a flush while the service writes ------------------------------------------------------------

FLUSH_TENANTS = [f"f{n:02d}" for n in range(20)]
FLUSH_PATHS = range(100)
FOREIGN_KEYS = 200_000


async def flush_through_the_guide_api(settings: CacheSettings) -> None:
    await FastAPICache.clear()


async def flush_through_the_cli(settings: CacheSettings) -> None:
    assert settings.REDIS_URL is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHE_", "REDIS_"))}
    env.update(REDIS_URL=settings.REDIS_URL, CACHE_PREFIX=settings.CACHE_PREFIX)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "commons.cache",
        "flush",
        "--yes",
        env=env,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, (stdout + stderr).decode()


FLUSHES: dict[str, Callable[[CacheSettings], Awaitable[None]]] = {
    "FastAPICache.clear": flush_through_the_guide_api,
    "commons-cache-flush": flush_through_the_cli,
}


@pytest.mark.parametrize("flush", FLUSHES.values(), ids=list(FLUSHES))
async def test_a_flush_during_reads_and_writes_leaves_no_old_data_and_later_invalidations_work(
    on_redis: CacheSettings,
    raw_redis: Redis,
    make_identity_app: Callable[[], FastAPI],
    flush: Callable[[CacheSettings], Awaitable[None]],
) -> None:
    """2,000 entries hold v1; the data changes to v2 without invalidating; requests keep reading
    (v1) and filling (v2) while the flush runs. Once it returns every GET answers v2; and once the
    data changes to v3 and the namespace is invalidated, every GET answers v3: the entries written
    while the flush ran are still reached by invalidations."""
    # Other services' keys share the Redis: the flush walks past them for a while, as it would
    # in production, while this service keeps writing.
    await raw_redis.execute_command("DEBUG", "POPULATE", FOREIGN_KEYS, "other-svc:junk")
    data = Data()
    app = build_reports_app(make_identity_app, data)
    urls = [(t, f"/reports/{n}") for t in FLUSH_TENANTS for n in FLUSH_PATHS]

    async def get_all() -> list[httpx.Response]:
        responses: list[httpx.Response] = []
        for start in range(0, len(urls), 100):
            chunk = urls[start : start + 100]
            responses += await asyncio.gather(
                *(client.get(url, headers=as_tenant(tenant)) for tenant, url in chunk)
            )
        return responses

    def not_at(version: int, responses: list[httpx.Response]) -> list[str]:
        return [
            f"{r.json()['tenant']}{r.url.path}" for r in responses if r.json()["version"] != version
        ]

    async with client_for(app) as client:
        filled = await get_all()
        data.change_all(2, FLUSH_TENANTS)
        flushed = asyncio.Event()

        async def keep_requesting(share: list[tuple[str, str]]) -> int:
            sent = 0
            while not flushed.is_set():
                for tenant, url in share:
                    await client.get(url, headers=as_tenant(tenant))
                    sent += 1
                    # A hit answered from memory (the near cache) never waits for I/O: without
                    # a pause, sixteen workers would leave the flush no time to run.
                    await asyncio.sleep(0.001)
                    if flushed.is_set():
                        break
            return sent

        # A few keys of every tenant, requested again and again: each is refilled soon after the
        # flush removed it, while the flush still runs.
        busy = [(tenant, f"/reports/{n}") for tenant in FLUSH_TENANTS for n in range(10)]
        workers = [asyncio.create_task(keep_requesting(busy[i::16])) for i in range(16)]
        await asyncio.sleep(0.05)
        try:
            await flush(on_redis)
        finally:
            flushed.set()
        after_flush = await get_all()
        sent_during_flush = sum(await asyncio.gather(*workers))
        data.change_all(3, FLUSH_TENANTS)
        await invalidate_namespace("reports")
        after_invalidation = await get_all()

    assert {r.json()["version"] for r in filled} == {1}
    assert sent_during_flush > 0
    assert not_at(2, after_flush) == [], "answers from before the flush outlived it"
    assert not_at(3, after_invalidation) == [], "entries written during the flush were missed"
