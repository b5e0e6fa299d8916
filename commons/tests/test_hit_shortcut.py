"""The hit shortcut: a repeated near-cache HIT answered at once, exactly as the flow answers it.

Against the session's real Redis with the near cache on (the default). A spy on
``HitShortcut.answer`` says which requests the shortcut answered; every assertion is about what
the client receives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Response
from redis.asyncio import Redis

from commons.cache import (
    CacheSettings,
    cache,
    close_cache,
    init_cache,
    invalidate_namespace,
    tenant_cache_key_builder,
    tenant_user_cache_key_builder,
)
from commons.cache.hit_shortcut import HitShortcut
from commons.testing.waiting import eventually

from _support import as_tenant, client_for

CALLS = {"n": 0}


@pytest.fixture
def shortcut_answers(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One item per request the shortcut was asked about: whether it answered it."""
    answered: list[bool] = []
    original = HitShortcut.answer

    def spy(self: HitShortcut, request: Any, sub_response: object) -> Any:
        response = original(self, request, sub_response)
        answered.append(response is not None)
        return response

    monkeypatch.setattr(HitShortcut, "answer", spy)
    return answered


@pytest.fixture
async def app(make_identity_app: Callable[[], FastAPI]) -> FastAPI:
    app = make_identity_app()
    CALLS["n"] = 0

    @app.api_route("/reports/{name}", methods=["GET", "HEAD"])
    @cache(namespace="reports", expire=60)
    async def report(name: str, page: int = 1) -> dict[str, Any]:
        CALLS["n"] += 1
        return {"name": name, "page": page, "computed": CALLS["n"]}

    @app.get("/me")
    @cache(namespace="me", key_builder=tenant_user_cache_key_builder)
    async def me() -> dict[str, Any]:
        from commons.utilities.context import get_tenant_id, get_user_id

        return {"tenant": get_tenant_id(), "user": get_user_id()}

    def own_builder(func: Any, namespace: str = "", **kwargs: Any) -> str:
        return tenant_cache_key_builder(func, namespace, **kwargs) + "-own"

    @app.get("/own")
    @cache(namespace="own", key_builder=own_builder)
    async def own() -> dict[str, int]:
        return {"own": 1}

    return app


@pytest.fixture
async def client(app: FastAPI, on_redis: CacheSettings) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as http:
        yield http


async def until_shortcut_answers(
    client: httpx.AsyncClient, path: str, answered: list[bool], **headers: str
) -> httpx.Response:
    """Asks ``path`` until the shortcut answers it (the near cache holds it once a read from
    Redis found it, and remembers its answer at the next HIT); returns that answer."""
    found: list[httpx.Response] = []

    async def answered_by_shortcut() -> bool:
        answered.clear()
        response = await client.get(path, headers=headers)
        found.append(response)
        return answered == [True]

    await eventually(answered_by_shortcut, f"the shortcut answers {path}")
    return found[-1]


def forget_objects() -> None:
    """Forgets the objects kept for the keys hit most recently (the shortcut's and the prepared
    answers'), as a working set larger than them does: what is left is the flat memory."""
    from commons.cache import cached_route, hit_shortcut

    hit_shortcut._hot.clear()
    cached_route._hot_prepared.clear()


def without_clock(headers: httpx.Headers) -> dict[str, str]:
    """The headers of an answer but ``Age`` (whole seconds since the entry was stored)."""
    return {name: value for name, value in headers.items() if name != "age"}


async def test_a_repeated_hit_is_answered_as_the_flow_answers_it(
    client: httpx.AsyncClient, shortcut_answers: list[bool]
) -> None:
    first = await client.get("/reports/q1?page=2", headers=as_tenant("t1"))
    assert first.headers["x-fastapi-cache"] == "MISS"
    shortcut = await until_shortcut_answers(
        client, "/reports/q1?page=2", shortcut_answers, **as_tenant("t1")
    )
    # Any Cache-Control of the client's sends the request through the whole flow: a HIT there.
    shortcut_answers.clear()
    flow = await client.get(
        "/reports/q1?page=2", headers={**as_tenant("t1"), "Cache-Control": "max-stale=5"}
    )
    assert shortcut_answers == [False]
    assert shortcut.status_code == flow.status_code == 200
    assert shortcut.content == flow.content == first.content
    assert shortcut.headers["x-fastapi-cache"] == "HIT"
    assert without_clock(shortcut.headers) == without_clock(flow.headers)
    assert abs(int(shortcut.headers["age"]) - int(flow.headers["age"])) <= 1
    assert CALLS["n"] == 1


