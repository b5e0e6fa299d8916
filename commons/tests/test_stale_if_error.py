"""stale_if_error (RFC 5861, 4): when computing a fresh answer fails (the handler raises, or
answers 5xx), an entry that went stale at most that many seconds ago is served instead
(X-FastAPI-Cache: STALE), the failure logged and counted; never an invalidated entry, and past the
window the failure is the answer."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse

from commons.cache import (
    CacheEvents,
    CacheSettings,
    cache,
    cache_status,
    close_cache,
    init_cache,
    invalidate_namespace,
)
from commons.testing.entries import age_entry, stored_value
from commons.testing.redis_server import free_port

from _support import client_for

TENANT = {"X-Test-Tenant": "acme"}
KEY = f"test-cache:rates:tenant_acme:/rates:{hashlib.md5(b'').hexdigest()}"
EXPIRE, STALE_IF_ERROR, STALE_TTL = 60, 30, 10


class Rates:
    """The handler's upstream: answers its version, or fails the way it is told to."""

    def __init__(self) -> None:
        self.version = 1
        self.failure: str | None = None

    def answer(self) -> dict[str, int] | JSONResponse:
        if self.failure == "raises":
            raise RuntimeError("upstream down")
        if self.failure == "503":
            return JSONResponse({"detail": "upstream down"}, status_code=503)
        if self.failure == "http-503":
            raise HTTPException(status_code=503, detail="upstream down")
        if self.failure == "404":
            raise HTTPException(status_code=404, detail="no such rates")
        return {"version": self.version}

    async def answer_later(self) -> dict[str, int] | JSONResponse:
        """:meth:`answer`, once :attr:`gate` is open (a slow upstream)."""
        self.entered.set()
        await self.gate.wait()
        return self.answer()

    @property
    def entered(self) -> asyncio.Event:
        """Set once the handler has been called."""
        if not hasattr(self, "_entered"):
            self._entered = asyncio.Event()
        return self._entered

    @property
    def gate(self) -> asyncio.Event:
        if not hasattr(self, "_gate"):
            self._gate = asyncio.Event()
            self._gate.set()
        return self._gate


class CountingEvents(CacheEvents):
    def __init__(self) -> None:
        self.stale_on_error: list[str] = []

    def served_stale_on_error(self, namespace: str) -> None:
        self.stale_on_error.append(namespace)


@pytest.fixture
def rates() -> Rates:
    return Rates()


@pytest.fixture
async def events(
    backend_name: str, request: pytest.FixtureRequest, make_settings: Callable[..., CacheSettings]
) -> AsyncIterator[CountingEvents]:
    """The cache on the parametrized backend, counting stale answers served on errors."""
    url = request.getfixturevalue("redis_url") if backend_name == "redis" else None
    counting = CountingEvents()
    await init_cache(make_settings(url), events=counting)
    try:
        yield counting
    finally:
        await close_cache()


def rates_app(
    make_identity_app: Callable[[], FastAPI], rates: Rates, **options: int | None
) -> FastAPI:
    app = make_identity_app()

    @app.get("/rates", response_model=None)
    @cache(namespace="rates", expire=EXPIRE, **options)  # type: ignore[arg-type]
    async def get_rates() -> dict[str, int] | JSONResponse:
        return await rates.answer_later()

    return app


@pytest.fixture
async def client(
    events: CountingEvents, make_identity_app: Callable[[], FastAPI], rates: Rates
) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(
        rates_app(make_identity_app, rates, stale_if_error=30), raise_app_exceptions=False
    ) as http:
        yield http


