"""Fault injection: the cache is calm when Redis is not.

Every scenario runs a real FastAPI app against a real redis-server that the test stops (SIGSTOP),
kills, restarts, slows (DEBUG SLEEP), fills (maxmemory + noeviction), turns into a read-only replica
or locks out (requirepass, ACL). Each scenario runs twice: on a route cached with
``commons.cache.cache`` and on one cached with the guide's ``fastapi_cache.decorator.cache`` and
``tenant_cache_key_builder``. Each asserts that every response is the handler's (never a 5xx), how
long each request may take, the states ``cache_status()`` reports with their reason and ``since``,
the way back to Redis, and that the cache logs one line per change of state, not one per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi_cache import FastAPICache
from fastapi_cache.decorator import cache as guide_cache

from commons.cache import (
    CacheSettings,
    CacheUnavailableError,
    cache,
    cache_status,
    close_cache,
    init_cache,
    invalidate_namespace,
    tenant_cache_key_builder,
)
from commons.cache.backends.redis.near import HEARTBEAT_SECONDS, SILENCE_LIMIT_SECONDS
from commons.cache.status import CacheStatus
from commons.testing.proxy import LoopbackProxy
from commons.testing.redis_server import RedisServer
from commons.utilities.context import get_tenant_id

SOCKET_TIMEOUT = 0.2
RECOVERY_INTERVAL = 0.2
FAST_FAILING = {
    "REDIS_SOCKET_TIMEOUT_SECONDS": SOCKET_TIMEOUT,
    "REDIS_CONNECT_TIMEOUT_SECONDS": SOCKET_TIMEOUT,
    "CACHE_RECOVERY_INTERVAL_SECONDS": RECOVERY_INTERVAL,
}
#: Longest any request may take during a fault: one timeout, plus room for a loaded CI machine.
REQUEST_BOUND = SOCKET_TIMEOUT + 1.0
#: Longest the way back to Redis may take once the fault is gone: one interval, one probe, room.
RECOVERY_BOUND = RECOVERY_INTERVAL + SOCKET_TIMEOUT + 1.0
#: Requests served while the breaker is open never touch Redis: well below the timeout (with room
#: for a loaded CI machine), so none of them waited for Redis.
OPEN_BREAKER_BOUND = 0.75 * SOCKET_TIMEOUT

FLAVOURS = ["commons_cache", "guide_cache"]
#: How long ``/blocking`` holds the event loop: longer than the slow threshold it is tested with.
LOOP_HELD_FOR = 0.6


# -- the service under test ---------------------------------------------------------------------


@dataclass
class Service:
    """A FastAPI app with one cached route, its "database" and a client."""

    client: httpx.AsyncClient = field(init=False)
    versions: defaultdict[str, int] = field(default_factory=lambda: defaultdict(lambda: 1))
    handler_calls: int = 0
    durations: list[float] = field(default_factory=list)

    def expected(self, tenant: str) -> dict[str, Any]:
        return {"tenant": tenant, "version": self.versions[tenant]}

    async def get(self, tenant: str = "acme", *, bound: float = REQUEST_BOUND) -> httpx.Response:
        """GETs the tenant's config and checks it is the handler's answer, in time."""
        started = time.perf_counter()
        response = await self.client.get("/config", headers={"X-Test-Tenant": tenant})
        elapsed = time.perf_counter() - started
        self.durations.append(elapsed)
        assert response.status_code == 200, response.text
        assert response.json() == self.expected(tenant)
        assert elapsed <= bound, f"GET took {elapsed:.3f}s, allowed {bound}s"
        return response

    async def put(self, tenant: str = "acme") -> httpx.Response:
        """Updates the tenant's config (which invalidates its cached entries), in time."""
        started = time.perf_counter()
        response = await self.client.put("/config", headers={"X-Test-Tenant": tenant})
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, response.text
        assert response.json() == self.expected(tenant)
        assert elapsed <= REQUEST_BOUND, f"PUT took {elapsed:.3f}s"
        return response

    async def admin(self, path: str) -> httpx.Response:
        response = await self.client.post(path, headers={"X-Test-Tenant": "acme"})
        assert response.status_code == 200, response.text
        return response


