"""Prometheus metrics: what an operator reads off ``/metrics`` after real requests.

Every test uses a namespace of its own, so the process-wide counters of other tests never mix in.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI, Header
from fastapi_cache.decorator import cache as guide_cache
from prometheus_client import REGISTRY, generate_latest

from commons.cache import (
    CacheEvents,
    CacheSettings,
    cache,
    cache_status,
    close_cache,
    init_cache,
    invalidate_namespace,
    tenant_cache_key_builder,
)
from commons.cache.backends.redis.near_tracking import FlushReason
from commons.cache.metrics import PrometheusEvents, metrics_router
from commons.testing import current_layer
from commons.testing.entries import age_entry
from commons.testing.redis_server import RedisServer
from commons.testing.waiting import eventually
from commons.utilities.context import set_tenant_id, set_user_id

STATES = ("redis", "memory", "degraded", "disabled")


async def bind_identity(
    x_tenant: Annotated[str | None, Header()] = None,
    x_user: Annotated[str | None, Header()] = None,
) -> None:
    set_tenant_id(x_tenant)
    set_user_id(x_user)


def make_app(namespace: str) -> FastAPI:
    app = FastAPI(dependencies=[Depends(bind_identity)])

    @app.get("/reports")
    @cache(namespace=namespace, expire=60)
    async def reports() -> dict[str, str]:
        return {"report": "quarterly"}

    return app


@pytest.fixture
def namespace() -> str:
    return f"reports_{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def client(namespace: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(namespace))
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
        yield http


def sample(name: str, **labels: str) -> float:
    """The value an operator reads for one series (0 when the series does not exist yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def states() -> dict[str, float]:
    return {state: sample("commons_cache_backend_state", state=state) for state in STATES}


async def test_a_miss_then_a_hit_are_counted_in_the_routes_namespace(
    backend: CacheSettings, client: httpx.AsyncClient, namespace: str
) -> None:
    first = await client.get("/reports", headers={"X-Tenant": "acme"})
    second = await client.get("/reports", headers={"X-Tenant": "acme"})

    assert (first.headers["X-FastAPI-Cache"], second.headers["X-FastAPI-Cache"]) == ("MISS", "HIT")
    assert sample("commons_cache_misses_total", namespace=namespace) == 1
    assert sample("commons_cache_hits_total", namespace=namespace) == 1


def make_guide_app(namespace: str) -> FastAPI:
    """The guide's own route: fastapi-cache2's decorator with our tenant key builder."""
    app = FastAPI(dependencies=[Depends(bind_identity)])

    @app.get("/reports")
    @guide_cache(namespace=namespace, expire=60, key_builder=tenant_cache_key_builder)
    async def reports() -> dict[str, str]:
        return {"report": "quarterly"}

    return app


async def test_the_guides_decorator_counts_its_misses_hits_and_bypasses_alike(
    backend: CacheSettings, namespace: str
) -> None:
    transport = httpx.ASGITransport(app=make_guide_app(namespace))
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
        first = await client.get("/reports", headers={"X-Tenant": "acme"})
        second = await client.get("/reports", headers={"X-Tenant": "acme"})
        anonymous = await client.get("/reports")

    assert (first.headers["X-FastAPI-Cache"], second.headers["X-FastAPI-Cache"]) == ("MISS", "HIT")
    assert anonymous.status_code == 200
    assert sample("commons_cache_misses_total", namespace=namespace) == 1
    assert sample("commons_cache_hits_total", namespace=namespace) == 1
    assert sample("commons_cache_bypasses_total", namespace=namespace, reason="no_identity") == 1


async def test_time_spent_on_redis_is_observed_per_operation(
    backend: CacheSettings, backend_name: str, client: httpx.AsyncClient, namespace: str
) -> None:
    await client.get("/reports", headers={"X-Tenant": "acme"})  # a read that misses, a write
    await client.get("/reports", headers={"X-Tenant": "acme"})  # a read that hits

    count = "commons_cache_operation_duration_seconds_count"
    total = "commons_cache_operation_duration_seconds_sum"
    if backend_name == "redis":
        assert sample(count, namespace=namespace, operation="get") == 2
        assert sample(count, namespace=namespace, operation="set") == 1
        assert sample(total, namespace=namespace, operation="get") > 0
    else:  # the in-memory tier's sub-microsecond operations are not sampled
        assert sample(count, namespace=namespace, operation="get") == 0
        assert sample(count, namespace=namespace, operation="set") == 0


async def test_a_near_cache_hit_is_counted_but_not_timed_as_a_redis_operation(
    backend: CacheSettings, backend_name: str, client: httpx.AsyncClient, namespace: str
) -> None:
    if backend_name != "redis":
        pytest.skip("the near cache keeps Redis hits")
    near_hits = "commons_cache_near_hits_total"
    requests = 0
    while sample(near_hits, namespace=namespace) == 0:
        assert requests < 100, "no near-cache hit"
        await client.get("/reports", headers={"X-Tenant": "acme"})
        requests += 1
        await asyncio.sleep(0.01)

    assert sample(near_hits, namespace=namespace) == 1
    assert sample("commons_cache_hits_total", namespace=namespace) == requests - 1
    count = "commons_cache_operation_duration_seconds_count"
    assert sample(count, namespace=namespace, operation="get") == requests - 1


async def test_the_near_caches_fill_is_a_gauge_that_goes_to_zero_when_it_closes(
    redis_url: str, make_settings: Callable[..., CacheSettings], client: httpx.AsyncClient
) -> None:
    entries, counted = "commons_cache_near_entries", "commons_cache_near_bytes"
    before = (sample(entries), sample(counted))
    # Reported every third of the maximum age.
    await init_cache(make_settings(redis_url, CACHE_NEAR_CACHE_MAX_AGE_SECONDS=0.3))
    tenants = [f"t{n}" for n in range(5)]
    for _ in range(2):  # a miss and its fill, then a read from Redis the near cache keeps
        for tenant in tenants:
            await client.get("/reports", headers={"X-Tenant": tenant})

    async def reported() -> bool:
        status = cache_status()
        return (sample(entries), sample(counted)) == (
            before[0] + status.near_cache_entries,
            before[1] + status.near_cache_bytes,
        ) and status.near_cache_entries == len(tenants)

    await eventually(reported, "the near cache's five entries in the gauges")
    await close_cache()

    assert (sample(entries), sample(counted)) == before


async def test_a_request_without_a_tenant_is_a_bypass_for_lack_of_identity(
    backend: CacheSettings, client: httpx.AsyncClient, namespace: str
) -> None:
    response = await client.get("/reports")

    assert response.status_code == 200
    assert sample("commons_cache_bypasses_total", namespace=namespace, reason="no_identity") == 1
    assert sample("commons_cache_misses_total", namespace=namespace) == 0


async def test_a_disabled_cache_counts_bypasses_as_disabled(
    make_settings: Callable[..., CacheSettings], client: httpx.AsyncClient, namespace: str
) -> None:
    await init_cache(make_settings(CACHE_ENABLED=False))
    try:
        await client.get("/reports", headers={"X-Tenant": "acme"})
        assert sample("commons_cache_bypasses_total", namespace=namespace, reason="disabled") == 1
        assert states() == {"redis": 0, "memory": 0, "degraded": 0, "disabled": 1}
    finally:
        await close_cache()


async def test_a_client_refusing_stored_entries_is_a_client_policy_bypass(
    make_settings: Callable[..., CacheSettings], client: httpx.AsyncClient, namespace: str
) -> None:
    await init_cache(make_settings(CACHE_HONOR_CLIENT_NO_CACHE=True))
    try:
        headers = {"X-Tenant": "acme", "Cache-Control": "no-cache"}
        await client.get("/reports", headers=headers)
        assert (
            sample("commons_cache_bypasses_total", namespace=namespace, reason="client_policy") == 1
        )
    finally:
        await close_cache()


async def test_a_stale_entry_served_on_an_error_is_counted_beside_the_miss(
    backend: CacheSettings, namespace: str
) -> None:
    failing = [False]
    app = FastAPI(dependencies=[Depends(bind_identity)])

    @app.get("/reports")
    @cache(namespace=namespace, expire=60, stale_if_error=30)
    async def reports() -> dict[str, str]:
        if failing[0]:
            raise RuntimeError("upstream down")
        return {"report": "quarterly"}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
        await client.get("/reports", headers={"X-Tenant": "acme"})
        key = f"test-cache:{namespace}:tenant_acme:/reports:{hashlib.md5(b'').hexdigest()}"
        await age_entry(key, 20)
        failing[0] = True
        stale = await client.get("/reports", headers={"X-Tenant": "acme"})

    assert stale.headers["X-FastAPI-Cache"] == "STALE"
    assert sample("commons_cache_stale_if_error_total", namespace=namespace) == 1
    assert sample("commons_cache_misses_total", namespace=namespace) == 2


async def test_invalidations_count_the_calls_and_the_entries_they_removed(
    backend: CacheSettings, client: httpx.AsyncClient, namespace: str
) -> None:
    for tenant in ("acme", "globex", "initech"):
        await client.get("/reports", headers={"X-Tenant": tenant})

    await invalidate_namespace(namespace, tenant_id="acme")
    await invalidate_namespace(namespace)
    # On Redis the entries are removed after the calls returned, and counted once removed.
    layer = current_layer()
    assert layer is not None
    await layer.background_removals_settled()

    assert sample("commons_cache_invalidations_total", namespace=namespace) == 2
    assert sample("commons_cache_invalidated_entries_total", namespace=namespace) == 3
    assert sample("commons_cache_removals_pending") == 0


async def test_the_state_gauge_is_one_for_the_current_backend_only(
    backend: CacheSettings, backend_name: str
) -> None:
    assert states() == {state: float(state == backend_name) for state in STATES}


async def test_a_redis_outage_shows_as_backend_errors_and_the_degraded_state(
    own_redis: RedisServer,
    make_settings: Callable[..., CacheSettings],
    client: httpx.AsyncClient,
    namespace: str,
) -> None:
    await init_cache(make_settings(own_redis.url, CACHE_FAILURE_THRESHOLD=1))
    try:
        await client.get("/reports", headers={"X-Tenant": "acme"})
        assert states()["redis"] == 1

        own_redis.kill()
        response = await client.get("/reports", headers={"X-Tenant": "acme"})

        assert response.status_code == 200
        assert (
            sample("commons_cache_backend_errors_total", namespace=namespace, operation="get") == 1
        )
        assert states() == {"redis": 0, "memory": 0, "degraded": 1, "disabled": 0}
    finally:
        await close_cache()
    assert states()["disabled"] == 1


async def test_no_label_value_holds_a_tenant_id_a_user_id_or_a_key(
    backend: CacheSettings, client: httpx.AsyncClient, namespace: str
) -> None:
    tenants = [f"tenant{uuid.uuid4().hex[:10]}" for _ in range(40)]
    users = [f"user{uuid.uuid4().hex[:10]}" for _ in range(40)]
    for tenant, user in zip(tenants, users, strict=True):
        for _ in range(2):
            await client.get("/reports", headers={"X-Tenant": tenant, "X-User": user})
    await invalidate_namespace(namespace, tenant_id=tenants[0], user_id=users[0])
    await invalidate_namespace(namespace, tenant_id=tenants[1])

    label_values = {
        value
        for family in REGISTRY.collect()
        if family.name.startswith("commons_cache_")
        for metric_sample in family.samples
        for value in metric_sample.labels.values()
    }
    assert sample("commons_cache_hits_total", namespace=namespace) == 40
    assert namespace in label_values
    forbidden = [*tenants, *users, f"{backend.CACHE_PREFIX}:", "/reports"]  # ids, keys, paths
    assert [value for value in label_values if any(bad in value for bad in forbidden)] == []


async def test_metrics_are_registered_once_however_often_the_cache_is_initialised(
    redis_url: str,
    make_settings: Callable[..., CacheSettings],
    client: httpx.AsyncClient,
    namespace: str,
) -> None:
    settings = make_settings(redis_url)
    await init_cache(settings)
    await client.get("/reports", headers={"X-Tenant": "acme"})
    await init_cache(settings)
    await init_cache(settings)
    PrometheusEvents()
    try:
        await client.get("/reports", headers={"X-Tenant": "acme"})
    finally:
        await close_cache()

    # Both requests, across three initialisations, feed the same series.
    assert sample("commons_cache_misses_total", namespace=namespace) == 1
    assert sample("commons_cache_hits_total", namespace=namespace) == 1
    exposition = generate_latest(REGISTRY).decode()
    assert exposition.count("# TYPE commons_cache_hits_total counter") == 1
    assert f'commons_cache_hits_total{{namespace="{namespace}"}} 1.0' in exposition


async def test_events_given_to_init_cache_replace_the_default_metrics(
    make_settings: Callable[..., CacheSettings], client: httpx.AsyncClient, namespace: str
) -> None:
    seen: list[tuple[str, str]] = []

    class Recorder(CacheEvents):
        def lookup(self, namespace: str, outcome: str) -> None:
            seen.append((namespace, outcome))

    await init_cache(make_settings(), events=Recorder())
    try:
        await client.get("/reports", headers={"X-Tenant": "acme"})
    finally:
        await close_cache()

    assert seen == [(namespace, "miss")]
    assert sample("commons_cache_misses_total", namespace=namespace) == 0


async def test_without_prometheus_client_the_cache_runs_without_metrics(
    make_settings: Callable[..., CacheSettings],
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # makes the import fail
    monkeypatch.delitem(sys.modules, "commons.cache.metrics")

    await init_cache(make_settings())
    try:
        layer = current_layer()
        assert layer is not None
        assert type(layer.events) is CacheEvents
        response = await client.get("/reports", headers={"X-Tenant": "acme"})
        assert response.headers["X-FastAPI-Cache"] == "MISS"
    finally:
        await close_cache()


async def test_metrics_router_serves_the_counts_on_metrics_in_one_line(
    backend: CacheSettings, namespace: str
) -> None:
    app = make_app(namespace)
    app.include_router(metrics_router())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
        await http.get("/reports", headers={"X-Tenant": "acme"})
        scraped = await http.get("/metrics")

    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain; version=")
    assert f'commons_cache_misses_total{{namespace="{namespace}"}} 1.0' in scraped.text
    assert "/metrics" not in app.openapi()["paths"]


def test_the_operations_page_lists_every_reason_the_near_cache_is_emptied_for() -> None:
    operations = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
    row = next(
        line
        for line in operations.read_text(encoding="utf-8").splitlines()
        if line.startswith("| `commons_cache_near_flushes_total`")
    )
    documented = set(re.findall(r"`([a-z_]+)`", row.partition("`reason` =")[2]))
    reasons = {value for name, value in vars(FlushReason).items() if name.isupper()}

    assert documented == reasons
