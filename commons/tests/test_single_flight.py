"""Stampede protection in one process: concurrent misses of a key run the handler once; waiting is
bounded; errors reach every waiter and are not cached; a cancelled leader strands nobody.

Answers that cannot be stored are never handed to the other requests of a computation.

Concurrent misses of one key share one computation (single-flight). When the answer that
computation produces may not be stored (it says ``no-store`` or ``private``, it varies on
everything, it is no 2xx), it is the answer to the request that computed it only: every other
request of the same key runs the handler for itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse

from commons.cache import CacheSettings, cache, close_cache, init_cache
from commons.cache.singleflight import SingleFlight
from commons.utilities.context import get_user_id

from _support import client_for

TENANT = {"X-Test-Tenant": "acme"}


class Handler:
    """A handler's calls, and a gate that holds every call until the test opens it."""

    def __init__(self) -> None:
        self.calls = 0
        self.arrived = 0
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.fail_with: Exception | None = None
        #: Raise ``fail_with`` once only (a flaky upstream).
        self.fail_once = False

    async def run(self) -> dict[str, int]:
        self.calls += 1
        self.entered.set()
        await self.gate.wait()
        if self.fail_with is not None:
            error = self.fail_with
            if self.fail_once:
                self.fail_with = None
            raise error
        return {"calls": self.calls}


@pytest.fixture
def handler() -> Handler:
    return Handler()


@pytest.fixture
def app(make_identity_app: Callable[[], FastAPI], handler: Handler) -> FastAPI:
    app = make_identity_app()

    async def arrive() -> None:
        handler.arrived += 1

    @app.get("/report", dependencies=[Depends(arrive)])
    @cache(namespace="reports")
    async def report() -> dict[str, int]:
        return await handler.run()

    return app


async def start_requests(
    client: httpx.AsyncClient, handler: Handler, count: int
) -> list[asyncio.Task[httpx.Response]]:
    """Starts ``count`` requests and returns once they all wait on the handler's computation."""
    expected = handler.arrived + count
    tasks = [asyncio.create_task(client.get("/report", headers=TENANT)) for _ in range(count)]
    while handler.arrived < expected:  # noqa: ASYNC110 - counted by the route's dependency
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # from the dependency to the flight takes a few loop turns
    return tasks


async def test_concurrent_misses_of_one_key_run_the_handler_once(
    backend: CacheSettings, client: httpx.AsyncClient, handler: Handler
) -> None:
    requests = await start_requests(client, handler, 50)
    handler.gate.set()
    responses = await asyncio.wait_for(asyncio.gather(*requests), 10)

    assert handler.calls == 1
    assert [r.status_code for r in responses] == [200] * 50
    assert {r.content for r in responses} == {b'{"calls":1}'}
    assert {r.headers["etag"] for r in responses} == {responses[0].headers["etag"]}


async def test_an_exception_is_its_own_requests_and_each_waiter_runs_the_handler_itself(
    backend: CacheSettings, client: httpx.AsyncClient, handler: Handler
) -> None:
    """A 403 or 404 computed for one request (one user's permissions) is no answer for another:
    nothing is shared or cached, and each waiter gets what the handler says to it."""
    handler.fail_with = HTTPException(status_code=404, detail="no such report")
    requests = await start_requests(client, handler, 10)
    handler.gate.set()
    responses = await asyncio.wait_for(asyncio.gather(*requests), 10)

    assert handler.calls == 10
    assert [r.status_code for r in responses] == [404] * 10
    assert {r.json()["detail"] for r in responses} == {"no such report"}

    handler.fail_with = None
    after = await client.get("/report", headers=TENANT)
    assert after.headers["x-fastapi-cache"] == "MISS"
    assert handler.calls == 11


async def test_after_an_exception_the_waiters_share_one_computation_of_their_own(
    backend: CacheSettings, client: httpx.AsyncClient, handler: Handler
) -> None:
    """A flaky upstream: the computing request's exception is its own, but the waiters need not
    each run the handler, nor throw away a storable answer: one of them computes for the others,
    and stores it. (Each ran the handler itself, none stored: 10 requests, 10 runs, a cold key.)"""
    handler.fail_with, handler.fail_once = RuntimeError("upstream hiccup"), True
    requests = await start_requests(client, handler, 10)
    handler.gate.set()
    responses = await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), 10)

    answered = [r for r in responses if isinstance(r, httpx.Response) and r.status_code == 200]
    assert len(answered) == 9
    assert handler.calls == 2
    assert {r.content for r in answered} == {b'{"calls":2}'}
    after = await client.get("/report", headers=TENANT)
    assert after.headers["x-fastapi-cache"] == "HIT"


async def test_cancelling_the_computing_request_does_not_strand_the_others(
    backend: CacheSettings, client: httpx.AsyncClient, handler: Handler
) -> None:
    leader = asyncio.create_task(client.get("/report", headers=TENANT))
    await asyncio.wait_for(handler.entered.wait(), 5)
    waiters = await start_requests(client, handler, 5)

    leader.cancel()
    await asyncio.sleep(0.05)  # a waiter takes over and calls the handler again
    handler.gate.set()
    responses = await asyncio.wait_for(asyncio.gather(*waiters), 10)

    assert leader.cancelled()
    assert handler.calls == 2  # the cancelled leader's call, and one for all the waiters
    assert {r.content for r in responses} == {b'{"calls":2}'}


