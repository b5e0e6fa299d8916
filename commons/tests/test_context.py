"""Per-request identity: contextvars that the key builders read, bound once per request."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from commons.cache import CacheSettings, cache, tenant_cache_key_builder
from commons.utilities.context import (
    bind_identity,
    get_tenant_id,
    get_user_id,
    set_tenant_id,
    set_user_id,
)

from _support import client_for


def in_fresh_context(function: Callable[[], Any]) -> Any:
    """Runs ``function`` in a copy of the current context, so nothing it sets outlives it."""
    return contextvars.copy_context().run(function)


def test_nothing_is_bound_by_default() -> None:
    assert get_tenant_id() is None
    assert get_user_id() is None


def test_set_tenant_and_user_are_read_back() -> None:
    def scenario() -> tuple[str | None, str | None]:
        set_tenant_id("acme")
        set_user_id("alice")
        return get_tenant_id(), get_user_id()

    assert in_fresh_context(scenario) == ("acme", "alice")


def test_integer_ids_are_read_back_as_text() -> None:
    def scenario() -> tuple[str | None, str | None]:
        set_tenant_id(42)
        set_user_id(7)
        return get_tenant_id(), get_user_id()

    assert in_fresh_context(scenario) == ("42", "7")


def test_an_empty_id_counts_as_no_id() -> None:
    def scenario() -> tuple[str | None, str | None]:
        set_tenant_id("")
        set_user_id("")
        return get_tenant_id(), get_user_id()

    assert in_fresh_context(scenario) == (None, None)


def test_the_token_returned_by_set_restores_the_previous_value() -> None:
    def scenario() -> tuple[str | None, str | None]:
        set_tenant_id("first")
        token = set_tenant_id("second")
        during = get_tenant_id()
        token.var.reset(token)
        return during, get_tenant_id()

    assert in_fresh_context(scenario) == ("second", "first")


def test_bind_identity_binds_for_the_block_and_restores_afterwards() -> None:
    def scenario() -> list[tuple[str | None, str | None]]:
        seen = []
        set_tenant_id("outer")
        with bind_identity("t1", "u1"):
            seen.append((get_tenant_id(), get_user_id()))
            with bind_identity("t2"):
                seen.append((get_tenant_id(), get_user_id()))
            seen.append((get_tenant_id(), get_user_id()))
        seen.append((get_tenant_id(), get_user_id()))
        return seen

    assert in_fresh_context(scenario) == [
        ("t1", "u1"),
        ("t2", None),
        ("t1", "u1"),
        ("outer", None),
    ]


def test_bind_identity_restores_the_previous_values_when_the_block_raises() -> None:
    def scenario() -> tuple[str | None, str | None]:
        with pytest.raises(RuntimeError), bind_identity("t1", "u1"):
            raise RuntimeError("boom")
        return get_tenant_id(), get_user_id()

    assert in_fresh_context(scenario) == (None, None)


@pytest.fixture
def whoami_app(make_identity_app: Callable[[], FastAPI]) -> FastAPI:
    app = make_identity_app()

    @app.get("/whoami")
    async def whoami() -> dict[str, str | None]:
        await asyncio.sleep(0)  # let concurrent requests interleave
        return {"tenant": get_tenant_id(), "user": get_user_id()}

    return app


async def test_the_endpoint_sees_the_identity_bound_by_an_async_dependency(
    whoami_app: FastAPI,
) -> None:
    async with client_for(whoami_app) as client:
        response = await client.get(
            "/whoami", headers={"X-Test-Tenant": "acme", "X-Test-User": "alice"}
        )
    assert response.json() == {"tenant": "acme", "user": "alice"}


async def test_identity_does_not_leak_into_the_next_request(whoami_app: FastAPI) -> None:
    async with client_for(whoami_app) as client:
        first = await client.get("/whoami", headers={"X-Test-Tenant": "acme", "X-Test-User": "a"})
        second = await client.get("/whoami")
        third = await client.get("/whoami", headers={"X-Test-Tenant": "globex"})
    assert first.json() == {"tenant": "acme", "user": "a"}
    assert second.json() == {"tenant": None, "user": None}
    assert third.json() == {"tenant": "globex", "user": None}


async def test_identity_does_not_leak_out_of_a_request_into_the_caller(
    whoami_app: FastAPI,
) -> None:
    async with client_for(whoami_app) as client:
        await client.get("/whoami", headers={"X-Test-Tenant": "acme", "X-Test-User": "a"})
    # The in-process transport runs the app in this very task: the middleware must reset.
    assert (get_tenant_id(), get_user_id()) == (None, None)


async def test_concurrent_requests_each_see_their_own_identity(whoami_app: FastAPI) -> None:
    tenants = [f"t{i}" for i in range(20)]
    async with client_for(whoami_app) as client:
        responses = await asyncio.gather(
            *(
                client.get("/whoami", headers={"X-Test-Tenant": t, "X-Test-User": f"u-{t}"})
                for t in tenants
            )
        )
    assert [r.json() for r in responses] == [{"tenant": t, "user": f"u-{t}"} for t in tenants]


async def test_the_key_builder_sees_the_identity_bound_by_an_async_dependency(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    seen_by_builder: list[tuple[str | None, str]] = []

    def recording_key_builder(
        func: Callable[..., Any],
        namespace: str = "",
        *,
        request: Request | None = None,
        response: Response | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> str:
        key = tenant_cache_key_builder(
            func, namespace, request=request, response=response, args=args, kwargs=kwargs
        )
        seen_by_builder.append((get_tenant_id(), key))
        return key

    app = make_identity_app()

    @app.get("/config")
    @cache(namespace="ctx", key_builder=recording_key_builder)
    async def config() -> dict[str, str | None]:
        return {"tenant": get_tenant_id()}

    async with client_for(app) as client:
        response = await client.get("/config", headers={"X-Test-Tenant": "acme"})

    assert response.json() == {"tenant": "acme"}
    assert len(seen_by_builder) == 1
    tenant, key = seen_by_builder[0]
    assert tenant == "acme"
    assert key.startswith(f"{backend.CACHE_PREFIX}:ctx:tenant_acme:/config:")