def build_app(make_identity_app: Callable[[], FastAPI], flavour: str, service: Service) -> FastAPI:
    app = make_identity_app()

    async def read_config() -> dict[str, Any]:
        service.handler_calls += 1
        tenant = get_tenant_id()
        assert tenant is not None
        return service.expected(tenant)

    if flavour == "commons_cache":
        cached = cache(expire=60, namespace="config")(read_config)
    else:
        cached = guide_cache(expire=60, namespace="config", key_builder=tenant_cache_key_builder)(
            read_config
        )
    app.get("/config")(cached)

    async def read_config_while_it_is_updated() -> dict[str, Any]:
        tenant = get_tenant_id()
        assert tenant is not None
        answer = service.expected(tenant)
        # An update commits and invalidates while this handler is still computing its answer.
        service.versions[tenant] += 1
        await invalidate_namespace("config", tenant_id=tenant)
        return answer

    if flavour == "commons_cache":
        racing = cache(expire=60, namespace="config")(read_config_while_it_is_updated)
    else:
        racing = guide_cache(expire=60, namespace="config", key_builder=tenant_cache_key_builder)(
            read_config_while_it_is_updated
        )
    app.get("/config/racing")(racing)

    @app.put("/config")
    async def update_config() -> dict[str, Any]:
        tenant = get_tenant_id()
        assert tenant is not None
        service.versions[tenant] += 1
        await invalidate_namespace("config", tenant_id=tenant)
        return service.expected(tenant)

    @app.get("/blocking")
    async def hold_the_event_loop() -> dict[str, str]:
        # Blocking work in an async handler, as services do by mistake: the requests whose reads
        # are in flight meanwhile get their replies late.
        await asyncio.sleep(SOCKET_TIMEOUT / 8)
        time.sleep(LOOP_HELD_FOR)  # noqa: ASYNC251
        return {}

    @app.post("/admin/clear-key")
    async def clear_one_key() -> dict[str, int]:
        return {"removed": await FastAPICache.clear(key="test-cache:config:tenant_acme:/x:0")}

    @app.post("/admin/clear-namespace")
    async def clear_namespace() -> dict[str, int]:
        return {"removed": await FastAPICache.clear(namespace="config")}

    @app.post("/admin/flush")
    async def flush_everything() -> dict[str, int]:
        return {"removed": await FastAPICache.clear()}

    return app


StartService = Callable[..., Awaitable[Service]]


@pytest.fixture(params=FLAVOURS)
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def start_service(
    flavour: str,
    make_identity_app: Callable[[], FastAPI],
    make_settings: Callable[..., CacheSettings],
    app_clients: Callable[[FastAPI], httpx.AsyncClient],
) -> StartService:
    """``await start_service(redis_url, **settings)``: init_cache (as the lifespan would), the app
    and a client; all closed after the test."""

    async def start(redis_url: str | None, **overrides: object) -> Service:
        await init_cache(make_settings(redis_url, **{**FAST_FAILING, **overrides}))
        service = Service()
        service.client = app_clients(build_app(make_identity_app, flavour, service))
        return service

    return start


@pytest.fixture
def cache_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="commons.cache")
    return caplog


