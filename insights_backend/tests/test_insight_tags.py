"""One insight, cached per tenant and tagged: changing it drops exactly the entries that show it
(its detail and the list pages), on the memory and Redis backends."""

from __future__ import annotations

from collections.abc import Callable

from httpx import AsyncClient

from commons.testing.kit import assert_hit, assert_miss

Bearer = Callable[..., dict[str, str]]


async def first_ids(client: AsyncClient, headers: dict[str, str], count: int) -> list[int]:
    page = await client.get(f"/v1/insights?size={count}", headers=headers)
    return [item["id"] for item in page.json()["items"]]


async def test_an_insight_is_a_miss_then_a_hit(client: AsyncClient, bearer: Bearer) -> None:
    alice = bearer(1, "alice")
    [insight_id] = await first_ids(client, alice, 1)

    first = await client.get(f"/v1/insights/{insight_id}", headers=alice)
    second = await client.get(f"/v1/insights/{insight_id}", headers=alice)

    assert first.status_code == second.status_code == 200
    assert_miss(first)
    assert_hit(second)
    assert second.json() == first.json()
    assert first.json()["id"] == insight_id


async def test_another_tenants_insight_is_not_found(client: AsyncClient, bearer: Bearer) -> None:
    [globex_insight] = await first_ids(client, bearer(2, "bob"), 1)

    answer = await client.get(f"/v1/insights/{globex_insight}", headers=bearer(1, "alice"))

    assert (answer.status_code, answer.json()) == (404, {"detail": "no such insight"})


async def test_changing_an_insight_drops_its_entries_and_leaves_the_other_insights_warm(
    client: AsyncClient, bearer: Bearer
) -> None:
    alice, bob = bearer(1, "alice"), bearer(2, "bob")
    changed, other = await first_ids(client, alice, 2)
    [globex_insight] = await first_ids(client, bob, 1)
    warmed = [
        (alice, f"/v1/insights/{changed}"),
        (alice, f"/v1/insights/{other}"),
        (alice, "/v1/insights?size=5"),
        (bob, f"/v1/insights/{globex_insight}"),
        (bob, "/v1/insights?size=5"),
    ]
    for headers, path in warmed:
        await client.get(path, headers=headers)
        assert_hit(await client.get(path, headers=headers))

    patched = await client.patch(
        f"/v1/insights/{changed}", headers=alice, json={"title": "Churn fell by half"}
    )

    assert patched.status_code == 200, patched.text
    detail = await client.get(f"/v1/insights/{changed}", headers=alice)
    assert_miss(detail)
    assert detail.json()["title"] == "Churn fell by half"
    page = await client.get("/v1/insights?size=5", headers=alice)
    assert_miss(page)
    assert page.json()["items"][0]["title"] == "Churn fell by half"
    assert_hit(await client.get(f"/v1/insights/{other}", headers=alice))
    assert_hit(await client.get(f"/v1/insights/{globex_insight}", headers=bob))
    assert_hit(await client.get("/v1/insights?size=5", headers=bob))


async def test_changing_another_tenants_insight_is_not_found_and_changes_nothing(
    client: AsyncClient, bearer: Bearer
) -> None:
    bob = bearer(2, "bob")
    [globex_insight] = await first_ids(client, bob, 1)
    before = (await client.get(f"/v1/insights/{globex_insight}", headers=bob)).json()

    answer = await client.patch(
        f"/v1/insights/{globex_insight}", headers=bearer(1, "alice"), json={"title": "Mine now"}
    )

    assert answer.status_code == 404
    after = await client.get(f"/v1/insights/{globex_insight}", headers=bob)
    assert_hit(after)
    assert after.json() == before
