"""Stampede protection across replicas: with distributed_lock (or CACHE_DISTRIBUTED_LOCK), a short
Redis lock (SET NX PX with a random token, released only by its owner) makes replicas compute a
missing entry once."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import anyio
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from commons.cache import CacheSettings, cache, close_cache, init_cache
from commons.cache.layer import CacheLayer
from commons.cache.replica_lock import under_replica_lock
from commons.testing import current_layer
from commons.testing.entries import fill, route_fingerprint_of
from commons.testing.proxy import LoopbackProxy

from _support import client_for

TENANT = {"X-Test-Tenant": "acme"}
KEY = f"test-cache:reports:tenant_acme:/report:{hashlib.md5(b'').hexdigest()}"
LOCK_KEY = f"test-cache:#lock:{KEY}"

REPLICA = """
import asyncio, json, sys, time
import httpx
from fastapi import Depends, FastAPI
from redis.asyncio import Redis
from commons.cache import CacheSettings, cache, close_cache, init_cache
from commons.utilities.context import set_tenant_id

redis_url, start_at = sys.argv[1], float(sys.argv[2])

async def tenant() -> None:
    set_tenant_id("acme")

app = FastAPI(dependencies=[Depends(tenant)])

@app.get("/report")
@cache(namespace="reports", distributed_lock=True)
async def report() -> dict[str, object]:
    counter = Redis.from_url(redis_url)
    try:
        await counter.incr("handler-runs")
    finally:
        await counter.aclose()
    await asyncio.sleep(0.3)
    return {"title": "Quarterly", "rows": list(range(50))}

async def main() -> None:
    await init_cache(CacheSettings(CACHE_PREFIX="test-cache", REDIS_URL=redis_url))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        await asyncio.sleep(max(start_at - time.time(), 0))
        responses = await asyncio.gather(*(client.get("/report") for _ in range(10)))
    await close_cache()
    print(json.dumps([[r.status_code, r.text, r.headers["etag"]] for r in responses]))

