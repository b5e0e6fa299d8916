"""The master found through Sentinel (``REDIS_SENTINELS``, ``REDIS_SENTINEL_MASTER``), and followed
through a ``SENTINEL FAILOVER``: entries survive on the promoted replica, and writes and
invalidations go to it (an invalidation made while the switch-over is under way is applied
again once it is over: see ``test_failover.py``)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi import FastAPI

from commons.cache import (
    cache_status,
    invalidate_namespace,
)
from commons.testing.redis_sentinel import LocalSentinel

pytestmark = pytest.mark.slow


@pytest.fixture
def client(sentinel_client: httpx.AsyncClient) -> httpx.AsyncClient:
    return sentinel_client


async def get(client: httpx.AsyncClient, tenant: str = "t1") -> httpx.Response:
    return await client.get("/config", headers={"X-Test-Tenant": tenant})


async def test_the_master_is_found_through_the_sentinel(client: httpx.AsyncClient) -> None:
    assert cache_status().backend == "redis"
    assert (await get(client)).headers["X-FastAPI-Cache"] == "MISS"
    assert (await get(client)).headers["X-FastAPI-Cache"] == "HIT"


async def test_the_cache_follows_a_sentinel_failover(
    client: httpx.AsyncClient, sentinel: LocalSentinel
) -> None:
    await get(client, "t1")

    promoted = sentinel.failover()

    # The entry was replicated before the switch; it is read from the new master.
    assert (await get(client, "t1")).headers["X-FastAPI-Cache"] == "HIT"
    # Writes and invalidations reach the new master.
    assert (await get(client, "t2")).headers["X-FastAPI-Cache"] == "MISS"
    app: FastAPI = client._transport.app  # type: ignore[attr-defined]
    app.state.version["n"] = 2
    await invalidate_namespace("tenant_config")
    # An invalidation no replica confirmed (the old master is not converted yet: up to about ten
    # seconds) is kept and applied again once one does; meanwhile nothing old is served.
    deadline = time.monotonic() + 30
    while cache_status().backend != "redis":
        for tenant in ("t1", "t2"):
            assert (await get(client, tenant)).json() == {"version": 2}
        assert time.monotonic() < deadline, "the kept invalidation was not applied again"
        await asyncio.sleep(0.05)
    for tenant in ("t1", "t2"):
        response = await get(client, tenant)
        assert response.json() == {"version": 2}
    assert (await get(client, "t2")).headers["X-FastAPI-Cache"] == "HIT"
    assert int(promoted.command("DBSIZE")[1:].strip()) > 0
    assert cache_status().backend == "redis"
