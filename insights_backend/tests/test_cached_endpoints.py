"""The cached endpoints, end to end with the lifespan running, on the memory and Redis backends."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

from httpx import AsyncClient

from commons.testing.entries import age_entry
from commons.testing.kit import assert_hit, assert_miss
from insights_backend.routes.insights import STALE_IF_ERROR_SECONDS

Bearer = Callable[..., dict[str, str]]

CACHE_HEADER = "X-FastAPI-Cache"
NEW_CONFIG = {
    "display_name": "Acme Renamed",
    "timezone": "UTC",
    "currency": "EUR",
    "features": ["alerts"],
}


async def test_tenant_config_is_a_miss_then_a_hit(client: AsyncClient, bearer: Bearer) -> None:
    first = await client.get("/v1/tenant/config", headers=bearer(1, "alice"))
    second = await client.get("/v1/tenant/config", headers=bearer(1, "alice"))

    assert first.status_code == second.status_code == 200
    assert_miss(first)
    assert_hit(second)
    assert second.json() == first.json()
    assert first.json()["display_name"] == "Acme Corp"


async def test_no_client_forces_the_tenant_config_to_be_recomputed(
    client: AsyncClient, bearer: Bearer
) -> None:
    headers = bearer(1, "alice")
    await client.get("/v1/tenant/config", headers=headers)

    statuses = [
        (await client.get("/v1/tenant/config", headers={**headers, "Cache-Control": d})).headers[
            CACHE_HEADER
        ]
        for d in ["no-cache", "no-store"] * 3
    ]

    assert statuses == ["HIT"] * 6


async def test_users_me_is_a_miss_then_a_hit(client: AsyncClient, bearer: Bearer) -> None:
    first = await client.get("/v1/users/me", headers=bearer(1, "alice"))
    second = await client.get("/v1/users/me", headers=bearer(1, "alice"))

    assert_miss(first)
    assert_hit(second)
    assert second.json() == first.json()
    assert first.json()["email"] == "alice@acme.example"


async def test_insights_are_a_miss_then_a_hit(client: AsyncClient, bearer: Bearer) -> None:
    first = await client.get("/v1/insights?page=2&size=5", headers=bearer(1, "alice"))
    second = await client.get("/v1/insights?page=2&size=5", headers=bearer(1, "alice"))

    assert_miss(first)
    assert_hit(second)
    assert second.json() == first.json()


async def test_a_tenant_never_receives_another_tenants_config(
    client: AsyncClient, bearer: Bearer
) -> None:
    names = {}
    for tenant_id in (1, 2, 3, 1, 2, 3):
        response = await client.get("/v1/tenant/config", headers=bearer(tenant_id, "alice"))
        assert response.json()["tenant_id"] == tenant_id
        names.setdefault(tenant_id, set()).add(response.json()["display_name"])

    assert names == {1: {"Acme Corp"}, 2: {"Globex"}, 3: {"Initech"}}


async def test_updating_a_config_invalidates_only_that_tenant(
    client: AsyncClient, bearer: Bearer
) -> None:
    for tenant_id in (1, 2):
        await client.get("/v1/tenant/config", headers=bearer(tenant_id, "alice"))

    updated = await client.put("/v1/tenant/config", headers=bearer(1, "alice"), json=NEW_CONFIG)
    tenant_1 = await client.get("/v1/tenant/config", headers=bearer(1, "alice"))
    tenant_2 = await client.get("/v1/tenant/config", headers=bearer(2, "alice"))

    assert updated.status_code == 200
    assert updated.json()["display_name"] == "Acme Renamed"
    assert_miss(tenant_1)
    assert tenant_1.json() == updated.json()
    assert_hit(tenant_2)
    assert tenant_2.json()["display_name"] == "Globex"


async def test_an_invalid_config_is_refused_and_nothing_changes(
    client: AsyncClient, bearer: Bearer
) -> None:
    before = await client.get("/v1/tenant/config", headers=bearer(1, "alice"))
    refused = await client.put(
        "/v1/tenant/config", headers=bearer(1, "alice"), json={**NEW_CONFIG, "currency": "euro"}
    )
    after = await client.get("/v1/tenant/config", headers=bearer(1, "alice"))

    assert refused.status_code == 422
    assert_hit(after)
    assert after.json() == before.json()


async def test_a_config_body_that_is_not_utf8_is_a_400_and_nothing_changes(
    client: AsyncClient, bearer: Bearer
) -> None:
    before = await client.get("/v1/tenant/config", headers=bearer(1, "alice"))
    refused = await client.put(
        "/v1/tenant/config",
        headers={**bearer(1, "alice"), "Content-Type": "application/json"},
        content=b'{"display_name": "\xff"}',
    )
    after = await client.get("/v1/tenant/config", headers=bearer(1, "alice"))

    assert refused.status_code == 400
    assert refused.json() == {"detail": "There was an error parsing the body"}
    assert_hit(after)
    assert after.json() == before.json()


async def test_users_me_is_cached_per_user(client: AsyncClient, bearer: Bearer) -> None:
    alice = await client.get("/v1/users/me", headers=bearer(1, "alice"))
    bob = await client.get("/v1/users/me", headers=bearer(1, "bob"))
    alice_of_globex = await client.get("/v1/users/me", headers=bearer(2, "alice"))
    alice_again = await client.get("/v1/users/me", headers=bearer(1, "alice"))

    assert [r.headers[CACHE_HEADER] for r in (alice, bob, alice_of_globex, alice_again)] == [
        "MISS",
        "MISS",
        "MISS",
        "HIT",
    ]
    assert alice.json()["email"] == alice_again.json()["email"] == "alice@acme.example"
    assert bob.json()["email"] == "bob@acme.example"
    assert alice_of_globex.json()["email"] == "alice@globex.example"


async def test_query_parameter_order_does_not_matter(client: AsyncClient, bearer: Bearer) -> None:
    first = await client.get("/v1/insights?page=2&size=5&q=revenue", headers=bearer(1, "alice"))
    reordered = await client.get("/v1/insights?q=revenue&size=5&page=2", headers=bearer(1, "alice"))

    assert_miss(first)
    assert_hit(reordered)
    assert reordered.json() == first.json()


async def test_each_page_and_filter_is_its_own_entry(client: AsyncClient, bearer: Bearer) -> None:
    page_1 = await client.get("/v1/insights?page=1&size=5", headers=bearer(1, "alice"))
    page_2 = await client.get("/v1/insights?page=2&size=5", headers=bearer(1, "alice"))
    filtered = await client.get("/v1/insights?page=1&size=5&q=churn", headers=bearer(1, "alice"))

    assert [r.headers[CACHE_HEADER] for r in (page_1, page_2, filtered)] == ["MISS"] * 3
    ids_1 = {item["id"] for item in page_1.json()["items"]}
    ids_2 = {item["id"] for item in page_2.json()["items"]}
    assert len(ids_1) == len(ids_2) == 5
    assert not ids_1 & ids_2
    assert page_1.json()["total"] == 50
    assert filtered.json()["items"]
    assert all("churn" in item["title"].lower() for item in filtered.json()["items"])


async def test_insights_show_only_the_callers_tenant(client: AsyncClient, bearer: Bearer) -> None:
    acme = await client.get("/v1/insights?size=100", headers=bearer(1, "alice"))
    globex = await client.get("/v1/insights?size=100", headers=bearer(2, "alice"))

    acme_ids = {item["id"] for item in acme.json()["items"]}
    globex_ids = {item["id"] for item in globex.json()["items"]}
    assert_miss(globex)
    assert len(acme_ids) == len(globex_ids) == 50
    assert not acme_ids & globex_ids


async def test_insights_are_answered_from_a_recently_stale_page_while_the_database_fails(
    client: AsyncClient, bearer: Bearer, tmp_path: Path
) -> None:
    headers = bearer(1, "alice")
    first = await client.get("/v1/insights?page=1&size=5", headers=headers)
    key = f"ib-cache:insights:tenant_1:/v1/insights:{hashlib.md5(b'page=1&size=5').hexdigest()}"
    # CACHE_TTL_SECONDS (300) fresh, then STALE_IF_ERROR_SECONDS (300): stale for 60 s now.
    await age_entry(key, STALE_IF_ERROR_SECONDS - 60)
    with contextlib.closing(sqlite3.connect(tmp_path / "insights.db")) as database, database:
        database.execute("DROP TABLE insights")  # every query of the handler fails now

    stale = await client.get("/v1/insights?page=1&size=5", headers=headers)

    assert (stale.status_code, stale.content) == (200, first.content)
    assert stale.headers[CACHE_HEADER] == "STALE"
    assert stale.headers["cache-status"] == "ib-cache; fwd=stale; fwd-status=500; ttl=-60"
    assert stale.headers["age"] == "360"