asyncio.run(main())
"""


@pytest.mark.slow
def test_two_processes_with_concurrent_cold_requests_run_the_handler_once(
    redis_url: str, tmp_path: Path
) -> None:
    script = tmp_path / "replica.py"
    script.write_text(REPLICA)
    start_at = time.time() + 3
    replicas = [
        subprocess.Popen(
            [sys.executable, str(script), redis_url, str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        for seed in ("1", "2")
    ]
    outputs = [replica.communicate(timeout=60) for replica in replicas]

    assert [replica.returncode for replica in replicas] == [0, 0], outputs
    answers = [answer for out, _ in outputs for answer in json.loads(out)]
    assert len(answers) == 20
    assert {status for status, _, _ in answers} == {200}
    assert len({body for _, body, _ in answers}) == 1
    assert len({etag for _, _, etag in answers}) == 1  # the same ETag in both processes
    assert count_handler_runs(redis_url) == 1


def count_handler_runs(redis_url: str) -> int:
    async def read() -> int:
        client = Redis.from_url(redis_url)
        try:
            return int(await client.get("handler-runs") or 0)
        finally:
            await client.aclose()

    return asyncio.run(read())


# -- the lock itself ------------------------------------------------------------------------------


@pytest.fixture
async def redis_layer(
    redis_url: str, make_settings: Callable[..., CacheSettings], request: pytest.FixtureRequest
) -> AsyncIterator[CacheLayer]:
    """The cache on Redis with CACHE_LOCK_TIMEOUT_SECONDS of 0.5 s (or the test's indirect
    parameter)."""
    lock_timeout = getattr(request, "param", 0.5)
    await init_cache(make_settings(redis_url, CACHE_LOCK_TIMEOUT_SECONDS=lock_timeout))
    layer = current_layer()
    assert layer is not None
    try:
        yield layer
    finally:
        await close_cache()


async def test_the_lock_is_released_only_by_the_token_that_took_it(redis_layer: CacheLayer) -> None:
    assert await redis_layer.try_lock("test-cache:#lock:k", b"owner", 10_000) is True
    assert await redis_layer.try_lock("test-cache:#lock:k", b"intruder", 10_000) is False

    await redis_layer.unlock("test-cache:#lock:k", b"intruder")
    still_held = await redis_layer.try_lock("test-cache:#lock:k", b"third", 10_000)
    await redis_layer.unlock("test-cache:#lock:k", b"owner")
    free_again = await redis_layer.try_lock("test-cache:#lock:k", b"third", 10_000)

    assert still_held is False
    assert free_again is True


async def test_the_lock_expires_by_itself(redis_layer: CacheLayer, redis_url: str) -> None:
    await redis_layer.try_lock("test-cache:#lock:k", b"owner", 5_000)
    client = Redis.from_url(redis_url)
    try:
        pttl = await client.pttl("test-cache:#lock:k")
    finally:
        await client.aclose()

    assert 0 < pttl <= 5_000


class Gate:
    def __init__(self) -> None:
        self.calls = 0
        self.entered = asyncio.Event()
        self.entered_twice = asyncio.Event()
        self.entered_at: list[float] = []
        self.open = asyncio.Event()

    async def run(self) -> dict[str, int]:
        self.calls += 1
        self.entered_at.append(asyncio.get_running_loop().time())
        self.entered.set()
        if self.calls >= 2:
            self.entered_twice.set()
        await self.open.wait()
        return {"calls": self.calls}


def locked_app(make_identity_app: Callable[[], FastAPI], gate: Gate, lock: bool | None) -> FastAPI:
    app = make_identity_app()

    @app.get("/report")
    @cache(namespace="reports", distributed_lock=lock)
    async def report() -> dict[str, int]:
        return await gate.run()

    return app


async def lock_state(redis_url: str) -> tuple[bytes | None, int]:
    client = Redis.from_url(redis_url)
    try:
        return await client.get(LOCK_KEY), await client.pttl(LOCK_KEY)
    finally:
        await client.aclose()


@pytest.mark.parametrize("lock_from", ["decorator", "environment"])
async def test_a_miss_holds_a_short_lock_with_a_random_token_while_it_computes(
    redis_url: str,
    make_settings: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
    lock_from: str,
) -> None:
    by_env = lock_from == "environment"
    await init_cache(make_settings(redis_url, CACHE_DISTRIBUTED_LOCK=by_env))
    gate = Gate()
    try:
        async with client_for(locked_app(make_identity_app, gate, None if by_env else True)) as c:
            request = asyncio.create_task(c.get("/report", headers=TENANT))
            await asyncio.wait_for(gate.entered.wait(), 5)
            token, pttl = await lock_state(redis_url)
            gate.open.set()
            await request
            after, _ = await lock_state(redis_url)
    finally:
        await close_cache()

    assert token is not None
    assert len(token) == 16
    assert 0 < pttl <= 10_000  # CACHE_LOCK_TIMEOUT_SECONDS
    assert after is None


async def test_without_the_lock_no_lock_key_is_written(
    redis_layer: CacheLayer, redis_url: str, make_identity_app: Callable[[], FastAPI]
) -> None:
    gate = Gate()
    async with client_for(locked_app(make_identity_app, gate, None)) as client:
        request = asyncio.create_task(client.get("/report", headers=TENANT))
        await asyncio.wait_for(gate.entered.wait(), 5)
        token, _ = await lock_state(redis_url)
        gate.open.set()
        await request

    assert token is None


async def test_a_replica_waits_for_the_lock_holder_s_entry_instead_of_computing(
    redis_layer: CacheLayer, make_identity_app: Callable[[], FastAPI]
) -> None:
    gate = Gate()
    gate.open.set()
    assert await redis_layer.try_lock(LOCK_KEY, b"other-replica", 10_000)
    app = locked_app(make_identity_app, gate, True)
    async with client_for(app) as client:
        request = asyncio.create_task(client.get("/report", headers=TENANT))
        await asyncio.sleep(0.1)
        # The other replica (the same route) stores its answer, then releases its lock.
        await fill(
            KEY, b'{"from":"other replica"}', 60, fingerprint=route_fingerprint_of(app, "/report")
        )
        await redis_layer.unlock(LOCK_KEY, b"other-replica")
        response = await asyncio.wait_for(request, 5)

    assert response.json() == {"from": "other replica"}
    assert gate.calls == 0


async def test_a_replica_computes_itself_when_the_holder_never_answers(
    redis_layer: CacheLayer, make_identity_app: Callable[[], FastAPI]
) -> None:
    gate = Gate()
    gate.open.set()
    assert await redis_layer.try_lock(LOCK_KEY, b"dead-replica", 60_000)
    async with client_for(locked_app(make_identity_app, gate, True)) as client:
        response = await asyncio.wait_for(client.get("/report", headers=TENANT), 5)

    assert response.status_code == 200
    assert response.json() == {"calls": 1}
    assert gate.calls == 1


@asynccontextmanager
async def two_misses_behind_a_dead_replica(
    redis_layer: CacheLayer, make_identity_app: Callable[[], FastAPI], gate: Gate
) -> AsyncIterator[tuple[asyncio.Task[httpx.Response], asyncio.Task[httpx.Response], float]]:
    """Another replica holds the key's lock and never answers; a first miss, then 0.1 s later a
    second one: their tasks, and the loop time the second was asked at."""
    assert await redis_layer.try_lock(LOCK_KEY, b"dead-replica", 60_000)
    loop = asyncio.get_running_loop()
    async with client_for(locked_app(make_identity_app, gate, True)) as client:
        first = asyncio.create_task(client.get("/report", headers=TENANT))
        await asyncio.sleep(0.1)
        asked = loop.time()
        yield first, asyncio.create_task(client.get("/report", headers=TENANT)), asked


async def test_a_request_waits_at_most_the_lock_timeout_before_computing_itself(
    redis_layer: CacheLayer, make_identity_app: Callable[[], FastAPI]
) -> None:
    # CACHE_LOCK_TIMEOUT_SECONDS is 0.5 s. Another replica holds the lock and never answers;
    # this process's first miss waits for it, then computes (slowly). A second miss waits for
    # that first one; once its own 0.5 s are over it computes at once, not after waiting for
    # the replicas' lock another 0.5 s.
    gate = Gate()
    async with two_misses_behind_a_dead_replica(redis_layer, make_identity_app, gate) as misses:
        first, second, asked = misses
        await asyncio.wait_for(gate.entered_twice.wait(), 5)
        computing_after = gate.entered_at[1] - asked
        gate.open.set()
        await asyncio.wait_for(asyncio.gather(first, second), 5)

    assert 0.45 <= computing_after < 0.85, computing_after


# A lock timeout of 1 s: the first miss is cancelled 0.4 s before its own wait ends, a margin
# that a loaded machine's late timers keep (with 0.5 s, 0.1 s was not always enough).
@pytest.mark.parametrize("redis_layer", [1.0], indirect=True)
async def test_a_waiter_that_leads_after_a_cancelled_leader_waits_only_what_is_left_of_its_bound(
    redis_layer: CacheLayer, make_identity_app: Callable[[], FastAPI]
) -> None:
    # CACHE_LOCK_TIMEOUT_SECONDS is 1 s. Another replica holds the lock and never answers. This
    # process's first miss waits for it and is cancelled (its client went away) at 0.6 s; the
    # second miss, waiting on the first since 0.1 s, leads then: it waits for the replicas' lock
    # only for what is left of its own 1 s (0.5 s more), not for another 1 s.
    gate = Gate()
    loop = asyncio.get_running_loop()
    async with two_misses_behind_a_dead_replica(redis_layer, make_identity_app, gate) as misses:
        first, second, asked = misses
        await asyncio.sleep(0.5)
        first.cancel()
        cancelled_after = loop.time() - asked
        await asyncio.wait_for(gate.entered.wait(), 5)
        computing_after = gate.entered_at[0] - asked
        gate.open.set()
        await asyncio.wait_for(second, 5)

    assert gate.calls == 1
    assert cancelled_after < 0.85, f"the first miss was cancelled too late: {cancelled_after}"
    assert 0.95 <= computing_after < 1.4, computing_after


async def test_with_the_lock_concurrent_misses_still_run_the_handler_once_per_process(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    gate = Gate()
    async with client_for(locked_app(make_identity_app, gate, True)) as client:
        requests = [asyncio.create_task(client.get("/report", headers=TENANT)) for _ in range(20)]
        await asyncio.wait_for(gate.entered.wait(), 5)
        await asyncio.sleep(0.2)  # the other requests miss too and wait for the computation
        gate.open.set()
        responses = await asyncio.wait_for(asyncio.gather(*requests), 10)

    assert gate.calls == 1
    assert {r.content for r in responses} == {b'{"calls":1}'}


async def cancel_while_computing(client: httpx.AsyncClient, gate: Gate, by: str) -> None:
    """A GET given a deadline that passes while its handler computes, as middleware and task
    groups set one: anyio's cancel scope (which cancels every await again until the scope is
    left) or asyncio's own timeout (which cancels once)."""
    if by == "anyio":
        with anyio.move_on_after(0.3):
            await client.get("/report", headers=TENANT)
    else:
        with suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                await client.get("/report", headers=TENANT)
    assert gate.entered.is_set()