def logged_states(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The states the cache logged, in order; fails on any other line at INFO or above.

    The cache's own lines count from INFO, every other logger's from WARNING (redis-py,
    fastapi-cache2 and the app must stay quiet too).
    """
    states: list[str] = []
    for record in caplog.records:
        if record.levelno < logging.INFO:
            continue
        if record.name != "commons.cache" and record.levelno < logging.WARNING:
            continue
        message = record.getMessage()
        assert record.name == "commons.cache", f"unexpected log line: {record.name}: {message}"
        assert message.startswith("cache backend: "), f"unexpected log line: {message}"
        states.append(message.removeprefix("cache backend: ").split(" ", 1)[0])
    return states


async def wait_for_backend(backend: str, within: float = RECOVERY_BOUND) -> float:
    """Waits until cache_status() reports ``backend``; returns how long that took."""
    started = time.monotonic()
    while cache_status().backend != backend:
        elapsed = time.monotonic() - started
        assert elapsed <= within, f"not {backend} after {elapsed:.2f}s: {cache_status()}"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def get_until_degraded(service: Service, *, at_most: int = 10) -> int:
    """GETs until the breaker opens; returns how many requests that took.

    First waits for the near cache to give up a silent link: until then it answers what it holds.
    """
    await asyncio.sleep(SILENCE_LIMIT_SECONDS + HEARTBEAT_SECONDS + 0.2)
    for count in range(1, at_most + 1):
        await service.get()
        if cache_status().backend == "degraded":
            return count
    raise AssertionError(f"still {cache_status()} after {at_most} requests")


def assert_degraded(status: CacheStatus, *, because: str, after: datetime) -> None:
    assert status.backend == "degraded"
    assert because in status.reason, status.reason
    assert status.since >= after


@asynccontextmanager
async def paused(server: RedisServer) -> AsyncIterator[None]:
    server.pause()
    try:
        yield
    finally:
        server.resume()


def info_field(server: RedisServer, section: str, name: str) -> str:
    reply = server.command("INFO", section).decode()
    for line in reply.splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    return ""


@pytest.fixture
def second_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


# -- black hole (SIGSTOP) -----------------------------------------------------------------------


async def test_a_black_holed_redis_costs_a_few_requests_one_timeout_then_recovers(
    start_service: StartService, own_redis: RedisServer, cache_log: pytest.LogCaptureFixture
) -> None:
    service = await start_service(own_redis.url)
    await service.get()
    assert (await service.get()).headers["X-FastAPI-Cache"] == "HIT"
    assert cache_status().backend == "redis"

    fault_at = datetime.now(UTC)
    async with paused(own_redis):
        slow = await get_until_degraded(service)
        assert slow <= 3  # CACHE_FAILURE_THRESHOLD requests pay the timeout, no more
        assert_degraded(cache_status(), because="did not answer in time", after=fault_at)
        for _ in range(10):
            await service.get(bound=OPEN_BREAKER_BOUND)
        assert cache_status().memory_entries == 1
    resumed = time.monotonic()

    await wait_for_backend("redis")
    assert time.monotonic() - resumed <= RECOVERY_BOUND
    status = cache_status()
    assert "Redis answers again" in status.reason
    assert status.memory_entries == 0  # the in-memory tier was dropped on the way back
    assert (await service.get()).headers["X-FastAPI-Cache"] == "HIT"  # Redis kept the entry
    assert logged_states(cache_log) == ["redis", "degraded", "redis"]


async def test_after_the_breaker_opens_requests_add_no_timeout(
    start_service: StartService, own_redis: RedisServer
) -> None:
    timeout = 1.0
    service = await start_service(
        own_redis.url, REDIS_SOCKET_TIMEOUT_SECONDS=timeout, REDIS_CONNECT_TIMEOUT_SECONDS=timeout
    )
    tenants = [f"tenant{n}" for n in range(5)]
    for tenant in tenants:
        await service.get(tenant)

    async with paused(own_redis):
        # A burst of misses: each request pays one timeout on its read, none a second on its write.
        await asyncio.gather(*(service.get(t, bound=timeout + 0.8) for t in tenants))
        assert cache_status().backend == "degraded"
        for round_ in range(10):
            for tenant in tenants:
                await service.get(tenant, bound=0.25 * timeout)
                assert round_ == 0 or service.durations[-1] < 0.25 * timeout


async def test_closing_the_cache_during_a_black_hole_does_not_hang(
    start_service: StartService, own_redis: RedisServer
) -> None:
    service = await start_service(own_redis.url)
    await service.get()
    async with paused(own_redis):
        await service.get()
        started = time.monotonic()
        await close_cache()
        assert time.monotonic() - started <= REQUEST_BOUND
        assert cache_status().backend == "disabled"


# -- killed, restarted ---------------------------------------------------------------------------


async def test_a_killed_redis_is_left_at_once_and_rejoined_when_it_restarts_empty(
    start_service: StartService, own_redis: RedisServer, cache_log: pytest.LogCaptureFixture
) -> None:
    service = await start_service(own_redis.url)
    await service.get()

    fault_at = datetime.now(UTC)
    own_redis.kill()
    # Connection refused is immediate: no request waits for a timeout.
    await get_until_degraded(service)
    assert_degraded(cache_status(), because="connecting", after=fault_at)
    for _ in range(5):
        await service.get(bound=OPEN_BREAKER_BOUND)

    own_redis.start()  # same port, no data
    await wait_for_backend("redis")
    assert cache_status().memory_entries == 0
    calls = service.handler_calls
    assert (await service.get()).headers["X-FastAPI-Cache"] == "MISS"
    assert (await service.get()).headers["X-FastAPI-Cache"] == "HIT"
    assert service.handler_calls == calls + 1
    assert logged_states(cache_log) == ["redis", "degraded", "redis"]


async def test_a_redis_restarted_between_two_requests_goes_unnoticed(
    start_service: StartService, own_redis: RedisServer, cache_log: pytest.LogCaptureFixture
) -> None:
    service = await start_service(own_redis.url)
    await service.get()
    assert (await service.get()).headers["X-FastAPI-Cache"] == "HIT"

    own_redis.kill()
    own_redis.start()
    # This process notices its closed connections (the near cache then forgets what it held).
    await asyncio.sleep(0.05)

    # The pooled connection is dead; the one retry on a fresh connection hides it.
    assert (await service.get()).headers["X-FastAPI-Cache"] == "MISS"
    assert (await service.get()).headers["X-FastAPI-Cache"] == "HIT"
    assert cache_status().backend == "redis"
    assert logged_states(cache_log) == ["redis"]


async def test_a_service_started_while_redis_was_down_moves_to_redis_when_it_comes_up(
    start_service: StartService, cache_log: pytest.LogCaptureFixture
) -> None:
    server = RedisServer()  # a free port, nothing listening yet
    try:
        before = datetime.now(UTC)
        service = await start_service(server.url)
        assert_degraded(cache_status(), because="at start-up", after=before)
        await service.get(bound=OPEN_BREAKER_BOUND)
        await service.put()  # kept for Redis
        await service.get(bound=OPEN_BREAKER_BOUND)
        assert cache_status().pending_invalidations == 1

        server.start()
        await wait_for_backend("redis")
        assert cache_status().pending_invalidations == 0
        await service.get()
        assert (await service.get()).headers["X-FastAPI-Cache"] == "HIT"
        assert int(server.command("DBSIZE").decode().strip(":\r\n")) > 0
        assert logged_states(cache_log) == ["degraded", "redis"]
    finally:
        server.stop()


@pytest.mark.parametrize("fault", ["killed", "black-holed"])
async def test_fail_fast_still_refuses_to_start_without_redis(
    own_redis: RedisServer, make_settings: Callable[..., CacheSettings], fault: str
) -> None:
    settings = make_settings(own_redis.url, CACHE_FAIL_FAST=True, **FAST_FAILING)
    if fault == "killed":
        own_redis.kill()
    else:
        own_redis.pause()
    started = time.monotonic()
    try:
        with pytest.raises(CacheUnavailableError, match="CACHE_FAIL_FAST"):
            await init_cache(settings)
    finally:
        if fault == "black-holed":
            own_redis.resume()
    assert time.monotonic() - started <= REQUEST_BOUND
    assert cache_status().backend == "disabled"


# -- slow ----------------------------------------------------------------------------------------


async def test_a_redis_busy_in_a_long_command_is_bypassed_until_it_answers_again(
    start_service: StartService, own_redis: RedisServer, cache_log: pytest.LogCaptureFixture
) -> None:
    service = await start_service(own_redis.url)
    await service.get()

    fault_at = datetime.now(UTC)
    # Longer than the near cache's silence limit, which answers what it holds until then.
    sleeper = asyncio.create_task(asyncio.to_thread(own_redis.command, "DEBUG", "SLEEP", "3"))
    await asyncio.sleep(0.05)  # the server is inside DEBUG SLEEP now
    await get_until_degraded(service)
    assert_degraded(cache_status(), because="did not answer in time", after=fault_at)
    while not sleeper.done():
        await service.get(bound=OPEN_BREAKER_BOUND)
        await asyncio.sleep(0.01)
    assert (await sleeper).startswith(b"+OK")

    await wait_for_backend("redis")
    assert (await service.get()).headers["X-FastAPI-Cache"] == "HIT"
    assert logged_states(cache_log) == ["redis", "degraded", "redis"]


# -- slow (replies just under the timeout) ---------------------------------------------------------

#: The slow threshold (CACHE_SLOW_REDIS_SECONDS) where it is tested, and a reply delay under the
#: socket timeout but over it.
SLOW_CALL = SOCKET_TIMEOUT / 2
SLOW_REPLY = 0.75 * SOCKET_TIMEOUT


@pytest.fixture
def slow_link(own_redis: RedisServer) -> Iterator[LoopbackProxy]:
    with LoopbackProxy(own_redis.port) as proxy:
        yield proxy


async def test_a_redis_answering_just_under_the_timeout_is_left_and_rejoined_once_fast(
    start_service: StartService, slow_link: LoopbackProxy, cache_log: pytest.LogCaptureFixture
) -> None:
    service = await start_service(slow_link.url, CACHE_SLOW_REDIS_SECONDS=SLOW_CALL)
    await service.get()
    assert cache_status().backend == "redis"

    fault_at = datetime.now(UTC)
    slow_link.delay_replies(SLOW_REPLY)
    # Other tenants' keys: the near cache holds none of them, so each request asks Redis (a read
    # and a fill), and none of its replies fails.
    tenants = iter(f"t{n}" for n in range(100))
    requests = 0
    while cache_status().backend != "degraded":
        assert requests < 3, f"still {cache_status()} after {requests} requests"
        await service.get(next(tenants))
        requests += 1
    assert_degraded(cache_status(), because="answers too slowly", after=fault_at)
    for _ in range(10):
        await service.get(next(tenants), bound=OPEN_BREAKER_BOUND)
    await asyncio.sleep(3 * RECOVERY_INTERVAL)
    assert cache_status().backend == "degraded"  # the probe's PING is as slow

    slow_link.delay_replies(0.0)
    await wait_for_backend("redis")
    assert (await service.get()).headers["X-FastAPI-Cache"] == "HIT"
    assert logged_states(cache_log) == ["redis", "degraded", "redis"]


async def test_reads_held_up_by_the_services_own_blocked_event_loop_do_not_open_the_breaker(
    start_service: StartService, slow_link: LoopbackProxy, cache_log: pytest.LogCaptureFixture
) -> None:
    # Thresholds well above what a loaded machine adds, so that only the held loop is slow.
    service = await start_service(
        slow_link.url, REDIS_SOCKET_TIMEOUT_SECONDS=1.0, CACHE_SLOW_REDIS_SECONDS=LOOP_HELD_FOR / 2
    )
    await service.get()
    # Replies this late keep reads in flight when a handler holds the loop: they all end late
    # together, by no fault of Redis.
    slow_link.delay_replies(SOCKET_TIMEOUT / 4)

    for round_ in range(3):
        misses = [service.get(f"held-{n}-{round_}", bound=REQUEST_BOUND + 1) for n in range(6)]
        await asyncio.gather(service.client.get("/blocking"), *misses)
        assert min(service.durations[-6:]) > LOOP_HELD_FOR  # every one was held up
    # Not even for a moment (the probe would have brought it back by now).
    assert logged_states(cache_log) == ["redis"]


# -- full (OOM) ----------------------------------------------------------------------------------


async def test_a_full_redis_keeps_serving_its_entries_and_skips_the_writes_it_refuses(
    start_service: StartService, own_redis: RedisServer, cache_log: pytest.LogCaptureFixture
) -> None:
    service = await start_service(own_redis.url)
    await service.get("acme")
    own_redis.command("DEBUG", "POPULATE", "20000", "filler", "100")
    own_redis.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    own_redis.command("CONFIG", "SET", "maxmemory", "1mb")

    fault_at = datetime.now(UTC)
    for _ in range(3):  # every write is refused: each request runs the handler, at once
        assert (await service.get("globex", bound=OPEN_BREAKER_BOUND)).headers[
            "X-FastAPI-Cache"
        ] == "MISS"
    status = cache_status()
    assert status.backend == "redis"
    assert "refuses writes" in status.reason
    assert "OOM" in status.reason
    assert "globex" not in status.reason  # no key or body is quoted
    assert status.since >= fault_at
    assert (await service.get("acme")).headers["X-FastAPI-Cache"] == "HIT"
    # Invalidation needs no memory: it still reaches Redis.
    await service.put("acme")
    assert (await service.get("acme")).headers["X-FastAPI-Cache"] == "MISS"
    assert cache_status().pending_invalidations == 0

    own_redis.command("CONFIG", "SET", "maxmemory", "0")
    await service.get("globex")
    assert "accepts writes again" in cache_status().reason
    assert (await service.get("globex")).headers["X-FastAPI-Cache"] == "HIT"
    assert logged_states(cache_log) == ["redis", "redis", "redis"]


# -- read-only (a replica) -----------------------------------------------------------------------


def replicate(replica: RedisServer, primary: RedisServer) -> None:
    """Makes ``replica`` a replica of ``primary`` and waits until it holds primary's data."""
    primary.command("CONFIG", "SET", "repl-diskless-sync-delay", "0")
    replica.command("REPLICAOF", primary.host, str(primary.port))
    deadline = time.monotonic() + 10
    while info_field(replica, "replication", "master_link_status") != "up":
        assert time.monotonic() < deadline, "replication did not start"
        time.sleep(0.02)


async def test_a_redis_turned_read_only_keeps_serving_and_keeps_invalidations_until_writable(
    start_service: StartService,
    own_redis: RedisServer,
    second_redis: RedisServer,
    cache_log: pytest.LogCaptureFixture,
) -> None:
    service = await start_service(own_redis.url)
    await service.get("acme")
    # The other server takes a copy of our data, then our Redis becomes its read-only replica:
    # the cached entry is still there, but no write is accepted.
    replicate(second_redis, own_redis)
    second_redis.command("REPLICAOF", "NO", "ONE")
    replicate(own_redis, second_redis)

    fault_at = datetime.now(UTC)
    assert (await service.get("acme")).headers["X-FastAPI-Cache"] == "HIT"
    assert (await service.get("globex")).headers["X-FastAPI-Cache"] == "MISS"
    assert "refuses writes" in cache_status().reason
    assert "READONLY" in cache_status().reason

    # The invalidation cannot reach the replica: it is kept, and Redis is not read until applied.
    await service.put("acme")
    assert_degraded(cache_status(), because="invalidation could not reach Redis", after=fault_at)
    assert cache_status().pending_invalidations == 1
    await service.get("acme", bound=OPEN_BREAKER_BOUND)
    await asyncio.sleep(3 * RECOVERY_INTERVAL)  # probes answer PING, but the replay is refused
    assert cache_status().backend == "degraded"
    # Said as what it is, once: Redis answers and refuses, not an outage.
    assert "refused the invalidations kept for it" in cache_status().reason
    assert "READONLY" in cache_status().reason
    await service.get("acme", bound=OPEN_BREAKER_BOUND)

    own_redis.command("REPLICAOF", "NO", "ONE")
    await wait_for_backend("redis")
    assert cache_status().pending_invalidations == 0
    assert (await service.get("acme")).headers["X-FastAPI-Cache"] == "MISS"
    assert (await service.get("acme")).headers["X-FastAPI-Cache"] == "HIT"
    assert logged_states(cache_log) == ["redis", "redis", "degraded", "degraded", "redis"]


# -- refusing auth -------------------------------------------------------------------------------


async def test_a_wrong_password_serves_from_memory_until_the_server_accepts_it(
    start_service: StartService, cache_log: pytest.LogCaptureFixture
) -> None:
    with RedisServer(extra_args=["--requirepass", "the-real-one"]) as server:
        url = f"redis://:not-the-real-one@{server.host}:{server.port}/0"
        before = datetime.now(UTC)
        service = await start_service(url)
        assert_degraded(cache_status(), because="password", after=before)
        for _ in range(5):
            await service.get(bound=OPEN_BREAKER_BOUND)

        server.command("CONFIG", "SET", "requirepass", "not-the-real-one", password="the-real-one")
        await wait_for_backend("redis")
        await service.get()
        assert (await service.get()).headers["X-FastAPI-Cache"] == "HIT"
        assert logged_states(cache_log) == ["degraded", "redis"]


async def test_an_acl_user_whose_password_changed_is_served_from_memory_until_it_is_restored(
    start_service: StartService, own_redis: RedisServer, cache_log: pytest.LogCaptureFixture
) -> None:
    own_redis.command("ACL", "SETUSER", "svc", "on", ">first-secret", "~*", "&*", "+@all")
    service = await start_service(f"redis://svc:first-secret@{own_redis.host}:{own_redis.port}/0")
    await service.get()

    fault_at = datetime.now(UTC)
    own_redis.command("ACL", "SETUSER", "svc", "resetpass", ">rotated-secret")
    own_redis.command("CLIENT", "KILL", "USER", "svc")  # open connections re-authenticate
    await get_until_degraded(service)
    assert_degraded(cache_status(), because="password", after=fault_at)
    for _ in range(5):
        await service.get(bound=OPEN_BREAKER_BOUND)

    own_redis.command("ACL", "SETUSER", "svc", ">first-secret")
    await wait_for_backend("redis")
    assert (await service.get()).headers["X-FastAPI-Cache"] == "HIT"
    assert logged_states(cache_log) == ["redis", "degraded", "redis"]


# -- no lost invalidations -----------------------------------------------------------------------


@pytest.mark.parametrize("when", ["before the breaker opens", "after the breaker opens"])
async def test_an_invalidation_made_during_an_outage_is_applied_before_redis_is_read_again(
    start_service: StartService, own_redis: RedisServer, when: str
) -> None:
    service = await start_service(own_redis.url)
    await service.get("acme")
    await service.get("globex")
    assert (await service.get("acme")).headers["X-FastAPI-Cache"] == "HIT"

    async with paused(own_redis):
        if when == "after the breaker opens":
            await get_until_degraded(service)
        await service.put("acme")  # version 2; the entry in Redis still says version 1
        assert cache_status().backend == "degraded"
        assert cache_status().pending_invalidations == 1
        await service.get("acme", bound=OPEN_BREAKER_BOUND)

    await wait_for_backend("redis")
    assert cache_status().pending_invalidations == 0
    after = await service.get("acme")
    assert after.headers["X-FastAPI-Cache"] == "MISS"
    assert after.json()["version"] == 2
    # Only the invalidated tenant lost its entry.
    assert (await service.get("globex")).headers["X-FastAPI-Cache"] == "HIT"


async def test_invalidations_kept_during_an_outage_are_applied_when_the_cache_closes(
    start_service: StartService,
) -> None:
    """Redis is back with its data, the next recovery probe is minutes away, and the process
    stops or is initialised again: what it kept for Redis is applied on the way out, not lost
    with it."""
    with RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]) as server:
        service = await start_service(server.url, CACHE_RECOVERY_INTERVAL_SECONDS=300)
        await service.get("acme")
        assert (await service.get("acme")).headers["X-FastAPI-Cache"] == "HIT"
        server.kill()
        await service.put("acme")  # version 2; the entry in Redis still says version 1
        assert cache_status().pending_invalidations == 1
        server.start()  # back, with version 1 on disk

        # init_cache() closes the first layer, as a restart would.
        restarted = await start_service(server.url, CACHE_RECOVERY_INTERVAL_SECONDS=300)
        restarted.versions["acme"] = 2
        after = await restarted.get("acme")
        await close_cache()

    assert after.headers["X-FastAPI-Cache"] == "MISS"
    assert after.json()["version"] == 2


