"""Answers that cannot be stored are never handed to the other requests of a computation.

Concurrent misses of one key share one computation (single-flight). When the answer that
computation produces may not be stored (it says ``no-store`` or ``private``, it varies on
everything, it is no 2xx), it is the answer to the request that computed it only: every other
request of the same key runs the handler for itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from commons.cache import CacheSettings, cache
from commons.utilities.context import get_user_id

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
def app(
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


async def request_as(client: httpx.AsyncClient, user: str, delay: float) -> httpx.Response:
    await asyncio.sleep(delay)
    return await client.get("/secret", headers={"X-Test-Tenant": "acme", "X-Test-User": user})


async def test_an_unstorable_answer_reaches_only_the_request_that_computed_it(
    backend: CacheSettings,
    client: httpx.AsyncClient,
    unstorable: tuple[int, dict[str, str]],
) -> None:
    """Alice's unstorable answer is never sent to Bob or Carol, who asked for the same key while
    it was being computed: each of them gets an answer naming themselves."""
    status_code, _ = unstorable

    responses = await asyncio.gather(
        *(request_as(client, user, delay) for user, delay in zip(USERS, START_OFFSETS, strict=True))
    )

    assert [r.json() for r in responses] == [{"secret_of": user} for user in USERS]
    assert [r.status_code for r in responses] == [status_code] * len(USERS)