@pytest.mark.parametrize("failure", ["raises", "503", "http-503"])
async def test_a_failed_computation_is_answered_by_the_recently_stale_entry(
    events: CountingEvents,
    client: httpx.AsyncClient,
    rates: Rates,
    failure: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await client.get("/rates", headers=TENANT)
    await age_entry(KEY, 20)  # fresh for 60 of its 90 s: stale for 10 s now
    rates.version, rates.failure = 2, failure

    with caplog.at_level(logging.WARNING, logger="commons.cache"):
        answer = await client.get("/rates", headers=TENANT)

    assert (answer.status_code, answer.json()) == (200, {"version": 1})
    assert answer.headers["x-fastapi-cache"] == "STALE"
    assert answer.headers["cache-control"] == "private, no-cache"
    status = "500" if failure == "raises" else "503"
    assert answer.headers["cache-status"] == f"test-cache; fwd=stale; fwd-status={status}; ttl=-10"
    assert answer.headers["age"] == "70"
    assert events.stale_on_error == ["rates"]
    assert any("stale" in record.getMessage() for record in caplog.records)


async def test_once_the_computation_succeeds_again_its_answer_replaces_the_stale_one(
    events: CountingEvents, client: httpx.AsyncClient, rates: Rates
) -> None:
    await client.get("/rates", headers=TENANT)
    await age_entry(KEY, 20)
    rates.version = 2

    fresh = await client.get("/rates", headers=TENANT)
    hit = await client.get("/rates", headers=TENANT)

    assert (fresh.json(), fresh.headers["x-fastapi-cache"]) == ({"version": 2}, "MISS")
    assert fresh.headers["cache-status"] == "test-cache; fwd=stale; stored"
    assert (hit.json(), hit.headers["x-fastapi-cache"]) == ({"version": 2}, "HIT")
    assert events.stale_on_error == []


async def test_an_answer_below_500_is_the_answer_not_an_error(
    events: CountingEvents, client: httpx.AsyncClient, rates: Rates
) -> None:
    await client.get("/rates", headers=TENANT)
    await age_entry(KEY, 20)
    rates.failure = "404"

    answer = await client.get("/rates", headers=TENANT)

    assert answer.status_code == 404
    assert events.stale_on_error == []


async def test_past_the_window_the_failure_is_the_answer(
    events: CountingEvents, client: httpx.AsyncClient, rates: Rates
) -> None:
    await client.get("/rates", headers=TENANT)
    await age_entry(KEY, 0.05)  # its stale window ends in 50 ms: then it is gone
    await asyncio.sleep(0.2)
    rates.failure = "raises"

    answer = await client.get("/rates", headers=TENANT)

    assert answer.status_code == 500
    assert events.stale_on_error == []


@pytest.mark.parametrize("scope", ["namespace", "tenant"])
async def test_an_invalidated_entry_is_never_served_on_an_error(
    events: CountingEvents, client: httpx.AsyncClient, rates: Rates, scope: str
) -> None:
    await client.get("/rates", headers=TENANT)
    await age_entry(KEY, 20)
    await invalidate_namespace("rates", **({"tenant_id": "acme"} if scope == "tenant" else {}))
    rates.failure = "raises"

    answer = await client.get("/rates", headers=TENANT)

    assert answer.status_code == 500
    assert events.stale_on_error == []


@pytest.mark.parametrize("failure", ["raises", "503"])
async def test_an_invalidation_that_returns_while_the_handler_runs_is_not_undone_by_its_failure(
    events: CountingEvents, client: httpx.AsyncClient, rates: Rates, failure: str
) -> None:
    # The request looked the stale entry up before the invalidation: the entry it would fall
    # back on was valid then, and is no longer once the invalidation has returned.
    await client.get("/rates", headers=TENANT)
    await age_entry(KEY, 20)
    rates.failure = failure
    rates.gate.clear()
    request = asyncio.create_task(client.get("/rates", headers=TENANT))
    await rates.entered.wait()
    await invalidate_namespace("rates", tenant_id="acme")
    rates.gate.set()

    answer = await request

    assert answer.status_code in (500, 503)
    assert answer.headers.get("x-fastapi-cache") != "STALE"
    assert events.stale_on_error == []


async def test_entries_are_kept_for_expire_plus_the_longer_stale_window(
    events: CountingEvents, make_identity_app: Callable[[], FastAPI], rates: Rates
) -> None:
    app = rates_app(make_identity_app, rates, stale_if_error=STALE_IF_ERROR, stale_ttl=STALE_TTL)
    async with client_for(app, raise_app_exceptions=False) as http:
        await http.get("/rates", headers=TENANT)
        remaining, _ = await stored_value(KEY)

    assert remaining == EXPIRE + max(STALE_IF_ERROR, STALE_TTL)


async def test_within_stale_ttl_the_stale_answer_comes_at_once_and_past_it_a_computation(
    events: CountingEvents, make_identity_app: Callable[[], FastAPI], rates: Rates
) -> None:
    """stale_ttl 10 s, stale_if_error 30 s: a stale entry is answered at once (and refreshed in
    the background) for 10 s; for the next 20 s it only stands in for a failed computation."""
    app = rates_app(make_identity_app, rates, stale_if_error=STALE_IF_ERROR, stale_ttl=STALE_TTL)
    async with client_for(app, raise_app_exceptions=False) as http:
        await http.get("/rates", headers=TENANT)
        await age_entry(KEY, 25)  # stale for 5 s
        rates.failure = "raises"
        revalidated = await http.get("/rates", headers=TENANT)
        await age_entry(KEY, 15)  # stale for 15 s
        stood_in = await http.get("/rates", headers=TENANT)
        rates.failure = None
        rates.version = 2
        computed = await http.get("/rates", headers=TENANT)

    assert revalidated.headers["cache-status"] == "test-cache; hit; ttl=-5"
    assert stood_in.headers["cache-status"].startswith("test-cache; fwd=stale; fwd-status=500")
    assert [r.json() for r in (revalidated, stood_in)] == [{"version": 1}] * 2
    assert (computed.json(), computed.headers["x-fastapi-cache"]) == ({"version": 2}, "MISS")


async def test_a_miss_that_joins_a_failing_refresh_still_gets_the_stale_entry(
    events: CountingEvents, make_identity_app: Callable[[], FastAPI], rates: Rates
) -> None:
    # A refresh of the stale entry is under way (slow, and about to fail) when the entry passes
    # stale_ttl: the next request joins that computation. Its failure is the refresh's own: the
    # request computes for itself, and on its own failure gets the stale entry.
    app = rates_app(make_identity_app, rates, stale_if_error=STALE_IF_ERROR, stale_ttl=STALE_TTL)
    async with client_for(app, raise_app_exceptions=False) as http:
        await http.get("/rates", headers=TENANT)
        await age_entry(KEY, 25)  # stale for 5 s: answered at once, refreshed in the background
        rates.failure = "http-503"
        rates.gate.clear()
        revalidated = asyncio.create_task(http.get("/rates", headers=TENANT))
        await asyncio.sleep(0.2)  # its answer is sent; its refresh waits for the upstream
        await age_entry(KEY, 15)  # stale for 15 s: past stale_ttl, within stale_if_error
        joined = asyncio.create_task(http.get("/rates", headers=TENANT))
        await asyncio.sleep(0.2)
        rates.gate.set()
        answers = [await revalidated, await joined]

    assert [(a.status_code, a.json()) for a in answers] == [(200, {"version": 1})] * 2
    assert answers[0].headers["cache-status"] == "test-cache; hit; ttl=-5"
    assert answers[1].headers["x-fastapi-cache"] == "STALE"
    assert answers[1].headers["cache-status"].startswith("test-cache; fwd=stale; fwd-status=503")


async def test_the_setting_is_the_default_and_the_decorator_overrides_it(
    backend_name: str,
    request: pytest.FixtureRequest,
    make_settings: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
) -> None:
    url = request.getfixturevalue("redis_url") if backend_name == "redis" else None
    await init_cache(make_settings(url, CACHE_STALE_IF_ERROR_SECONDS=30))
    by_default, overridden = Rates(), Rates()
    try:
        async with client_for(
            rates_app(make_identity_app, overridden, stale_if_error=5), raise_app_exceptions=False
        ) as http:
            await http.get("/rates", headers=TENANT)
            kept_overridden, _ = await stored_value(KEY)
        await invalidate_namespace("rates")
        async with client_for(
            rates_app(make_identity_app, by_default), raise_app_exceptions=False
        ) as http:
            await http.get("/rates", headers=TENANT)
            kept_by_default, _ = await stored_value(KEY)
            await age_entry(KEY, 20)
            by_default.failure = "raises"
            answer = await http.get("/rates", headers=TENANT)
    finally:
        await close_cache()

    assert (kept_by_default, kept_overridden) == (EXPIRE + 30, EXPIRE + 5)
    assert (answer.status_code, answer.json()) == (200, {"version": 1})


@pytest.mark.parametrize("argument", ["expire", "stale_ttl", "stale_if_error", "client_max_age"])
def test_a_lifetime_past_ten_years_is_refused_when_the_route_is_declared(argument: str) -> None:
    with pytest.raises(ValueError, match=f"{argument} must be between 0 and"):
        cache(**{argument: 10_000_000_000})


def test_cache_written_without_parentheses_says_so() -> None:
    async def handler() -> dict[str, str]:
        return {}

    with pytest.raises(TypeError, match="needs parentheses"):
        cache(handler)  # type: ignore[arg-type]


def test_a_negative_stale_if_error_is_refused_when_the_route_is_declared() -> None:
    with pytest.raises(ValueError, match="stale_if_error"):
        cache(stale_if_error=-1)


async def test_degraded_the_memory_tier_never_serves_an_invalidated_entry_on_an_error(
    make_settings: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
    rates: Rates,
) -> None:
    """Redis configured but unreachable: entries live in the memory tier (fresh for all of
    CACHE_DEGRADED_TTL_SECONDS, so never stale there), and an invalidation kept for Redis removes
    them at once: a failing handler is then the answer."""
    down = make_settings(
        f"redis://127.0.0.1:{free_port()}/0",
        REDIS_SOCKET_TIMEOUT_SECONDS=0.2,
        REDIS_CONNECT_TIMEOUT_SECONDS=0.2,
    )
    await init_cache(down)
    try:
        assert cache_status().backend == "degraded"
        app = rates_app(make_identity_app, rates, stale_if_error=STALE_IF_ERROR)
        async with client_for(app, raise_app_exceptions=False) as http:
            first = await http.get("/rates", headers=TENANT)
            kept, _ = await stored_value(KEY)
            await invalidate_namespace("rates", tenant_id="acme")
            rates.failure = "raises"
            after = await http.get("/rates", headers=TENANT)
    finally:
        await close_cache()

    assert first.status_code == 200
    assert kept == down.CACHE_DEGRADED_TTL_SECONDS
    assert after.status_code == 500