async def test_flushes_and_key_deletions_during_an_outage_are_kept_too(
    start_service: StartService, own_redis: RedisServer
) -> None:
    service = await start_service(own_redis.url)
    await service.get("acme")
    await service.get("globex")

    own_redis.kill()
    await service.admin("/admin/clear-key")
    await service.admin("/admin/clear-namespace")
    await service.admin("/admin/flush")
    assert cache_status().backend == "degraded"
    assert cache_status().pending_invalidations == 1  # the flush covers the other two
    own_redis.start()  # empty anyway; the flush must still be applied and forgotten
    await wait_for_backend("redis")
    assert cache_status().pending_invalidations == 0


@pytest.mark.parametrize("fault", ["black-holed", "killed"])
async def test_nothing_raises_into_a_handler_during_an_outage(
    start_service: StartService, own_redis: RedisServer, fault: str
) -> None:
    service = await start_service(own_redis.url)
    await service.get()
    if fault == "black-holed":
        own_redis.pause()
    else:
        own_redis.kill()
    try:
        for path in ("/admin/clear-key", "/admin/clear-namespace", "/admin/flush"):
            await service.admin(path)
        await service.put()
        await service.get()
        await service.get("globex")
    finally:
        if fault == "black-holed":
            own_redis.resume()
        else:
            own_redis.start()
    await wait_for_backend("redis")
    await service.get()