@pytest.fixture
async def short_wait(
    backend: CacheSettings, make_settings: Callable[..., CacheSettings]
) -> AsyncIterator[None]:
    await init_cache(make_settings(backend.REDIS_URL, CACHE_LOCK_TIMEOUT_SECONDS=0.2))
    try:
        yield
    finally:
        await close_cache()


async def test_a_waiter_runs_the_handler_itself_after_the_lock_timeout(
    short_wait: None, make_identity_app: Callable[[], FastAPI]
) -> None:
    first_may_finish = asyncio.Event()
    calls = 0
    app = make_identity_app()

    @app.get("/slow")
    @cache(namespace="slow")
    async def slow() -> dict[str, int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await first_may_finish.wait()  # the first call hangs until the waiter has answered
        return {"call": calls}

    async with client_for(app) as client:
        first = asyncio.create_task(client.get("/slow", headers=TENANT))
        await asyncio.sleep(0.05)
        waiter = await asyncio.wait_for(client.get("/slow", headers=TENANT), 5)
        first_may_finish.set()
        await first

    assert waiter.status_code == 200
    assert waiter.json() == {"call": 2}
    assert calls == 2


# -- SingleFlight on its own ---------------------------------------------------------------------


async def test_single_flight_shares_one_result_and_forgets_the_key_afterwards() -> None:
    flights: SingleFlight[int] = SingleFlight()
    runs = 0

    async def compute() -> int:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.05)
        return 7

    results = await asyncio.gather(*(flights.run("k", compute, 5) for _ in range(20)))

    assert results == [7] * 20
    assert runs == 1
    assert len(flights) == 0


async def test_a_waiter_that_waited_in_vain_runs_what_it_was_given_for_that() -> None:
    flights: SingleFlight[str] = SingleFlight()
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "leader"

    async def alone() -> str:
        return "on its own"

    leader = asyncio.create_task(flights.run("k", slow, 5))
    await asyncio.sleep(0)
    waited = await flights.run("k", slow, 0.05, alone)
    release.set()

    assert (waited, await leader) == ("on its own", "leader")


async def test_run_if_idle_skips_a_key_that_is_being_computed() -> None:
    flights: SingleFlight[int] = SingleFlight()
    release = asyncio.Event()

    async def slow() -> int:
        await release.wait()
        return 1

    async def never() -> int:
        raise AssertionError("must not run while another computation of the key runs")

    running = asyncio.create_task(flights.run("k", slow, 5))
    await asyncio.sleep(0)
    skipped = await flights.run_if_idle("k", never)
    release.set()

    assert skipped is None
    assert await running == 1
    assert await flights.run_if_idle("k", slow) == 1


# -- unstorable answers are never handed to the other requests -------------------------------------


HANDLER_SECONDS = 0.3
USERS = ["alice", "bob", "carol"]
#: When each user's request starts, in seconds after the first one.
START_OFFSETS = [0.0, 0.1, 0.2]

#: Answers that must never be stored, by how they say so.
UNSTORABLE: dict[str, tuple[int, dict[str, str]]] = {
    "cache-control-no-store": (200, {"Cache-Control": "no-store"}),
    "cache-control-private": (200, {"Cache-Control": "private"}),
    "vary-star": (200, {"Vary": "*"}),
    "status-404": (404, {}),
    "status-503": (503, {}),
}


@pytest.fixture(params=sorted(UNSTORABLE))
def unstorable(request: pytest.FixtureRequest) -> tuple[int, dict[str, str]]:
    return UNSTORABLE[str(request.param)]


@pytest.fixture
def secret_app(
    make_identity_app: Callable[[], FastAPI], unstorable: tuple[int, dict[str, str]]
) -> FastAPI:
    """``GET /secret``: tenant-scoped, slow, and answers with the caller's own secret."""
    status_code, headers = unstorable
    app = make_identity_app()

    @app.get("/secret")
    @cache(namespace="secret")
    async def secret() -> JSONResponse:
        user = get_user_id()
        await asyncio.sleep(HANDLER_SECONDS)
        return JSONResponse({"secret_of": user}, status_code=status_code, headers=headers)

    return app


@pytest.fixture
async def secret_client(secret_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(secret_app) as http:
        yield http


async def request_as(client: httpx.AsyncClient, user: str, delay: float) -> httpx.Response:
    await asyncio.sleep(delay)
    return await client.get("/secret", headers={"X-Test-Tenant": "acme", "X-Test-User": user})


async def test_an_unstorable_answer_reaches_only_the_request_that_computed_it(
    backend: CacheSettings,
    secret_client: httpx.AsyncClient,
    unstorable: tuple[int, dict[str, str]],
) -> None:
    """Alice's unstorable answer is never sent to Bob or Carol, who asked for the same key while
    it was being computed: each of them gets an answer naming themselves."""
    status_code, _ = unstorable

    responses = await asyncio.gather(
        *(
            request_as(secret_client, user, delay)
            for user, delay in zip(USERS, START_OFFSETS, strict=True)
        )
    )

    assert [r.json() for r in responses] == [{"secret_of": user} for user in USERS]
    assert [r.status_code for r in responses] == [status_code] * len(USERS)
