"""Tags: ``@cache(tags=...)`` and ``invalidate_tags()`` reach exactly the entries carrying a tag,
at the scope asked, across namespaces, with every guarantee of namespace invalidation.

Routes are served through FastAPI on the memory backend and on a real redis-server; faults are
real (a paused server, generation keys deleted by another client).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from typer.testing import CliRunner, Result

from commons.cache import (
    CacheSettings,
    cache,
    cache_settings,
    cache_status,
    close_cache,
    init_cache,
    invalidate_tags,
    tenant_user_cache_key_builder,
)
from commons.cache.cli import app as cli_app
from commons.cache.keyspace import Keyspace
from commons.cache.scope import CacheScope
from commons.cache.tags import MAX_TAG_LENGTH, EntryTags
from commons.testing.redis_sentinel import LocalSentinel
from commons.testing.redis_server import RedisServer
from commons.testing.waiting import eventually
from commons.utilities.context import get_tenant_id

HIT, MISS = "HIT", "MISS"
TENANTS = ("acme", "globex")


@dataclass
class Service:
    """Insights with a version each; a detail route, a dashboard and an untagged summary."""

    client: httpx.AsyncClient = field(init=False)
    versions: defaultdict[int, int] = field(default_factory=lambda: defaultdict(lambda: 1))
    calls: int = 0

    async def get(self, path: str, tenant: str = "acme", user: str = "u1") -> httpx.Response:
        response = await self.client.get(
            path, headers={"X-Test-Tenant": tenant, "X-Test-User": user}
        )
        assert response.status_code == 200, response.text
        return response

    async def state(self, path: str, tenant: str = "acme", user: str = "u1") -> str:
        return (await self.get(path, tenant, user)).headers["X-FastAPI-Cache"]

    def update(self, insight_id: int) -> None:
        self.versions[insight_id] += 1


def dashboard_tags(kwargs: dict[str, Any]) -> list[str]:
    return [f"insight:{each}" for each in str(kwargs["ids"]).split(",")]


def build_app(make_identity_app: Callable[[], FastAPI], service: Service) -> FastAPI:
    app = make_identity_app()

    @app.get("/insights/{insight_id}")
    @cache(namespace="insight", tags=["insight:{insight_id}", "insights"])
    async def insight(insight_id: int) -> dict[str, int]:
        service.calls += 1
        return {"id": insight_id, "version": service.versions[insight_id]}

    @app.get("/dashboard")
    @cache(namespace="dashboard", tags=dashboard_tags)
    async def dashboard(ids: str) -> dict[str, int]:
        service.calls += 1
        return {
            each: service.versions[int(each)] if each.isdigit() else 0 for each in ids.split(",")
        }

    @app.get("/me/insights/{insight_id}")
    @cache(
        namespace="my_insight",
        key_builder=tenant_user_cache_key_builder,
        tags=["insight:{insight_id}"],
    )
    async def my_insight(insight_id: int) -> dict[str, int]:
        return {"id": insight_id, "version": service.versions[insight_id]}

    @app.get("/summary")
    @cache(namespace="summary")
    async def summary() -> dict[str, str | None]:
        return {"tenant": get_tenant_id()}

    return app


@asynccontextmanager
async def serving(
    make_identity_app: Callable[[], FastAPI], settings: CacheSettings | None = None
) -> AsyncIterator[Service]:
    """The service, on the cache ``init_cache(settings)`` makes (given settings: closed after)."""
    if settings is not None:
        await init_cache(settings)
    made = Service()
    app = build_app(make_identity_app, made)
    made.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    try:
        yield made
    finally:
        await made.client.aclose()
        if settings is not None:
            await close_cache()


@pytest.fixture
async def service(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> AsyncIterator[Service]:
    async with serving(make_identity_app) as made:
        yield made


WARMED = ("/insights/1", "/insights/2", "/dashboard?ids=1,3", "/dashboard?ids=2", "/summary")


async def warm(service: Service, paths: tuple[str, ...] = WARMED) -> None:
    for tenant in TENANTS:
        for path in paths:
            await service.get(path, tenant)
            assert await service.state(path, tenant) == HIT


async def states(service: Service, tenant: str) -> dict[str, str]:
    return {path: await service.state(path, tenant) for path in WARMED}


# -- exactly the entries carrying the tag, at the scope asked --------------------------------------


async def test_a_tag_misses_its_entries_in_every_namespace_and_tenant_and_leaves_the_rest_warm(
    service: Service,
) -> None:
    await warm(service)
    service.update(1)

    await invalidate_tags("insight:1")

    for tenant in TENANTS:
        assert await states(service, tenant) == {
            "/insights/1": MISS,
            "/insights/2": HIT,
            "/dashboard?ids=1,3": MISS,
            "/dashboard?ids=2": HIT,
            "/summary": HIT,
        }
        assert (await service.get("/insights/1", tenant)).json() == {"id": 1, "version": 2}


async def test_a_tag_in_one_tenant_leaves_the_other_tenants_entries_warm(
    service: Service,
) -> None:
    await warm(service)

    await invalidate_tags("insight:2", tenant_id="acme")

    assert await service.state("/insights/2", "acme") == MISS
    assert await service.state("/dashboard?ids=2", "acme") == MISS
    assert await states(service, "globex") == dict.fromkeys(WARMED, HIT)


async def test_a_tag_for_one_user_leaves_other_users_and_the_tenants_shared_entries_warm(
    service: Service,
) -> None:
    for user in ("alice", "bob"):
        await service.get("/me/insights/1", "acme", user)
    await service.get("/insights/1", "acme")

    await invalidate_tags("insight:1", tenant_id="acme", user_id="alice")

    assert await service.state("/me/insights/1", "acme", "alice") == MISS
    assert await service.state("/me/insights/1", "acme", "bob") == HIT
    assert await service.state("/insights/1", "acme") == HIT


async def test_several_tags_at_once_and_a_tag_every_detail_entry_carries(
    service: Service,
) -> None:
    await warm(service)

    await invalidate_tags("insight:3", "insights", tenant_id="globex")

    assert await states(service, "acme") == dict.fromkeys(WARMED, HIT)
    assert await states(service, "globex") == {
        "/insights/1": MISS,
        "/insights/2": MISS,
        "/dashboard?ids=1,3": MISS,
        "/dashboard?ids=2": HIT,
        "/summary": HIT,
    }


async def test_tags_are_literal_text_never_patterns(service: Service) -> None:
    await warm(service)
    await service.get("/dashboard?ids=*")

    await invalidate_tags("insight:*")
    await invalidate_tags("insight:")

    assert await service.state("/dashboard?ids=*") == MISS
    for tenant in TENANTS:
        assert await states(service, tenant) == dict.fromkeys(WARMED, HIT)


async def test_integer_ids_and_tenants_name_the_same_tag_as_their_text(service: Service) -> None:
    await service.get("/insights/007", "42")  # the path parameter is the int 7
    assert await service.state("/insights/007", "42") == HIT

    await invalidate_tags("insight:7", tenant_id=42)

    assert await service.state("/insights/007", "42") == MISS


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["", "x" * (MAX_TAG_LENGTH + 1), 7])
async def test_an_empty_over_long_or_non_text_tag_is_refused_and_nothing_is_invalidated(
    service: Service, tag: Any
) -> None:
    await warm(service, ("/insights/1",))

    with pytest.raises(ValueError, match="non-empty text of at most"):
        await invalidate_tags("insight:1", tag)

    assert await service.state("/insights/1") == HIT


async def test_a_user_without_a_tenant_is_refused(service: Service) -> None:
    with pytest.raises(ValueError, match="tenant_id"):
        await invalidate_tags("insight:1", user_id="alice")


def test_more_literal_tags_than_the_setting_allows_are_refused_when_the_route_is_decorated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CACHE_MAX_TAGS_PER_ENTRY", "2")
    cache_settings.cache_clear()

    cache(tags=["a", "b", "a"])  # the same tag twice is one tag
    with pytest.raises(ValueError, match="3 tags given, CACHE_MAX_TAGS_PER_ENTRY allows 2"):
        cache(tags=["a", "b", "c"])(_handler)


async def _handler(insight_id: int) -> dict[str, int]:
    return {"id": insight_id}


@pytest.mark.parametrize(
    ("tags", "error", "message"),
    [
        (["insight:{item_id}"], ValueError, "item_id: no parameter of the handler"),
        ([""], ValueError, "non-empty text"),
        (["x" * (MAX_TAG_LENGTH + 1)], ValueError, "non-empty text"),
        ("insight:{insight_id}", TypeError, "a list of tags, not one string"),
    ],
)
def test_a_tag_no_request_could_fill_is_refused_when_the_route_is_decorated(
    tags: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        cache(tags=tags)(_handler)


async def test_an_entry_with_more_tags_than_allowed_is_served_not_stored_and_said_once(
    make_identity_app: Callable[[], FastAPI],
    make_settings: Callable[..., CacheSettings],
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(redis_url, CACHE_MAX_TAGS_PER_ENTRY=2)
    async with serving(make_identity_app, settings) as service:
        with caplog.at_level(logging.WARNING, logger="commons.cache"):
            answers = [await service.get("/dashboard?ids=1,2,3") for _ in range(3)]
            assert await service.state("/dashboard?ids=1,2") == MISS
            assert await service.state("/dashboard?ids=1,2") == HIT

    assert [answer.json() for answer in answers] == [{"1": 1, "2": 1, "3": 1}] * 3
    assert service.calls == 4  # three uncached answers, one stored
    [warning] = [record.getMessage() for record in caplog.records]
    assert "GET /dashboard: serving uncached" in warning
    assert "more tags than CACHE_MAX_TAGS_PER_ENTRY allows" in warning


# -- every rule of namespace invalidation holds ----------------------------------------------------


class SlowInsight:
    """One version, read at the start of each computation, which then takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.version = 1
        self.seconds = seconds
        self.started = asyncio.Event()

    async def read(self) -> dict[str, int]:
        version = self.version
        self.started.set()
        await asyncio.sleep(self.seconds)
        return {"version": version}