async def test_paths_queries_and_tenants_never_share_a_remembered_answer(
    client: httpx.AsyncClient, shortcut_answers: list[bool]
) -> None:
    asked = [
        ("/reports/q1", "t1"),
        ("/reports/q1", "t2"),
        ("/reports/q2", "t1"),
        ("/reports/q1?page=2", "t1"),
        ("/reports/q1?page=%32", "t1"),
    ]
    first = {
        (path, tenant): (await client.get(path, headers=as_tenant(tenant))).json()
        for path, tenant in asked
    }
    # Five keys: five computations (``page=%32`` is ``page=2``, the same key as in the flow).
    assert len({body["computed"] for body in first.values()}) == 4
    for path, tenant in asked:
        await until_shortcut_answers(client, path, shortcut_answers, **as_tenant(tenant))
    for _ in range(3):
        for path, tenant in asked:
            response = await client.get(path, headers=as_tenant(tenant))
            assert response.json() == first[(path, tenant)]
            assert response.headers["x-fastapi-cache"] == "HIT"


async def test_users_of_one_tenant_never_share_a_remembered_answer(
    client: httpx.AsyncClient, shortcut_answers: list[bool]
) -> None:
    users = [("t1", "u1"), ("t1", "u2"), ("t2", "u1")]
    for tenant, user in users:
        headers = {**as_tenant(tenant), "X-Test-User": user}
        await until_shortcut_answers(client, "/me", shortcut_answers, **headers)
    for _ in range(3):
        for tenant, user in users:
            answer = await client.get("/me", headers={**as_tenant(tenant), "X-Test-User": user})
            assert answer.json() == {"tenant": tenant, "user": user}
    # No user bound: uncached, never a remembered answer of anyone's.
    shortcut_answers.clear()
    anonymous = await client.get("/me", headers=as_tenant("t1"))
    assert anonymous.json() == {"tenant": "t1", "user": None}
    assert anonymous.headers.get("x-fastapi-cache") is None
    assert shortcut_answers == [False]


async def test_an_invalidation_is_seen_by_the_next_request(
    client: httpx.AsyncClient, shortcut_answers: list[bool]
) -> None:
    await until_shortcut_answers(client, "/reports/q1", shortcut_answers, **as_tenant("t1"))
    before = (await client.get("/reports/q1", headers=as_tenant("t1"))).json()
    await invalidate_namespace("reports", tenant_id="t1")
    after = await client.get("/reports/q1", headers=as_tenant("t1"))
    assert after.headers["x-fastapi-cache"] == "MISS"
    assert after.json()["computed"] > before["computed"]


async def test_a_generation_lost_in_redis_is_seen_within_its_message(
    client: httpx.AsyncClient, shortcut_answers: list[bool], raw_redis: Redis
) -> None:
    """Another process's invalidation, an eviction: Redis announces it, nothing is remembered
    past it."""
    await until_shortcut_answers(client, "/reports/q1", shortcut_answers, **as_tenant("t1"))
    before = (await client.get("/reports/q1", headers=as_tenant("t1"))).json()
    generations = [key async for key in raw_redis.scan_iter(match="*#gen*")]
    assert generations
    await raw_redis.delete(*generations)

    async def recomputed() -> bool:
        body = (await client.get("/reports/q1", headers=as_tenant("t1"))).json()
        return bool(body["computed"] > before["computed"])

    await eventually(recomputed, "a request recomputed after its generations were lost")


async def test_what_a_request_asks_of_the_answer_goes_through_the_flow(
    client: httpx.AsyncClient, shortcut_answers: list[bool]
) -> None:
    hit = await until_shortcut_answers(client, "/reports/q1", shortcut_answers, **as_tenant("t1"))
    shortcut_answers.clear()
    etag = hit.headers["etag"]
    not_modified = await client.get(
        "/reports/q1", headers={**as_tenant("t1"), "If-None-Match": etag}
    )
    assert not_modified.status_code == 304
    head = await client.head("/reports/q1", headers=as_tenant("t1"))
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["x-fastapi-cache"] == "HIT"
    assert shortcut_answers == [False, False]


