"""The keys in Redis are exactly the caching guide's, under the service's prefix ``ib-cache``."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from httpx import AsyncClient
from redis.asyncio import Redis

from commons.testing.redis_server import RedisServer

Bearer = Callable[..., dict[str, str]]
StartService = Callable[..., AbstractAsyncContextManager[AsyncClient]]


def md5(canonical_query: str) -> str:
    return hashlib.md5(canonical_query.encode()).hexdigest()


async def all_keys(server: RedisServer) -> set[str]:
    client = Redis.from_url(server.url, decode_responses=True)
    try:
        return {key async for key in client.scan_iter(count=1000)}
    finally:
        await client.aclose()


async def test_entries_are_stored_under_the_guides_key_format(
    start_service: StartService, redis_server: RedisServer, bearer: Bearer
) -> None:
    redis_server.command("FLUSHALL")
    async with start_service(REDIS_URL=redis_server.url) as client:
        await client.get("/v1/tenant/config", headers=bearer(1, "alice"))
        await client.get("/v1/users/me", headers=bearer(2, "carol"))
        await client.get("/v1/insights?size=5&page=2", headers=bearer(1, "alice"))
        keys = await all_keys(redis_server)

    entries = {key for key in keys if not key.startswith("ib-cache:#")}
    assert entries == {
        f"ib-cache:tenant_config:tenant_1:/v1/tenant/config:{md5('')}",
        f"ib-cache:users_me:tenant_2:user_carol:/v1/users/me:{md5('')}",
        f"ib-cache:insights:tenant_1:/v1/insights:{md5('page=2&size=5')}",
    }
    assert all(key.startswith("ib-cache:") for key in keys)


async def test_updating_a_config_removes_its_entry_from_redis(
    start_service: StartService, redis_server: RedisServer, bearer: Bearer
) -> None:
    redis_server.command("FLUSHALL")
    async with start_service(REDIS_URL=redis_server.url) as client:
        for tenant_id in (1, 2):
            await client.get("/v1/tenant/config", headers=bearer(tenant_id, "alice"))
        await client.put(
            "/v1/tenant/config",
            headers=bearer(1, "alice"),
            json={"display_name": "A", "timezone": "UTC", "currency": "USD", "features": []},
        )
        keys = await all_keys(redis_server)

    entries = {key for key in keys if not key.startswith("ib-cache:#")}
    assert entries == {f"ib-cache:tenant_config:tenant_2:/v1/tenant/config:{md5('')}"}
