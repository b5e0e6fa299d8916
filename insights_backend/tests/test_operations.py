"""/health, /metrics, /openapi.json and /docs; the service starts and serves with Redis down."""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
from httpx import AsyncClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from commons.testing.kit import assert_hit, assert_miss
from commons.testing.redis_server import free_port

Bearer = Callable[..., dict[str, str]]
StartService = Callable[..., AbstractAsyncContextManager[AsyncClient]]


async def test_health_reports_the_service_and_the_cache(
    client: AsyncClient, backend_name: str
) -> None:
    response = await client.get("/health")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["database"] == "ok"
    assert body["cache"]["backend"] == backend_name
    assert body["cache"]["redis_configured"] == (backend_name == "redis")
    assert {"reason", "since", "pending_invalidations"} <= body["cache"].keys()


async def test_with_redis_unreachable_the_service_starts_serves_and_reports_degraded(
    start_service: StartService, bearer: Bearer
) -> None:
    nobody_listens = f"redis://127.0.0.1:{free_port()}/0"
    async with start_service(REDIS_URL=nobody_listens) as client:
        health = await client.get("/health")
        first = await client.get("/v1/tenant/config", headers=bearer(1, "alice"))
        second = await client.get("/v1/tenant/config", headers=bearer(1, "alice"))

    assert health.status_code == 200
    assert health.json()["cache"]["backend"] == "degraded"
    assert first.status_code == second.status_code == 200
    assert_miss(first)
    assert_hit(second)


async def test_the_openapi_schema_lists_the_endpoints_and_bearer_auth(
    memory_client: AsyncClient,
) -> None:
    response = await memory_client.get("/openapi.json")

    assert response.status_code == 200
    schema = response.json()
    assert {
        "/v1/tenant/config",
        "/v1/users/me",
        "/v1/insights",
        "/v1/admin/tenants",
        "/health",
    } <= schema["paths"].keys()
    assert set(schema["paths"]["/v1/tenant/config"]) == {"get", "put"}
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    insight_parameters = {p["name"] for p in schema["paths"]["/v1/insights"]["get"]["parameters"]}
    assert insight_parameters == {"page", "size", "q"}


async def test_the_docs_page_is_served(memory_client: AsyncClient) -> None:
    response = await memory_client.get("/docs")

    assert response.status_code == 200
    assert "swagger-ui" in response.text


def cache_lookups(metrics_text: str) -> dict[str, float]:
    """``commons_cache_{hits,misses}_total`` of the ``users_me`` namespace in a scrape."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name in {"commons_cache_hits_total", "commons_cache_misses_total"}
        and sample.labels == {"namespace": "users_me"}
    }


async def test_metrics_serve_the_cache_series_in_prometheus_format(
    client: AsyncClient, bearer: Bearer
) -> None:
    # The registry is the process's: other tests' requests are counted too, hence the difference.
    before = cache_lookups((await client.get("/metrics")).text)
    for _ in range(3):
        await client.get("/v1/users/me", headers=bearer(1, "alice"))

    response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    after = cache_lookups(response.text)
    assert after["commons_cache_misses_total"] - before.get("commons_cache_misses_total", 0) == 1
    assert after["commons_cache_hits_total"] - before.get("commons_cache_hits_total", 0) == 2
    assert "commons_cache_backend_state" in response.text


async def test_an_empty_database_is_created_and_seeded_at_start_up(
    start_service: StartService, bearer: Bearer, tmp_path: Path
) -> None:
    database = tmp_path / "new" / "fresh.db"
    database.parent.mkdir()
    async with start_service(DATABASE_URL=f"sqlite+aiosqlite:///{database}") as client:
        tenants = await client.get("/v1/admin/tenants", headers=bearer(1, "alice", admin=True))
        insights = await client.get("/v1/insights", headers=bearer(3, "dave"))

    assert database.is_file()
    assert [tenant["id"] for tenant in tenants.json()] == [1, 2, 3]
    assert insights.json()["total"] == 50


@pytest.mark.parametrize("method", ["OPTIONS", "DELETE", "PATCH", "POST"])
async def test_an_unsupported_method_is_405_allowing_every_method_of_the_path(
    memory_client: AsyncClient, method: str
) -> None:
    response = await memory_client.request(method, "/v1/tenant/config")

    assert response.status_code == 405
    assert response.json() == {"detail": "Method Not Allowed"}
    assert response.headers["Allow"] == "GET, PUT"


async def test_the_openapi_schema_declares_every_answer_of_each_route(
    memory_client: AsyncClient,
) -> None:
    schema = (await memory_client.get("/openapi.json")).json()

    declared = {
        f"{method.upper()} {path}": set(operation["responses"])
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
    }
    assert declared == {
        "GET /v1/tenant/config": {"200", "401", "404"},
        "PUT /v1/tenant/config": {"200", "400", "401", "404", "422"},
        "GET /v1/users/me": {"200", "401", "404"},
        "GET /v1/insights": {"200", "401", "422"},
        "GET /v1/insights/{insight_id}": {"200", "401", "404", "422"},
        "PATCH /v1/insights/{insight_id}": {"200", "400", "401", "404", "422"},
        "GET /v1/admin/tenants": {"200", "401", "403"},
        "GET /health": {"200", "503"},
    }
    config = schema["paths"]["/v1/tenant/config"]["get"]["responses"]
    admin = schema["paths"]["/v1/admin/tenants"]["get"]["responses"]
    error_body = {"$ref": "#/components/schemas/ErrorOut"}
    assert config["401"]["content"]["application/json"]["schema"] == error_body
    assert config["404"]["content"]["application/json"]["schema"] == error_body
    assert admin["403"]["content"]["application/json"]["schema"] == error_body
    put_config = schema["paths"]["/v1/tenant/config"]["put"]["responses"]
    assert put_config["400"]["content"]["application/json"]["schema"] == error_body
    assert "WWW-Authenticate" in config["401"]["headers"]
    assert schema["components"]["schemas"]["ErrorOut"]["required"] == ["detail"]


async def test_start_up_ends_with_the_heap_frozen(start_service: StartService) -> None:
    gc.unfreeze()  # what earlier services in this process froze

    async with start_service():
        frozen = gc.get_freeze_count()

    assert frozen > 0