@pytest.mark.parametrize("cancelled_by", ["anyio", "asyncio"])
async def test_a_cancelled_leader_releases_the_replicas_lock_at_once(
    redis_url: str,
    make_settings: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
    cancelled_by: str,
) -> None:
    await init_cache(make_settings(redis_url, CACHE_LOCK_TIMEOUT_SECONDS=5))
    gate = Gate()
    try:
        async with client_for(locked_app(make_identity_app, gate, True)) as client:
            await cancel_while_computing(client, gate, cancelled_by)
            lock_after_cancel, _ = await lock_state(redis_url)
            gate.open.set()
            started = time.monotonic()
            response = await client.get("/report", headers=TENANT)
            waited = time.monotonic() - started
    finally:
        await close_cache()

    assert lock_after_cancel is None
    assert response.status_code == 200
    assert waited < 1.0  # not the lock's 5 s
    assert gate.calls == 2


@pytest.mark.parametrize("cancelled_by", ["anyio", "asyncio"])
async def test_a_leader_cancelled_while_taking_the_lock_leaves_no_lock_behind(
    redis_url: str, make_settings: Callable[..., CacheSettings], cancelled_by: str
) -> None:
    # Redis applied the SET NX; its reply is on its way when the deadline fires. The lock is
    # then this request's, though it never heard so: left, every replica would wait for it to
    # expire (CACHE_LOCK_TIMEOUT_SECONDS) before computing.
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with LoopbackProxy(port) as proxy:
        proxy.reply_delay = 0.3
        await init_cache(make_settings(proxy.url, CACHE_LOCK_TIMEOUT_SECONDS=5))
        layer = current_layer()
        assert layer is not None
        computed: list[str] = []

        async def compute() -> str:
            computed.append("ran")
            return "computed"

        async def nothing_stored() -> None:
            return None

        taking = under_replica_lock(layer, KEY, compute, nothing_stored)
        try:
            if cancelled_by == "anyio":
                with anyio.move_on_after(0.1):
                    await taking
            else:
                task = asyncio.ensure_future(taking)
                await asyncio.sleep(0.1)
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
            lock, _ = await lock_state(redis_url)
        finally:
            await close_cache()

    assert computed == []
    assert lock is None
