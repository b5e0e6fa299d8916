"""``init_cache()`` picks the backend, ``close_cache()`` lets go, ``cache_status()`` says which."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from fastapi import FastAPI

from commons.cache import (
    CacheSettings,
    CacheUnavailableError,
    cache,
    cache_settings,
    cache_status,
    close_cache,
    init_cache,
)
from commons.testing import current_layer
from commons.testing.redis_server import RedisServer, free_port
from commons.testing.waiting import eventually
from commons.utilities.context import get_tenant_id

from _support import client_for

ACME = {"X-Test-Tenant": "acme"}
MD5_OF_NOTHING = "d41d8cd98f00b204e9800998ecf8427e"  # md5(b"")


@pytest.fixture(autouse=True)
async def _closed_afterwards() -> AsyncIterator[None]:
    yield
    await close_cache()


@pytest.fixture
def cached_app(make_identity_app: Callable[[], FastAPI]) -> tuple[FastAPI, list[str]]:
    """``GET /config`` cached in namespace ``cfg``; the list records each handler run."""
    app = make_identity_app()
    runs: list[str] = []

    @app.get("/config")
    @cache(namespace="cfg")
    async def config() -> dict[str, str | int | None]:
        runs.append("run")
        return {"tenant": get_tenant_id(), "run": len(runs)}

    return app, runs


async def cache_headers(app: FastAPI, requests: int) -> list[str | None]:
    """The ``X-FastAPI-Cache`` header of each of ``requests`` identical requests."""
    async with client_for(app) as client:
        return [
            (await client.get("/config", headers=ACME)).headers.get("X-FastAPI-Cache")
            for _ in range(requests)
        ]


def unreachable_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


# -- choosing the backend -------------------------------------------------------------------------


async def test_without_redis_url_the_cache_is_in_memory(
    make_settings: Callable[..., CacheSettings], cached_app: tuple[FastAPI, list[str]]
) -> None:
    await init_cache(make_settings(None))

    status = cache_status()
    assert status.backend == "memory"
    assert status.redis_configured is False
    assert await cache_headers(cached_app[0], 2) == ["MISS", "HIT"]


async def test_with_a_reachable_redis_url_the_cache_is_redis(
    make_settings: Callable[..., CacheSettings],
    redis_server: RedisServer,
    redis_url: str,
    cached_app: tuple[FastAPI, list[str]],
) -> None:
    settings = make_settings(redis_url)
    await init_cache(settings)

    assert cache_status().backend == "redis"
    assert await cache_headers(cached_app[0], 2) == ["MISS", "HIT"]
    key = f"{settings.CACHE_PREFIX}:cfg:tenant_acme:/config:{MD5_OF_NOTHING}"
    assert redis_server.command("EXISTS", key) == b":1\r\n"


async def test_cache_status_says_what_the_near_cache_holds(
    make_settings: Callable[..., CacheSettings],
    redis_url: str,
    cached_app: tuple[FastAPI, list[str]],
) -> None:
    await init_cache(make_settings(redis_url))
    assert (cache_status().near_cache_entries, cache_status().near_cache_bytes) == (0, 0)

    async def kept() -> bool:
        # A read from Redis is kept once the near cache's tracking is on.
        await cache_headers(cached_app[0], 1)
        return cache_status().near_cache_entries == 1

    await eventually(kept, "the entry held by the near cache")
    assert cache_status().near_cache_bytes > len(MD5_OF_NOTHING)
    await close_cache()
    assert cache_status().near_cache_entries == 0


async def test_calling_init_cache_again_reinitialises(
    make_settings: Callable[..., CacheSettings],
    redis_url: str,
    cached_app: tuple[FastAPI, list[str]],
) -> None:
    app, runs = cached_app
    await init_cache(make_settings(None))
    first_layer = current_layer()
    assert await cache_headers(app, 2) == ["MISS", "HIT"]

    await init_cache(make_settings(None))
    assert current_layer() is not first_layer
    assert cache_status().backend == "memory"
    assert await cache_headers(app, 1) == ["MISS"]  # a fresh store

    await init_cache(make_settings(redis_url))
    assert cache_status().backend == "redis"
    assert await cache_headers(app, 2) == ["MISS", "HIT"]

    await init_cache(make_settings(None))
    assert cache_status().backend == "memory"
    assert runs == ["run"] * 3


async def test_unreachable_redis_logs_one_warning_and_serves_from_memory(
    make_settings: Callable[..., CacheSettings],
    cached_app: tuple[FastAPI, list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, runs = cached_app
    with caplog.at_level(logging.WARNING, logger="commons.cache"):
        await init_cache(make_settings(unreachable_url()))
        status = cache_status()
        headers = await cache_headers(app, 3)

    assert status.backend == "degraded"
    assert status.redis_configured is True
    assert headers == ["MISS", "HIT", "HIT"]
    assert runs == ["run"]
    assert cache_status().memory_entries == 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "redis" in warnings[0].getMessage().lower()


async def test_the_reason_of_a_degraded_start_says_each_thing_once(
    make_settings: Callable[..., CacheSettings],
) -> None:
    await init_cache(make_settings(unreachable_url()))
    reason = cache_status().reason

    assert reason.startswith("at start-up, Redis unavailable: ConnectionError"), reason
    assert reason.count("unavailable") == 1, reason


async def test_a_database_the_server_does_not_have_is_named_as_a_mistake_in_redis_url(
    make_settings: Callable[..., CacheSettings],
    cached_app: tuple[FastAPI, list[str]],
    redis_url: str,
) -> None:
    # Only the server knows how many databases it has (16 by default): the settings cannot.
    app, runs = cached_app
    await init_cache(make_settings(redis_url.rsplit("/", 1)[0] + "/99"))

    status = cache_status()
    assert status.backend == "degraded"
    assert "REDIS_URL names a database this server does not have" in status.reason
    assert "unavailable" not in status.reason
    assert "permission" not in status.reason
    assert await cache_headers(app, 2) == ["MISS", "HIT"]  # the in-memory tier serves
    assert runs == ["run"]


async def test_fail_fast_with_unreachable_redis_refuses_to_start(
    make_settings: Callable[..., CacheSettings],
) -> None:
    url = unreachable_url()
    with pytest.raises(CacheUnavailableError) as refused:
        await init_cache(make_settings(url, CACHE_FAIL_FAST=True))

    message = str(refused.value)
    assert "Redis" in message
    assert "CACHE_FAIL_FAST" in message
    assert cache_status().backend == "disabled"  # nothing half-initialised stays behind


async def test_fail_fast_with_reachable_redis_starts_on_redis(
    make_settings: Callable[..., CacheSettings], redis_url: str
) -> None:
    await init_cache(make_settings(redis_url, CACHE_FAIL_FAST=True))
    assert cache_status().backend == "redis"


@pytest.mark.parametrize("redis", [False, True], ids=["no-redis-url", "redis-url"])
async def test_cache_enabled_false_is_disabled_whatever_the_redis_url(
    make_settings: Callable[..., CacheSettings],
    request: pytest.FixtureRequest,
    cached_app: tuple[FastAPI, list[str]],
    redis: bool,
) -> None:
    url = request.getfixturevalue("redis_url") if redis else None
    await init_cache(make_settings(url, CACHE_ENABLED=False))

    assert cache_status().backend == "disabled"
    assert await cache_headers(cached_app[0], 2) == [None, None]
    assert cached_app[1] == ["run", "run"]


# -- closing and status ---------------------------------------------------------------------------


async def test_close_cache_is_safe_to_call_twice(
    make_settings: Callable[..., CacheSettings], redis_url: str
) -> None:
    await init_cache(make_settings(redis_url))
    await close_cache()
    await close_cache()
    assert cache_status().backend == "disabled"


async def test_after_close_requests_are_served_uncached(
    make_settings: Callable[..., CacheSettings], cached_app: tuple[FastAPI, list[str]]
) -> None:
    await init_cache(make_settings(None))
    await close_cache()

    assert await cache_headers(cached_app[0], 2) == [None, None]
    assert cached_app[1] == ["run", "run"]


def test_cache_status_before_init_says_disabled() -> None:
    # A fresh interpreter: nothing in this test session has initialised it.
    script = (
        "from commons.cache import cache_status\n"
        "status = cache_status()\n"
        "print(status.backend, status.redis_configured)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split() == ["disabled", "False"]


# -- configuration from the environment -----------------------------------------------------------


async def test_init_cache_without_arguments_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
    redis_url: str,
    cached_app: tuple[FastAPI, list[str]],
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("CACHE_PREFIX", "env-svc")
    monkeypatch.setenv("CACHE_TTL_SECONDS", "123")
    cache_settings.cache_clear()

    await init_cache()

    assert cache_status().backend == "redis"
    assert await cache_headers(cached_app[0], 1) == ["MISS"]
    pttl = int(
        redis_server.command("PTTL", f"env-svc:cfg:tenant_acme:/config:{MD5_OF_NOTHING}")[1:]
    )
    assert 121_000 < pttl <= 123_000


async def test_init_cache_without_arguments_and_without_redis_url_is_in_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CACHE_PREFIX", "env-svc")
    cache_settings.cache_clear()

    await init_cache()

    assert cache_status().backend == "memory"
    layer = current_layer()
    assert layer is not None
    assert layer.prefix == "env-svc"


# -- time budget ----------------------------------------------------------------------------------


async def test_init_against_a_black_holed_redis_returns_within_its_timeouts(
    make_settings: Callable[..., CacheSettings],
    own_redis: RedisServer,
    cached_app: tuple[FastAPI, list[str]],
) -> None:
    settings = make_settings(
        own_redis.url, REDIS_CONNECT_TIMEOUT_SECONDS=0.3, REDIS_SOCKET_TIMEOUT_SECONDS=0.3
    )
    own_redis.pause()  # accepts connections in the kernel, never answers
    try:
        started = time.monotonic()
        await init_cache(settings)
        elapsed = time.monotonic() - started

        assert elapsed < 2.0
        assert cache_status().backend == "degraded"
        assert await cache_headers(cached_app[0], 2) == ["MISS", "HIT"]
        started = time.monotonic()
        await close_cache()
        assert time.monotonic() - started < 2.0
    finally:
        own_redis.resume()


def test_the_backend_chosen_is_in_uvicorns_default_log(
    start_replicas: Callable[..., list[str]], tmp_path: Path
) -> None:
    database = tmp_path / "replicas.sqlite"
    database.touch()
    start_replicas(1, log_level="info", REPLICA_DB=str(database), CACHE_PREFIX="log-test")
    log = (tmp_path / "replica-0.log").read_text()

    assert "cache backend: memory" in log, log
    assert log.index("cache backend: memory") < log.index("Application startup complete")
