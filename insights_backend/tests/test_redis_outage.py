"""No lost invalidation: a config updated while Redis is unreachable is never served stale.

The cache keeps the invalidation made during the outage and applies it to Redis before reading
from Redis again (commons.cache.layer), so the stale entry still in Redis is never returned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest
from httpx import AsyncClient

from commons.cache import cache_status
from commons.testing.redis_server import RedisServer

Bearer = Callable[..., dict[str, str]]
StartService = Callable[..., AbstractAsyncContextManager[AsyncClient]]

FAST_FAILING_CACHE = {
    "CACHE_RECOVERY_INTERVAL_SECONDS": "0.2",
    "REDIS_SOCKET_TIMEOUT_SECONDS": "0.2",
    "REDIS_CONNECT_TIMEOUT_SECONDS": "0.2",
}
NEW_CONFIG = {
    "display_name": "Acme During The Outage",
    "timezone": "UTC",
    "currency": "EUR",
    "features": [],
}
#: Far above the 0.2 s timeouts, far below a hang.
QUICK_SECONDS = 2.0


async def wait_until_back_on_redis(limit_seconds: float = 5.0) -> None:
    deadline = time.monotonic() + limit_seconds
    while cache_status().backend != "redis":
        assert time.monotonic() < deadline, f"still {cache_status()}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("outage", ["stopped", "killed"])
async def test_a_config_updated_during_a_redis_outage_is_served_fresh_afterwards(
    start_service: StartService, own_redis: RedisServer, bearer: Bearer, outage: str
) -> None:
    alice = bearer(1, "alice")
    async with start_service(REDIS_URL=own_redis.url, **FAST_FAILING_CACHE) as client:
        await client.get("/v1/tenant/config", headers=alice)
        warm = await client.get("/v1/tenant/config", headers=alice)
        assert warm.headers["X-FastAPI-Cache"] == "HIT"

        if outage == "stopped":
            own_redis.pause()
        else:
            own_redis.kill()
        started = time.monotonic()
        updated = await client.put("/v1/tenant/config", headers=alice, json=NEW_CONFIG)
        put_seconds = time.monotonic() - started
        if outage == "stopped":
            own_redis.resume()
        else:
            own_redis.start()

        await wait_until_back_on_redis()
        after = await client.get("/v1/tenant/config", headers=alice)

    assert updated.status_code == 200
    assert put_seconds < QUICK_SECONDS
    assert after.status_code == 200
    assert after.json()["display_name"] == "Acme During The Outage"
    assert after.json() == updated.json()