# -- the breaker after a recovery, fill tokens ---------------------------------------------------


async def test_after_a_recovery_one_failure_opens_the_breaker_again(
    start_service: StartService, own_redis: RedisServer, cache_log: pytest.LogCaptureFixture
) -> None:
    service = await start_service(own_redis.url)
    await service.get()
    own_redis.kill()
    await get_until_degraded(service)
    own_redis.start()
    await wait_for_backend("redis")

    own_redis.kill()
    # Half-open: the first failed read after a recovery is enough.
    assert await get_until_degraded(service) == 1
    own_redis.start()
    await wait_for_backend("redis")
    assert logged_states(cache_log) == ["redis", "degraded", "redis", "degraded", "redis"]


async def test_a_value_computed_before_an_invalidation_is_not_stored_after_it(
    start_service: StartService, own_redis: RedisServer
) -> None:
    service = await start_service(own_redis.url)
    headers = {"X-Test-Tenant": "acme"}

    first = await service.client.get("/config/racing", headers=headers)
    assert first.json()["version"] == 1  # computed before the update committed
    second = await service.client.get("/config/racing", headers=headers)
    assert second.headers["X-FastAPI-Cache"] == "MISS"  # the stale answer was never stored
    assert second.json()["version"] == 2


async def test_during_an_outage_memory_entries_live_no_longer_than_the_degraded_ttl(
    start_service: StartService, own_redis: RedisServer
) -> None:
    # Another replica's update cannot reach this replica's memory: its entries stay short-lived.
    service = await start_service(own_redis.url, CACHE_DEGRADED_TTL_SECONDS=1)
    own_redis.kill()
    await get_until_degraded(service)
    await service.get()
    assert (await service.get()).headers["X-FastAPI-Cache"] == "HIT"

    await asyncio.sleep(1.1)

    assert (await service.get()).headers["X-FastAPI-Cache"] == "MISS"


async def test_a_burst_beyond_the_connection_pool_on_a_healthy_redis_is_no_outage(
    start_service: StartService, own_redis: RedisServer, cache_log: pytest.LogCaptureFixture
) -> None:
    # More concurrent requests than the pool has connections: the excess wait for one, or find
    # none; either way this process is busy, Redis is not down. (A timeout far above a loaded
    # event loop's delays, so that only the pool is tested.)
    service = await start_service(
        own_redis.url,
        REDIS_MAX_CONNECTIONS=10,
        REDIS_SOCKET_TIMEOUT_SECONDS=1.0,
        REDIS_CONNECT_TIMEOUT_SECONDS=1.0,
    )
    await asyncio.gather(*(service.get(f"tenant{n}", bound=3.0) for n in range(40)))

    assert cache_status().backend == "redis"
    assert logged_states(cache_log) == ["redis"]
