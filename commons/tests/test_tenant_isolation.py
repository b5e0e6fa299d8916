"""Tenant A never receives tenant B's body: property-based, through a real app, on both backends.

Every handler answers with the identity it ran for. Hypothesis picks who asks for what (tenants,
users, paths and query strings drawn from small pools, so that requests collide on everything but
identity); each response, a HIT as much as a MISS, must carry the requester's own identity. The
cache is shared by all examples of a test, so later examples also read what earlier ones stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from commons.cache import CacheSettings, cache, tenant_user_cache_key_builder
from commons.utilities.context import get_tenant_id, get_user_id

from _support import client_for

EXAMPLES = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# Ids as a service might see them: no ':' or whitespace (those are refused, see test_keys.py),
# including ones that differ only by case or that look like globs or prefixes of each other.
ids = st.sampled_from(["1", "11", "a", "A", "acme", "acme_eu", "t*", "t?", "[t]", "o'k", "%41"])
# Path -> the item the handler sees for it.
ITEMS = {"/data/x": "x", "/data/y": "y", "/data/tenant_1": "tenant_1", "/data/%C3%BC": "ü"}
paths = st.sampled_from([*ITEMS, "/other"])
query_items = st.lists(
    st.tuples(st.sampled_from(["a", "b", "page"]), st.sampled_from(["1", "2", "x y"])),
    max_size=3,
)
requests = st.lists(st.tuples(ids, ids, paths, query_items), min_size=1, max_size=8)


def headers_for(tenant: str, user: str) -> dict[str, str]:
    return {"X-Test-Tenant": tenant, "X-Test-User": user}


def expected_body(
    tenant: str, user: str, path: str, query: list[tuple[str, str]]
) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "user": user,
        "item": ITEMS.get(path),
        "query": sorted([list(pair) for pair in query]) if path in ITEMS else [],
    }


def echoing_app(make_identity_app: Callable[[], FastAPI], **cache_options: Any) -> FastAPI:
    """Each answer says whom it was computed for, and for which item and query."""
    app = make_identity_app()

    @app.get("/data/{item}")
    @cache(namespace="isolation", **cache_options)
    async def data(item: str, request: Request) -> dict[str, Any]:
        return {
            "tenant": get_tenant_id(),
            "user": get_user_id(),
            "item": item,
            "query": sorted([list(pair) for pair in request.query_params.multi_items()]),
        }

    @app.get("/other")
    @cache(namespace="isolation", **cache_options)
    async def other() -> dict[str, Any]:
        return {"tenant": get_tenant_id(), "user": get_user_id(), "item": None, "query": []}

    return app


@EXAMPLES
@given(plan=requests)
async def test_a_tenant_only_ever_receives_its_own_bodies(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI], plan: list[Any]
) -> None:
    app = echoing_app(make_identity_app)
    async with client_for(app) as client:
        for tenant, user, path, query in plan:
            expected = expected_body(tenant, user, path, query)
            for _ in range(2):  # the second request of a pair is always answered by the cache
                response = await client.get(path, params=query, headers=headers_for(tenant, user))
                assert response.status_code == 200
                body = response.json()
                # Tenant-scoped: users of one tenant share entries, tenants never do.
                assert body["tenant"] == tenant
                assert (body["item"], body["query"]) == (expected["item"], expected["query"])
            assert response.headers["X-FastAPI-Cache"] == "HIT"


@EXAMPLES
@given(plan=requests)
async def test_a_user_only_ever_receives_their_own_bodies(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI], plan: list[Any]
) -> None:
    app = echoing_app(make_identity_app, key_builder=tenant_user_cache_key_builder)
    async with client_for(app) as client:
        for tenant, user, path, query in plan:
            for _ in range(2):
                response = await client.get(path, params=query, headers=headers_for(tenant, user))
                assert response.status_code == 200
                assert response.json() == expected_body(tenant, user, path, query)
            assert response.headers["X-FastAPI-Cache"] == "HIT"