async def test_a_value_computed_before_the_invalidation_returned_is_never_served_after_it(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    """R1 misses and computes v1; the data changes and ``invalidate_tags`` returns; R2, after
    it, computes v2 rather than joining R1, and R1's v1 is never stored."""
    data = SlowInsight(seconds=0.5)
    app = make_identity_app()

    @app.get("/insights/{insight_id}")
    @cache(namespace="slow", tags=["insight:{insight_id}"])
    async def slow(insight_id: int) -> dict[str, int]:
        return await data.read()

    acme = {"X-Test-Tenant": "acme"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        first = asyncio.create_task(client.get("/insights/5", headers=acme))
        await asyncio.wait_for(data.started.wait(), 5)
        data.version = 2
        await invalidate_tags("insight:5", tenant_id="acme")
        second = await client.get("/insights/5", headers=acme)
        first_response = await first
        later = [await client.get("/insights/5", headers=acme) for _ in range(3)]

    assert first_response.json() == {"version": 1}
    assert (second.headers["X-FastAPI-Cache"], second.json()) == (MISS, {"version": 2})
    assert [response.json() for response in later] == [{"version": 2}] * 3


@pytest.fixture
async def on_own_redis(
    own_redis: RedisServer,
    make_identity_app: Callable[[], FastAPI],
    make_settings: Callable[..., CacheSettings],
) -> AsyncIterator[Service]:
    """The service on a Redis of its own, failing fast (0.2 s timeouts)."""
    settings = make_settings(
        own_redis.url,
        REDIS_SOCKET_TIMEOUT_SECONDS=0.2,
        REDIS_CONNECT_TIMEOUT_SECONDS=0.2,
        CACHE_RECOVERY_INTERVAL_SECONDS=0.2,
    )
    async with serving(make_identity_app, settings) as made:
        yield made


async def tag_generation_keys(redis: Redis) -> set[bytes]:
    return {key async for key in redis.scan_iter(match="test-cache:#gen:{%23tag%3A*")}


async def test_deleting_or_evicting_tag_generations_only_causes_misses(
    on_own_redis: Service, own_redis: RedisServer
) -> None:
    service = on_own_redis
    await warm(service)
    outside = Redis.from_url(own_redis.url)
    try:
        generations = await tag_generation_keys(outside)
        # Per tag (insight:1, insight:2, insight:3, insights): the tag, the tag in each tenant.
        assert len(generations) == 4 * (1 + len(TENANTS))
        await outside.unlink(*generations)

        for tenant in TENANTS:
            assert await states(service, tenant) == {
                "/insights/1": MISS,
                "/insights/2": MISS,
                "/dashboard?ids=1,3": MISS,
                "/dashboard?ids=2": MISS,
                "/summary": HIT,
            }
            assert await states(service, tenant) == dict.fromkeys(WARMED, HIT)
        await invalidate_tags("insight:2")
        assert await service.state("/insights/2", "globex") == MISS
    finally:
        await outside.aclose()


async def test_an_invalidation_by_tag_during_an_outage_is_applied_before_redis_is_read_again(
    on_own_redis: Service, own_redis: RedisServer
) -> None:
    service = on_own_redis
    await warm(service)
    service.update(1)

    own_redis.pause()
    try:
        await invalidate_tags("insight:1", tenant_id="acme")
        assert cache_status().backend == "degraded"
        assert cache_status().pending_invalidations == 1
    finally:
        own_redis.resume()

    for _ in range(200):
        if cache_status().backend == "redis":
            break
        await asyncio.sleep(0.02)
    assert cache_status().backend == "redis"
    assert cache_status().pending_invalidations == 0
    after = await service.get("/insights/1", "acme")
    assert (after.headers["X-FastAPI-Cache"], after.json()) == (MISS, {"id": 1, "version": 2})
    assert await service.state("/dashboard?ids=1,3", "acme") == MISS
    assert await states(service, "globex") == dict.fromkeys(WARMED, HIT)


# -- the key layout --------------------------------------------------------------------------------


def test_tag_generations_are_broadcast_tracked_and_each_tags_share_one_hash_tag() -> None:
    keyspace = Keyspace("svc")
    scope = CacheScope("insight", "acme", "alice", ("insight:7", "a{b}"))

    own, *per_tag = keyspace.generation_groups(scope)

    assert keyspace.generation_keys(scope) == [*own, *per_tag[0], *per_tag[1]]
    assert own == keyspace.generation_keys(CacheScope("insight", "acme", "alice"))
    assert per_tag[0] == [
        "svc:#gen:{%23tag%3Ainsight%3A7}",
        "svc:#gen:{%23tag%3Ainsight%3A7}:t:acme",
        "svc:#gen:{%23tag%3Ainsight%3A7}:t:acme:u:alice",
    ]
    assert per_tag[1][0] == "svc:#gen:{%23tag%3Aa%7Bb%7D}"
    (tracked,) = keyspace.generation_prefixes()
    assert all(key.startswith(tracked) for key in keyspace.generation_keys(scope))
    assert keyspace.scope_generation_key(scope) == own[-1]


# -- on a cluster and behind Sentinel --------------------------------------------------------------

CLUSTER_TENANTS = [str(n) for n in range(8)]


@pytest.mark.slow
async def test_on_a_cluster_a_tag_reaches_its_entries_on_every_primary_at_each_scope(
    redis_cluster_url: str,
    make_identity_app: Callable[[], FastAPI],
    make_settings: Callable[..., CacheSettings],
) -> None:
    async with serving(make_identity_app, make_settings(redis_cluster_url)) as service:
        for tenant in CLUSTER_TENANTS:
            for path in WARMED:
                await service.get(path, tenant)
                assert await service.state(path, tenant) == HIT

        await invalidate_tags("insight:1", tenant_id="3")
        await invalidate_tags("insight:2")

        for tenant in CLUSTER_TENANTS:
            assert await states(service, tenant) == {
                "/insights/1": MISS if tenant == "3" else HIT,
                "/insights/2": MISS,
                "/dashboard?ids=1,3": MISS if tenant == "3" else HIT,
                "/dashboard?ids=2": MISS,
                "/summary": HIT,
            }
            assert await states(service, tenant) == dict.fromkeys(WARMED, HIT)
        assert cache_status().backend == "redis"


@pytest.mark.slow
async def test_behind_sentinel_an_invalidation_by_tag_returns_once_a_replica_has_it(
    sentinel: LocalSentinel,
    make_identity_app: Callable[[], FastAPI],
    make_settings: Callable[..., CacheSettings],
) -> None:
    settings = make_settings(
        "redis://unused:1/0",
        REDIS_SENTINELS=sentinel.sentinels,
        REDIS_SENTINEL_MASTER=sentinel.master_name,
    )
    [master] = [server for server in sentinel.servers if server.port == sentinel.master_port()]
    [replica] = [server for server in sentinel.servers if server is not master]
    generation = b"test-cache:#gen:{%23tag%3Ainsight%3A1}:t:acme"

    async def replica_holds_it() -> bool:
        return replica.command("EXISTS", generation) == b":1\r\n"

    await eventually(lambda: asyncio.to_thread(master.replicas_confirm, 1), "a confirming replica")
    async with serving(make_identity_app, settings) as service:
        await warm(service)
        await eventually(replica_holds_it, "the tag's generation on the replica")

        await invalidate_tags("insight:1", tenant_id="acme")

        assert replica.command("EXISTS", generation) == b":0\r\n"
        assert await service.state("/insights/1", "acme") == MISS
        assert await service.state("/insights/1", "globex") == HIT


# -- another replica's near cache ------------------------------------------------------------------


async def mget_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_mget", {}).get("calls", 0))


async def test_another_replicas_near_cache_sees_an_invalidation_by_tag_and_keeps_the_rest(
    redis_url: str, start_replicas: Callable[..., list[str]], tmp_path: Path
) -> None:
    """Two uvicorn processes on one Redis: B answers items 1 and 2 from its near cache (no
    MGET); A's PUT of item 1 invalidates its tag and returns; B answers item 1's new version
    within the patience of one message, and still answers item 2 without asking Redis."""
    replica_a, replica_b = start_replicas(
        REDIS_URL=redis_url,
        CACHE_PREFIX="tag-replicas",
        REPLICA_DB=str(tmp_path / "replicas.sqlite"),
        REPLICA_READ_SECONDS="0",
    )
    tenant = {"X-Test-Tenant": "acme"}
    outside = Redis.from_url(redis_url)
    try:
        async with (
            httpx.AsyncClient(base_url=replica_a, timeout=10) as a,
            httpx.AsyncClient(base_url=replica_b, timeout=10) as b,
        ):

            async def b_answers_from_memory(path: str, version: int) -> bool:
                before = await mget_calls(outside)
                assert (await b.get(path, headers=tenant)).json() == {"version": version}
                return await mget_calls(outside) == before

            for item in ("/items/1", "/items/2"):
                assert (await a.get(item, headers=tenant)).json() == {"version": 1}
                await eventually(partial(b_answers_from_memory, item, 1), f"B holding {item}")

            assert (await a.put("/items/1", headers=tenant)).json() == {"version": 2}

            async def b_answers_v2() -> bool:
                return (await b.get("/items/1", headers=tenant)).json() == {"version": 2}

            await eventually(b_answers_v2, "B answering item 1's new version")
            assert await b_answers_from_memory("/items/2", 1)
    finally:
        await outside.aclose()


# -- the command line ------------------------------------------------------------------------------


def run_cli(redis_url: str, *args: str) -> Result:
    env = {"REDIS_URL": redis_url, "CACHE_PREFIX": "test-cache"}
    return CliRunner().invoke(cli_app, list(args), env=env)


async def test_the_cli_invalidates_a_tag_at_the_scope_asked(
    on_own_redis: Service, own_redis: RedisServer
) -> None:
    service = on_own_redis
    await warm(service)
    service.update(1)

    result = await asyncio.to_thread(
        run_cli, own_redis.url, "invalidate", "--tag", "insight:1", "--tenant", "acme"
    )

    assert (result.exit_code, result.stdout) == (0, "invalidated tag insight:1 for tenant acme\n")

    async def acme_sees_version_2() -> bool:
        answer = await service.get("/insights/1", "acme")
        return bool(answer.json() == {"id": 1, "version": 2})

    await eventually(acme_sees_version_2, "acme's insight 1 at its new version")
    assert await service.state("/dashboard?ids=1,3", "acme") == MISS
    assert await states(service, "globex") == dict.fromkeys(WARMED, HIT)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["invalidate", "insight", "--tag", "insight:1"], "give a namespace or --tag, not both"),
        (["invalidate"], "give a namespace, or --tag"),
        (["invalidate", "--tag", ""], "non-empty text"),
        (["invalidate", "--tag", "insight:1", "--user", "u1"], "--user needs --tenant"),
    ],
)
def test_the_cli_refuses_what_invalidate_tags_refuses(
    own_redis: RedisServer, args: list[str], message: str
) -> None:
    result = run_cli(own_redis.url, *args)

    assert result.exit_code == 2
    assert message in result.stderr