async def test_a_header_set_by_a_dependency_is_in_every_answer(
    app: FastAPI, on_redis: CacheSettings, shortcut_answers: list[bool]
) -> None:
    async def set_header(response: Response) -> None:
        response.headers["X-Request-Id"] = "abc"

    from fastapi import Depends

    @app.get("/traced", dependencies=[Depends(set_header)])
    @cache(namespace="traced")
    async def traced() -> dict[str, int]:
        return {"traced": 1}

    async with client_for(app) as http:
        for _ in range(6):
            response = await http.get("/traced", headers=as_tenant("t1"))
            assert response.headers["x-request-id"] == "abc"
        assert response.headers["x-fastapi-cache"] == "HIT"
    assert not any(shortcut_answers)


async def test_a_key_builder_of_the_service_never_takes_the_shortcut(
    client: httpx.AsyncClient, shortcut_answers: list[bool]
) -> None:
    for _ in range(6):
        response = await client.get("/own", headers=as_tenant("t1"))
    assert response.headers["x-fastapi-cache"] == "HIT"
    assert shortcut_answers == []


async def test_a_stale_entry_is_answered_stale(
    app: FastAPI, on_redis: CacheSettings, shortcut_answers: list[bool]
) -> None:
    @app.get("/short")
    @cache(namespace="short", expire=2, stale_ttl=30)
    async def short() -> dict[str, int]:
        return {"short": 1}

    async with client_for(app) as http:
        await until_shortcut_answers(http, "/short", shortcut_answers, **as_tenant("t1"))
        await asyncio.sleep(2.5)
        shortcut_answers.clear()
        stale = await http.get("/short", headers=as_tenant("t1"))
        assert stale.headers["x-fastapi-cache"] == "STALE"
        assert shortcut_answers == [False]


async def test_a_new_init_cache_never_answers_from_the_previous_ones_memory(
    app: FastAPI,
    redis_url: str,
    make_settings: Callable[..., CacheSettings],
    shortcut_answers: list[bool],
) -> None:
    await init_cache(make_settings(redis_url))
    try:
        async with client_for(app) as http:
            await until_shortcut_answers(http, "/reports/q1", shortcut_answers, **as_tenant("t1"))
    finally:
        await close_cache()
    await init_cache(make_settings(None))  # the in-memory backend, empty
    try:
        async with client_for(app) as http:
            shortcut_answers.clear()
            response = await http.get("/reports/q1", headers=as_tenant("t1"))
            assert response.headers["x-fastapi-cache"] == "MISS"
            assert shortcut_answers == [False]
    finally:
        await close_cache()


async def test_lookups_logged_one_by_one_go_through_the_flow(
    client: httpx.AsyncClient, shortcut_answers: list[bool], caplog: pytest.LogCaptureFixture
) -> None:
    await until_shortcut_answers(client, "/reports/q1", shortcut_answers, **as_tenant("t1"))
    shortcut_answers.clear()
    with caplog.at_level(logging.DEBUG, logger="commons.cache"):
        for _ in range(3):
            response = await client.get("/reports/q1", headers=as_tenant("t1"))
            assert response.headers["x-fastapi-cache"] == "HIT"
    assert shortcut_answers == [False, False, False]
    assert sum("cache HIT" in record.getMessage() for record in caplog.records) == 3


async def test_an_answer_no_longer_kept_as_an_object_is_answered_the_same(
    client: httpx.AsyncClient, shortcut_answers: list[bool]
) -> None:
    """Over a working set larger than the objects kept for the most recent keys, a plain JSON
    answer is prepared again from the stored bytes: to the byte, the flow's answer."""
    kept = await until_shortcut_answers(client, "/reports/q1", shortcut_answers, **as_tenant("t1"))
    forget_objects()
    shortcut_answers.clear()
    again = await client.get("/reports/q1", headers=as_tenant("t1"))
    assert shortcut_answers == [True]
    flow = await client.get(
        "/reports/q1", headers={**as_tenant("t1"), "Cache-Control": "max-stale=5"}
    )
    assert again.content == kept.content == flow.content
    assert (
        without_clock(again.headers) == without_clock(kept.headers) == without_clock(flow.headers)
    )


