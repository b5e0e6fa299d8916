"""Integer query parameters are bounded: out-of-range values are a declared 422, never a 500."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from httpx import AsyncClient

from insights_backend.routes.insights import MAX_PAGE, MAX_PAGE_SIZE

Bearer = Callable[..., dict[str, str]]


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(str(MAX_PAGE + 1), id="just-above-the-limit"),
        pytest.param(str(2**62), id="offset-overflows-int64"),
        pytest.param(str(2**63 + 1), id="above-int64"),
    ],
)
async def test_a_page_number_above_the_limit_is_a_validation_error(
    client: AsyncClient, bearer: Bearer, page: str
) -> None:
    response = await client.get(f"/v1/insights?page={page}", headers=bearer(1, "alice"))

    assert response.status_code == 422
    assert [error["loc"] for error in response.json()["detail"]] == [["query", "page"]]


async def test_the_last_allowed_page_at_the_largest_size_is_an_empty_page(
    client: AsyncClient, bearer: Bearer
) -> None:
    response = await client.get(
        f"/v1/insights?page={MAX_PAGE}&size={MAX_PAGE_SIZE}", headers=bearer(1, "alice")
    )

    assert response.status_code == 200
    assert response.json()["items"] == []
    assert response.json()["total"] == 50


async def test_the_schema_declares_the_bounds_of_page_and_size(memory_client: AsyncClient) -> None:
    operation = (await memory_client.get("/openapi.json")).json()["paths"]["/v1/insights"]["get"]

    bounds = {
        parameter["name"]: (parameter["schema"]["minimum"], parameter["schema"]["maximum"])
        for parameter in operation["parameters"]
        if parameter["name"] in {"page", "size"}
    }
    assert bounds == {"page": (1, MAX_PAGE), "size": (1, MAX_PAGE_SIZE)}
    assert "422" in operation["responses"]