# -- an entry's tags, worked out per call ----------------------------------------------------------


class Colour(Enum):
    RED = "red"


@pytest.mark.parametrize(
    ("source", "kwargs", "expected"),
    [
        (["insight:{insight_id}", "all"], {"insight_id": 7}, ("insight:7", "all")),
        (["colour:{colour}"], {"colour": Colour.RED}, ("colour:red",)),
        (["a:{x}:{x}", "a:{x}:{x}"], {"x": 1}, ("a:1:1",)),
        (["{x}"], {"x": ""}, None),
        (lambda kwargs: f"one:{kwargs['x']}", {"x": 2}, ("one:2",)),
        (lambda kwargs: ["b", "a", "b"], {"x": 2}, ("b", "a")),
        (lambda kwargs: ["ok", 3], {}, None),
        (lambda kwargs: ["x" * (MAX_TAG_LENGTH + 1)], {}, None),
        # A function that returns no iterable of text: unfit, never a failed request.
        (lambda kwargs: None, {}, None),
        (lambda kwargs: 7, {}, None),
        (lambda kwargs: [{"a": 1}], {}, None),
    ],
)
def test_the_tags_of_a_call_each_once_or_none_when_one_is_unfit(
    source: Any, kwargs: dict[str, Any], expected: tuple[str, ...] | None
) -> None:
    assert EntryTags(source, ["insight_id", "colour", "x"]).of(None, kwargs) == expected
