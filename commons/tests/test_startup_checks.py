"""Mistakes ``init_cache()`` warns about once the service starts: ``@cache`` above the route
decorator, and several uvicorn workers without ``PROMETHEUS_MULTIPROC_DIR`` (real processes)."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from commons.cache import CacheSettings, cache, init_cache
from commons.testing.waiting import eventually

MULTIPROC_WARNING = "uvicorn workers without PROMETHEUS_MULTIPROC_DIR"
MEMORY_WARNING = "uvicorn workers on the in-memory cache (REDIS_URL is not set)"


@pytest.fixture
def app() -> Iterator[FastAPI]:
    """An app whose routes are dropped after the test (the check looks at every live route)."""
    app = FastAPI()
    yield app
    app.router.routes.clear()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def test_cache_above_the_route_decorator_is_one_warning_naming_the_route_and_the_fix(
    app: FastAPI, make_settings: Callable[..., CacheSettings], caplog: pytest.LogCaptureFixture
) -> None:
    @cache(namespace="orders")
    @app.get("/orders")
    async def orders() -> list[str]:
        return []

    with caplog.at_level(logging.WARNING, logger="commons.cache"):
        await init_cache(make_settings())

    [warning] = warnings_of(caplog)
    assert "GET /orders" in warning
    assert "never cached" in warning
    assert "put @cache below @app.get(...)" in warning


async def test_one_handler_mounted_uncached_and_cached_starts_without_a_warning(
    app: FastAPI, make_settings: Callable[..., CacheSettings], caplog: pytest.LogCaptureFixture
) -> None:
    async def orders() -> list[str]:
        return []

    app.get("/orders/live")(orders)
    app.get("/orders")(cache(namespace="orders")(orders))
    app.get("/orders/per-tenant")(cache(namespace="tenant_orders")(orders))

    with caplog.at_level(logging.WARNING, logger="commons.cache"):
        await init_cache(make_settings())

    assert warnings_of(caplog) == []


async def test_cache_below_the_route_decorator_starts_without_a_warning(
    app: FastAPI, make_settings: Callable[..., CacheSettings], caplog: pytest.LogCaptureFixture
) -> None:
    @app.get("/orders")
    @cache(namespace="orders")
    async def orders() -> list[str]:
        return []

    with caplog.at_level(logging.WARNING, logger="commons.cache"):
        await init_cache(make_settings())

    assert warnings_of(caplog) == []


def start_workers(start_replicas: Callable[..., list[str]], tmp_path: Path, workers: int) -> Path:
    """One uvicorn of ``replica_app`` with ``workers`` workers, in memory; its log file."""
    database = tmp_path / "replicas.sqlite"
    database.touch()
    start_replicas(1, workers=workers, REPLICA_DB=str(database), CACHE_PREFIX="workers-test")
    return tmp_path / "replica-0.log"


async def test_two_uvicorn_workers_without_prometheus_multiproc_dir_each_warn_naming_it(
    start_replicas: Callable[..., list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    log = start_workers(start_replicas, tmp_path, workers=2)

    async def both_warned() -> bool:
        return log.read_text().count(MULTIPROC_WARNING) == 2

    await eventually(both_warned, "a warning from each of the two workers")
    assert "2 uvicorn workers without PROMETHEUS_MULTIPROC_DIR" in log.read_text()


async def test_two_uvicorn_workers_on_the_in_memory_cache_each_warn_that_they_cache_apart(
    start_replicas: Callable[..., list[str]], tmp_path: Path
) -> None:
    # Each worker's own memory: an invalidation made by one never reaches the other.
    log = start_workers(start_replicas, tmp_path, workers=2)

    async def both_warned() -> bool:
        return log.read_text().count(MEMORY_WARNING) == 2

    await eventually(both_warned, "a warning from each of the two workers")
    assert "set REDIS_URL, or CACHE_ENABLED=false, or run one worker" in log.read_text()


async def test_two_uvicorn_workers_on_redis_say_nothing_about_the_in_memory_cache(
    start_replicas: Callable[..., list[str]],
    tmp_path: Path,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    database = tmp_path / "replicas.sqlite"
    database.touch()
    start_replicas(
        1, workers=2, REPLICA_DB=str(database), CACHE_PREFIX="workers-test", REDIS_URL=redis_url
    )
    log = tmp_path / "replica-0.log"

    async def both_started() -> bool:  # each worker's other warning says it ran its checks
        return log.read_text().count(MULTIPROC_WARNING) == 2

    await eventually(both_started, "both workers' start-up checks")
    assert MEMORY_WARNING not in log.read_text()


async def test_one_uvicorn_worker_says_nothing_about_prometheus_multiproc_dir(
    start_replicas: Callable[..., list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    log = start_workers(start_replicas, tmp_path, workers=1)

    assert MULTIPROC_WARNING not in log.read_text()
    assert MEMORY_WARNING not in log.read_text()


async def test_a_dead_weak_proxy_on_the_heap_does_not_stop_the_start(
    make_settings: Callable[..., CacheSettings],
) -> None:
    class Referent:
        pass

    referent = Referent()
    proxy = weakref.proxy(referent)
    del referent

    await init_cache(make_settings())

    assert proxy is not None  # kept on the heap while init_cache() looked