async def test_an_answer_with_its_own_headers_is_replayed_only_while_it_is_kept_prepared(
    app: FastAPI, on_redis: CacheSettings, shortcut_answers: list[bool]
) -> None:
    """A stored answer that is not plain JSON is replayed from the route's prepared answers
    alone (as objects, or as fields once the objects are let go); once they let it go too, the
    flow answers, and prepares it again."""
    import gc

    from commons.cache import cached_route

    @app.get("/labelled")
    @cache(namespace="labelled")
    async def labelled() -> Response:
        return Response(b"<p>hi</p>", media_type="text/html", headers={"X-Label": "a"})

    async with client_for(app) as http:
        kept = await until_shortcut_answers(http, "/labelled", shortcut_answers, **as_tenant("t1"))
        assert kept.headers["x-label"] == "a"
        forget_objects()
        shortcut_answers.clear()
        from_fields = await http.get("/labelled", headers=as_tenant("t1"))
        assert shortcut_answers == [True]
        assert without_clock(from_fields.headers) == without_clock(kept.headers)
        assert from_fields.content == kept.content

        forget_objects()
        for prepared in gc.get_objects():
            if isinstance(prepared, cached_route.PreparedResponses):
                prepared._memo.clear()
        shortcut_answers.clear()
        flow = await http.get("/labelled", headers=as_tenant("t1"))
        assert shortcut_answers == [False]
        assert without_clock(flow.headers) == without_clock(kept.headers)
        assert flow.content == kept.content == b"<p>hi</p>"
        again = await until_shortcut_answers(http, "/labelled", shortcut_answers, **as_tenant("t1"))
        assert without_clock(again.headers) == without_clock(kept.headers)


async def test_what_the_shortcut_remembers_is_never_walked_by_the_collector(
    client: httpx.AsyncClient, shortcut_answers: list[bool]
) -> None:
    """Remembered hits are flat tuples: once a collection has passed, none is tracked, so a
    memo as large as the near cache adds nothing to a full collection."""
    import gc

    from commons.cache import hit_shortcut
    from commons.cache.lifecycle import current_layer

    queries = [f"page={page}".encode() for page in range(1, 6)]
    for query in queries:
        path = f"/reports/q1?{query.decode()}"
        await until_shortcut_answers(client, path, shortcut_answers, **as_tenant("t1"))
    layer = current_layer()
    assert layer is not None
    memo = hit_shortcut._remembered.memo
    gc.collect()
    # This test's (an earlier test's are frozen: see conftest.py).
    held = [
        (key, value)
        for key, value in [*memo._items.items(), *memo._nursery.items()]
        if key[2] in queries and value[0] == layer.serial
    ]
    assert len(held) == len(queries)
    assert not any(gc.is_tracked(key) or gc.is_tracked(value) for key, value in held)


async def test_a_read_the_near_cache_keeps_is_remembered_at_once(
    client: httpx.AsyncClient, shortcut_answers: list[bool]
) -> None:
    """The read from Redis that the near cache keeps is remembered too: the very next request
    takes the shortcut (over a working set larger than the near cache, a kept entry is often
    hit only once or twice before it is evicted)."""
    # The near cache's session is live once the shortcut answers anything.
    await until_shortcut_answers(client, "/reports/warm", shortcut_answers, **as_tenant("t1"))
    shortcut_answers.clear()
    miss = await client.get("/reports/fresh", headers=as_tenant("t1"))
    from_redis = await client.get("/reports/fresh", headers=as_tenant("t1"))
    remembered = await client.get("/reports/fresh", headers=as_tenant("t1"))
    assert [miss.headers["x-fastapi-cache"], from_redis.headers["x-fastapi-cache"]] == [
        "MISS",
        "HIT",
    ]
    assert shortcut_answers == [False, False, True]
    assert remembered.headers["x-fastapi-cache"] == "HIT"
    assert remembered.content == from_redis.content == miss.content
    assert without_clock(remembered.headers) == without_clock(from_redis.headers)
