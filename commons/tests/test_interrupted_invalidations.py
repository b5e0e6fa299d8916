"""An invalidation interrupted on its way to Redis is still applied, and costs no outage.

Two interruptions that are not Redis being down: the caller gives up (its task is cancelled: a
client timeout, a shutdown) while the invalidation waits on Redis, and a burst of invalidations
finds every pooled connection in use (``REDIS_MAX_CONNECTIONS``). In both, the value invalidated is
never served afterwards, and a busy pool does not take the replica off Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from commons.cache import (
    CacheSettings,
    cache,
    cache_status,
    init_cache,
    invalidate_namespace,
)
from commons.testing import current_layer
from commons.testing.redis_server import RedisServer
from commons.utilities.context import get_tenant_id

TENANTS = [f"tenant{n}" for n in range(8)]


class Service:
    """One tenant-scoped cached route whose body shows the tenant's version."""

    def __init__(self) -> None:
        self.versions: defaultdict[str, int] = defaultdict(lambda: 1)
        self.client: httpx.AsyncClient

    async def get(self, tenant: str) -> httpx.Response:
        response = await self.client.get("/config", headers={"X-Test-Tenant": tenant})
        assert response.status_code == 200
        return response


@pytest.fixture
def start_service(
    make_identity_app: Callable[[], FastAPI],
    make_settings: Callable[..., CacheSettings],
    app_clients: Callable[[FastAPI], httpx.AsyncClient],
) -> Callable[..., Any]:
    async def start(redis_url: str, **overrides: object) -> Service:
        await init_cache(make_settings(redis_url, **overrides))
        service = Service()
        app = make_identity_app()

        @app.get("/config")
        @cache(expire=60, namespace="config")
        async def config() -> dict[str, Any]:
            tenant = get_tenant_id()
            assert tenant is not None
            return {"tenant": tenant, "version": service.versions[tenant]}

        service.client = app_clients(app)
        return service

    return start


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not reached in time: {cache_status()}"
        await asyncio.sleep(0.02)


async def test_an_invalidation_whose_caller_gives_up_is_still_applied(
    start_service: Callable[..., Any], own_redis: RedisServer
) -> None:
    service = await start_service(
        own_redis.url,
        REDIS_SOCKET_TIMEOUT_SECONDS=0.2,
        REDIS_CONNECT_TIMEOUT_SECONDS=0.2,
        CACHE_RECOVERY_INTERVAL_SECONDS=0.2,
    )
    await service.get("acme")
    assert (await service.get("acme")).headers["X-FastAPI-Cache"] == "HIT"
    service.versions["acme"] = 2
    # The cache's connections were dropped (an idle timeout, a proxy), then Redis stalls: the
    # invalidation waits on a new connection, and its caller gives up before Redis answers.
    own_redis.command("CLIENT", "KILL", "TYPE", "normal")
    own_redis.pause()
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(invalidate_namespace("config", tenant_id="acme"), 0.05)
    finally:
        own_redis.resume()

    # Applied then, or kept and applied on the way back: either way before anything is read.
    layer = current_layer()
    assert layer is not None
    await layer.removals_settled()
    await wait_until(lambda: cache_status().backend == "redis")
    await wait_until(lambda: cache_status().pending_invalidations == 0)
    after = await service.get("acme")
    assert after.json() == {"tenant": "acme", "version": 2}
    assert after.headers["X-FastAPI-Cache"] == "MISS"


async def test_invalidations_beyond_the_connection_pool_are_applied_without_an_outage(
    start_service: Callable[..., Any],
    own_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="commons.cache")
    # A timeout far above the stall below, so that only the pool is tested.
    service = await start_service(
        own_redis.url,
        REDIS_MAX_CONNECTIONS=2,
        REDIS_SOCKET_TIMEOUT_SECONDS=1.0,
        REDIS_CONNECT_TIMEOUT_SECONDS=1.0,
    )
    for tenant in TENANTS:
        await service.get(tenant)
        service.versions[tenant] = 2

    # Another client's slow command holds Redis for a moment: a burst of updates finds both
    # pooled connections waiting on it.
    sleeper = asyncio.create_task(asyncio.to_thread(own_redis.command, "DEBUG", "SLEEP", "0.3"))
    await asyncio.sleep(0.05)
    await asyncio.gather(*(invalidate_namespace("config", tenant_id=tenant) for tenant in TENANTS))
    assert (await sleeper).startswith(b"+OK")

    assert cache_status().backend == "redis"
    assert cache_status().pending_invalidations == 0
    states = [r.getMessage() for r in caplog.records if r.name == "commons.cache"]
    assert not [line for line in states if "degraded" in line], states
    for tenant in TENANTS:
        after = await service.get(tenant)
        assert after.json() == {"tenant": tenant, "version": 2}
        assert after.headers["X-FastAPI-Cache"] == "MISS"
