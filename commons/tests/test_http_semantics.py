"""HTTP semantics of cached answers: ETag and If-None-Match, Cache-Control and Vary, HEAD, what is
never stored, and the policy for a client's own Cache-Control."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from commons.cache import (
    CacheSettings,
    cache,
    close_cache,
    init_cache,
    invalidate_namespace,
    tenant_user_cache_key_builder,
)
from commons.cache.entry import parse_any
from commons.testing.entries import age_entry, stored_value, write_raw

TENANT = {"X-Test-Tenant": "acme"}
KEY_OF_EMPTY_QUERY = hashlib.md5(b"").hexdigest()


def body_etag(body: bytes) -> str:
    """The documented ETag: the first 32 hex digits of the body's SHA-256, quoted."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


class Calls:
    def __init__(self) -> None:
        self.count = 0


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def app(make_identity_app: Callable[[], FastAPI], calls: Calls) -> FastAPI:
    app = make_identity_app()

    @app.api_route("/report", methods=["GET", "HEAD"])
    @cache(namespace="reports", expire=60)
    async def report() -> dict[str, Any]:
        calls.count += 1
        return {"title": "Quarterly", "rows": list(range(20))}

    @app.get("/reusable")
    @cache(namespace="reusable", expire=60, client_max_age=3600)
    async def reusable() -> dict[str, str]:
        calls.count += 1
        return {"reusable": "yes"}

    @app.get("/me")
    @cache(namespace="me", expire=60, key_builder=tenant_user_cache_key_builder)
    async def me() -> dict[str, str]:
        calls.count += 1
        return {"name": "Ada"}

    @app.get("/missing")
    @cache(namespace="errors")
    async def missing() -> dict[str, str]:
        calls.count += 1
        raise HTTPException(status_code=404, detail="no such report")

    @app.get("/crash")
    @cache(namespace="errors")
    async def crash() -> dict[str, str]:
        calls.count += 1
        raise RuntimeError("handler bug")

    @app.get("/returned-404")
    @cache(namespace="errors")
    async def returned_404() -> JSONResponse:
        calls.count += 1
        return JSONResponse({"detail": "gone"}, status_code=404)

    @app.get("/cookie")
    @cache(namespace="uncacheable")
    async def cookie() -> JSONResponse:
        calls.count += 1
        response = JSONResponse({"ok": True})
        response.set_cookie("session", "s3cret")
        return response

    @app.get("/raw-cookie")
    @cache(namespace="uncacheable")
    async def raw_cookie() -> JSONResponse:
        calls.count += 1
        response = JSONResponse({"ok": True})
        # As copied from another response (an upstream's, through httpx): its own spelling.
        response.raw_headers.append((b"Set-Cookie", b"session=s3cret"))
        return response

    @app.get("/handler-cookie")
    @cache(namespace="uncacheable")
    async def handler_cookie(response: Response) -> dict[str, bool]:
        calls.count += 1
        response.set_cookie("session", "s3cret")
        return {"ok": True}

    @app.get("/no-store")
    @cache(namespace="uncacheable")
    async def no_store() -> PlainTextResponse:
        calls.count += 1
        return PlainTextResponse("fresh", headers={"Cache-Control": "no-store"})

    @app.get("/says-private")
    @cache(namespace="uncacheable")
    async def says_private() -> PlainTextResponse:
        calls.count += 1
        return PlainTextResponse("mine", headers={"Cache-Control": "private"})

    return app


# -- ETag and If-None-Match ------------------------------------------------------------------


async def test_etag_is_the_documented_digest_of_the_body_on_miss_and_hit(
    backend: CacheSettings, client: httpx.AsyncClient
) -> None:
    miss = await client.get("/report", headers=TENANT)
    hit = await client.get("/report", headers=TENANT)

    assert (miss.headers["x-fastapi-cache"], hit.headers["x-fastapi-cache"]) == ("MISS", "HIT")
    assert miss.headers["etag"] == body_etag(miss.content)
    assert hit.headers["etag"] == miss.headers["etag"]


@pytest.mark.parametrize(
    "if_none_match",
    [
        pytest.param("{etag}", id="exact"),
        pytest.param("W/{etag}", id="weak"),
        pytest.param('"0000", {etag}, "ffff"', id="list"),
        pytest.param("*", id="star"),
    ],
)
async def test_a_matching_if_none_match_gets_304_without_body_on_hit(
    backend: CacheSettings, client: httpx.AsyncClient, if_none_match: str
) -> None:
    etag = (await client.get("/report", headers=TENANT)).headers["etag"]

    response = await client.get(
        "/report", headers={**TENANT, "If-None-Match": if_none_match.format(etag=etag)}
    )

    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["x-fastapi-cache"] == "HIT"
    assert response.headers["etag"] == etag
    assert response.headers["cache-control"] == "private, no-cache"


async def test_a_matching_if_none_match_gets_304_on_miss_too(
    backend: CacheSettings, client: httpx.AsyncClient, calls: Calls
) -> None:
    etag = (await client.get("/report", headers=TENANT)).headers["etag"]
    # A new tenant misses, but its content is the same, so the client's copy is still valid.
    response = await client.get(
        "/report", headers={"X-Test-Tenant": "globex", "If-None-Match": etag}
    )

    assert response.headers["x-fastapi-cache"] == "MISS"
    assert calls.count == 2
    assert response.status_code == 304
    assert response.content == b""


async def test_a_stale_or_foreign_if_none_match_gets_the_full_answer(
    backend: CacheSettings, client: httpx.AsyncClient
) -> None:
    full = await client.get("/report", headers=TENANT)

    response = await client.get("/report", headers={**TENANT, "If-None-Match": '"0000", W/"1"'})

    assert response.status_code == 200
    assert response.content == full.content


# -- Cache-Control and Vary ------------------------------------------------------------------


async def test_tenant_scoped_answers_are_private_and_vary_on_authorization(
    backend: CacheSettings, client: httpx.AsyncClient
) -> None:
    for response in [await client.get("/report", headers=TENANT) for _ in range(2)]:
        assert response.headers["cache-control"] == "private, no-cache"
        assert response.headers["vary"] == "Authorization"


async def test_by_default_a_client_must_revalidate_and_gets_a_cheap_304_while_nothing_changed(
    backend: CacheSettings, client: httpx.AsyncClient, calls: Calls
) -> None:
    miss = await client.get("/report", headers=TENANT)
    hit = await client.get("/report", headers=TENANT)
    revalidated = await client.get(
        "/report", headers={**TENANT, "If-None-Match": miss.headers["etag"]}
    )

    assert [r.headers["cache-control"] for r in (miss, hit, revalidated)] == [
        "private, no-cache"
    ] * 3
    assert (revalidated.status_code, revalidated.content) == (304, b"")
    assert calls.count == 1


async def test_a_client_revalidating_after_an_update_gets_the_new_answer_at_once(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    app = make_identity_app()
    version = {"n": 1}

    @app.get("/config")
    @cache(namespace="config", expire=600)
    async def config() -> dict[str, int]:
        return version

    @app.put("/config")
    async def put_config() -> None:
        version["n"] += 1
        await invalidate_namespace("config", tenant_id="acme")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        before = await client.get("/config", headers=TENANT)
        await client.put("/config", headers=TENANT)
        after = await client.get(
            "/config", headers={**TENANT, "If-None-Match": before.headers["etag"]}
        )

    assert before.headers["cache-control"] == "private, no-cache"
    assert (after.status_code, after.json()) == (200, {"n": 2})


def reusable_for(response: httpx.Response) -> int:
    """Seconds a client may reuse ``response`` from now (RFC 9111, 4.2): its ``max-age`` less
    its ``Age``, under ``private``."""
    directives = dict(
        part.strip().partition("=")[::2] for part in response.headers["cache-control"].split(",")
    )
    return int(directives["max-age"]) - int(response.headers.get("age", "0"))


async def test_client_max_age_lets_a_client_reuse_its_copy_at_most_while_the_entry_is_fresh(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    app = make_identity_app()

    @app.get("/catalogue")
    @cache(namespace="catalogue", expire=60, client_max_age=30)
    async def catalogue() -> dict[str, str]:
        return {"items": "all"}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        miss = await client.get("/catalogue", headers=TENANT)
        hit = await client.get("/catalogue", headers=TENANT)
        await age_entry(f"test-cache:catalogue:tenant_acme:/catalogue:{KEY_OF_EMPTY_QUERY}", 12)
        later = await client.get("/catalogue", headers=TENANT)

    # What a client computes (RFC 9111): reusable while its age, from Age on, is below max-age.
    assert [reusable_for(r) for r in (miss, hit, later)] == [30, 30, 12]
    assert later.headers["age"] == "48"


def test_a_negative_client_max_age_is_refused_when_decorating() -> None:
    with pytest.raises(ValueError, match="client_max_age"):
        cache(client_max_age=-1)


async def test_user_scoped_answers_are_private_and_vary_on_authorization(
    backend: CacheSettings, client: httpx.AsyncClient
) -> None:
    headers = {**TENANT, "X-Test-User": "ada"}
    miss = await client.get("/me", headers=headers)
    hit = await client.get("/me", headers=headers)

    assert hit.headers["x-fastapi-cache"] == "HIT"
    for response in (miss, hit):
        assert response.headers["cache-control"] == "private, no-cache"
        assert response.headers["vary"] == "Authorization"


async def test_max_age_on_a_hit_is_the_entry_s_remaining_time_to_live_under_client_max_age(
    backend: CacheSettings, client: httpx.AsyncClient
) -> None:
    await client.get("/reusable", headers=TENANT)
    key = f"test-cache:reusable:tenant_acme:/reusable:{KEY_OF_EMPTY_QUERY}"
    await age_entry(key, 42)

    hit = await client.get("/reusable", headers=TENANT)
    again = await client.get("/reusable", headers=TENANT)
    await age_entry(key, 17)
    later = await client.get("/reusable", headers=TENANT)

    assert hit.headers["x-fastapi-cache"] == "HIT"
    assert [reusable_for(r) for r in (hit, again, later)] == [42, 42, 17]
    assert later.headers["etag"] == hit.headers["etag"]


# -- Age -------------------------------------------------------------------------------------

REPORT_KEY = f"test-cache:reports:tenant_acme:/report:{KEY_OF_EMPTY_QUERY}"


async def test_age_is_the_seconds_since_the_entry_was_stored_on_every_stored_answer(
    backend: CacheSettings, client: httpx.AsyncClient
) -> None:
    miss = await client.get("/report", headers=TENANT)
    hit = await client.get("/report", headers=TENANT)
    await age_entry(REPORT_KEY, 53)  # stored for 60 s: stored 7 s ago
    older = await client.get("/report", headers=TENANT)
    not_modified = await client.get(
        "/report", headers={**TENANT, "If-None-Match": miss.headers["etag"]}
    )

    assert "age" not in miss.headers  # computed for this request, not served from storage
    assert hit.headers["age"] == "0"
    assert (older.headers["age"], older.headers["cache-control"]) == ("7", "private, no-cache")
    assert (not_modified.status_code, not_modified.headers["age"]) == (304, "7")


async def test_two_instances_of_the_service_give_one_entry_the_same_age(
    backend: CacheSettings, app: FastAPI, make_identity_app: Callable[[], FastAPI], calls: Calls
) -> None:
    other = make_identity_app()
    other.router.routes.extend(app.router.routes)
    transports = [httpx.ASGITransport(app=each) for each in (app, other)]
    async with (
        httpx.AsyncClient(transport=transports[0], base_url="http://a") as first,
        httpx.AsyncClient(transport=transports[1], base_url="http://b") as second,
    ):
        await first.get("/report", headers=TENANT)
        await age_entry(REPORT_KEY, 48)
        ages = [(await c.get("/report", headers=TENANT)).headers["age"] for c in (first, second)]

    assert ages == ["12", "12"]


async def test_an_entry_stored_in_the_previous_shape_is_served_without_age(
    backend: CacheSettings, client: httpx.AsyncClient
) -> None:
    """Entries written before the format carried their lifetime (marker 2) are still answers
    until they expire: never a 500, and no made-up Age."""
    miss = await client.get("/report", headers=TENANT)
    remaining, raw = await stored_value(REPORT_KEY)
    assert raw is not None
    fingerprint, generation, value = parse_any(raw) or pytest.fail("unreadable entry")
    previous = b'["commons.cache",2,"%s","%s","%s",%d,%s]' % (
        fingerprint,
        generation,
        value.kind,
        value.stale_seconds,
        value.payload,
    )
    await write_raw(REPORT_KEY, previous, remaining)

    hit = await client.get("/report", headers=TENANT)

    assert (hit.status_code, hit.headers["x-fastapi-cache"]) == (200, "HIT")
    assert hit.content == miss.content
    assert "age" not in hit.headers


# -- Cache-Status (RFC 9211) -----------------------------------------------------------------


async def test_cache_status_names_the_cache_and_says_hit_with_ttl_or_why_it_went_forward(
    backend: CacheSettings, client: httpx.AsyncClient
) -> None:
    miss = await client.get("/report", headers=TENANT)
    hit = await client.get("/report", headers=TENANT)
    not_modified = await client.get(
        "/report", headers={**TENANT, "If-None-Match": miss.headers["etag"]}
    )
    not_stored = await client.get("/no-store", headers=TENANT)
    no_identity = await client.get("/report")

    assert miss.headers["cache-status"] == "test-cache; fwd=miss; stored"
    assert hit.headers["cache-status"] == "test-cache; hit; ttl=60"
    assert not_modified.headers["cache-status"] == "test-cache; hit; ttl=60"
    assert not_stored.headers["cache-status"] == "test-cache; fwd=miss"
    assert no_identity.headers["cache-status"] == "test-cache; fwd=bypass"


async def test_cache_status_says_collapsed_when_a_request_got_another_s_computation(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    app = make_identity_app()
    gate = asyncio.Event()

    @app.get("/slow")
    @cache(namespace="slow", expire=60)
    async def slow() -> dict[str, bool]:
        await gate.wait()
        return {"ok": True}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        requests = [asyncio.create_task(client.get("/slow", headers=TENANT)) for _ in range(3)]
        await asyncio.sleep(0.1)
        gate.set()
        statuses = sorted(r.headers["cache-status"] for r in await asyncio.gather(*requests))

    assert statuses == [
        "test-cache; fwd=miss; collapsed",
        "test-cache; fwd=miss; collapsed",
        "test-cache; fwd=miss; stored",
    ]


async def test_cache_status_says_the_client_asked_for_a_fresh_answer_when_it_is_honoured(
    backend: CacheSettings, make_settings: Callable[..., CacheSettings], client: httpx.AsyncClient
) -> None:
    await init_cache(make_settings(backend.REDIS_URL, CACHE_HONOR_CLIENT_NO_CACHE=True))
    await client.get("/report", headers=TENANT)

    forced = await client.get("/report", headers={**TENANT, "Cache-Control": "no-cache"})

    assert forced.headers["cache-status"] == "test-cache; fwd=request; stored"


# -- HEAD ------------------------------------------------------------------------------------


async def test_head_after_get_is_a_hit_with_the_get_s_headers_and_no_body(
    backend: CacheSettings, client: httpx.AsyncClient, calls: Calls
) -> None:
    get = await client.get("/report", headers=TENANT)

    head = await client.head("/report", headers=TENANT)

    assert head.status_code == 200
    assert head.headers["x-fastapi-cache"] == "HIT"
    assert head.content == b""
    assert head.headers["content-length"] == str(len(get.content))
    assert head.headers["etag"] == get.headers["etag"]
    assert calls.count == 1


async def test_a_head_miss_is_never_stored_and_the_next_get_computes_its_full_body(
    backend: CacheSettings, client: httpx.AsyncClient, calls: Calls
) -> None:
    head = await client.head("/report", headers=TENANT)

    get = await client.get("/report", headers=TENANT)
    again = await client.get("/report", headers=TENANT)

    assert head.headers["x-fastapi-cache"] == "MISS"
    assert head.content == b""
    assert get.headers["x-fastapi-cache"] == "MISS"
    assert get.json() == {"title": "Quarterly", "rows": list(range(20))}
    assert again.headers["x-fastapi-cache"] == "HIT"
    assert head.headers["content-length"] == str(len(get.content))
    assert calls.count == 2
    # The GET's cache headers all the same (RFC 9110, 9.3.2): a proxy may freshen its copy of
    # the GET with them, so a tenant's answer must say private here too.
    for name in ("etag", "cache-control", "vary"):
        assert head.headers[name] == get.headers[name], name
    assert head.headers["cache-control"] == "private, no-cache"


async def test_a_headers_only_answer_to_head_is_never_served_to_a_get(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    app = make_identity_app()

    @app.api_route("/rows", methods=["GET", "HEAD"])
    @cache(namespace="rows", expire=60)
    async def rows(request: Request) -> Any:
        if request.method == "HEAD":  # headers only: counting the rows costs nothing
            return Response(headers={"X-Rows": "20"})
        return {"rows": list(range(20))}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        heads = [await client.head("/rows", headers=TENANT) for _ in range(2)]
        gets = [await client.get("/rows", headers=TENANT) for _ in range(2)]
        head_after_get = await client.head("/rows", headers=TENANT)

    assert [head.headers["x-rows"] for head in heads] == ["20", "20"]
    assert [get.json() for get in gets] == [{"rows": list(range(20))}] * 2
    assert [get.headers["x-fastapi-cache"] for get in gets] == ["MISS", "HIT"]
    assert head_after_get.headers["x-fastapi-cache"] == "HIT"
    assert head_after_get.headers["content-length"] == str(len(gets[0].content))


# -- Vary ------------------------------------------------------------------------------------

#: Answers that depend on a request header, and say so; each request, and what it must get.
VARYING: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "accept-language": (
        "Accept-Language",
        [("fr", "Bonjour"), ("en", "Hello"), ("fr", "Bonjour"), ("en", "Hello")],
    ),
    "a-session-of-one-user": (
        "X-Session",
        [("alice", "alice's report"), ("bob", "bob's report"), ("alice", "alice's report")],
    ),
    "two-headers": (
        "Accept-Language, X-Session",
        [("fr", "Bonjour"), ("en", "Hello")],
    ),
}


def varying_app(make_identity_app: Callable[[], FastAPI], vary: str, calls: Calls) -> FastAPI:
    app = make_identity_app()
    greetings = {"fr": "Bonjour", "en": "Hello"}

    @app.get("/varying")
    @cache(namespace="varying", expire=60)
    async def varying(request: Request) -> JSONResponse:
        calls.count += 1
        asked = request.headers.get("X-Asked", "")
        body = greetings.get(asked, f"{asked}'s report")
        return JSONResponse({"body": body}, headers={"Vary": vary})

    return app


@pytest.mark.parametrize("case", VARYING.values(), ids=list(VARYING))
async def test_an_answer_that_varies_on_a_request_header_is_never_served_to_another_value(
    backend: CacheSettings,
    make_identity_app: Callable[[], FastAPI],
    calls: Calls,
    case: tuple[str, list[tuple[str, str]]],
) -> None:
    vary, requests = case
    app = varying_app(make_identity_app, vary, calls)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answers = []
        for asked, _ in requests:
            # The value is sent under every header the answer varies on.
            headers = {name.strip(): asked for name in vary.split(",")}
            response = await client.get("/varying", headers={**TENANT, **headers, "X-Asked": asked})
            answers.append(response.json()["body"])

    assert answers == [expected for _, expected in requests]
    assert calls.count == len(requests)  # not stored: each answer is its own request's


# -- never stored ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status"),
    [("/missing", 404), ("/returned-404", 404)],
)
async def test_errors_are_never_cached(
    backend: CacheSettings, client: httpx.AsyncClient, calls: Calls, path: str, status: int
) -> None:
    first = await client.get(path, headers=TENANT)
    second = await client.get(path, headers=TENANT)

    assert (first.status_code, second.status_code) == (status, status)
    assert "x-fastapi-cache" not in second.headers or second.headers["x-fastapi-cache"] != "HIT"
    assert calls.count == 2


async def test_a_handler_exception_is_never_cached(
    backend: CacheSettings, app: FastAPI, calls: Calls
) -> None:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        statuses = [(await client.get("/crash", headers=TENANT)).status_code for _ in range(2)]

    assert statuses == [500, 500]
    assert calls.count == 2


@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("/cookie", "set a cookie"),
        ("/raw-cookie", "set a cookie"),
        ("/handler-cookie", "set a cookie"),
        ("/no-store", "Cache-Control: no-store"),
        ("/says-private", "Cache-Control: private"),
    ],
)
async def test_answers_that_set_cookies_or_forbid_storing_are_never_cached(
    backend: CacheSettings,
    client: httpx.AsyncClient,
    calls: Calls,
    path: str,
    said: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="commons.cache"):
        first = await client.get(path, headers=TENANT)
        second = await client.get(path, headers=TENANT)

    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    assert calls.count == 2
    # Computed by the handler with the cache taking part, though not stored: a MISS.
    assert [r.headers["x-fastapi-cache"] for r in (first, second)] == ["MISS", "MISS"]
    assert second.headers["cache-status"].endswith("fwd=miss")
    if "cookie" in path:
        assert second.cookies["session"] == "s3cret"
    # Every request runs the handler: said once, with why.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"GET {path}: nothing is stored" in warnings[0]
    assert said in warnings[0]


async def test_headers_set_by_a_dependency_are_sent_per_request_and_never_stored(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    async def request_id(request: Request, response: Response) -> None:
        response.headers["X-Request-Id"] = request.headers["X-Request-Id"]

    app = make_identity_app()

    @app.get("/traced", dependencies=[Depends(request_id)])
    @cache(namespace="traced")
    async def traced() -> dict[str, int]:
        return {"answer": 42}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        miss = await client.get("/traced", headers={**TENANT, "X-Request-Id": "first"})
        hit = await client.get("/traced", headers={**TENANT, "X-Request-Id": "second"})

    assert hit.headers["x-fastapi-cache"] == "HIT"
    assert (miss.headers["x-request-id"], hit.headers["x-request-id"]) == ("first", "second")
    assert hit.content == miss.content


# -- the client's own Cache-Control --------------------------------------------------------------


@pytest.mark.parametrize("directive", ["no-cache", "no-store", "max-age=0, no-cache"])
async def test_by_default_no_client_can_force_recomputation(
    backend: CacheSettings, client: httpx.AsyncClient, calls: Calls, directive: str
) -> None:
    await client.get("/report", headers=TENANT)

    response = await client.get("/report", headers={**TENANT, "Cache-Control": directive})

    assert response.headers["x-fastapi-cache"] == "HIT"
    assert calls.count == 1


@pytest.fixture
async def honouring(
    backend: CacheSettings, make_settings: Callable[..., CacheSettings]
) -> AsyncIterator[None]:
    await init_cache(make_settings(backend.REDIS_URL, CACHE_HONOR_CLIENT_NO_CACHE=True))
    try:
        yield
    finally:
        await close_cache()


@pytest.mark.parametrize("directive", ["no-cache", "no-store"])
async def test_honouring_clients_skips_the_stored_entry_and_stores_the_new_one(
    honouring: None, client: httpx.AsyncClient, calls: Calls, directive: str
) -> None:
    await client.get("/report", headers=TENANT)

    forced = await client.get("/report", headers={**TENANT, "Cache-Control": directive})
    plain = await client.get("/report", headers=TENANT)

    assert forced.headers["x-fastapi-cache"] == "MISS"
    assert plain.headers["x-fastapi-cache"] == "HIT"
    assert calls.count == 2


async def test_honoured_no_cache_requests_still_share_one_computation(
    honouring: None, make_identity_app: Callable[[], FastAPI]
) -> None:
    started = 0
    arrived = 0
    all_arrived, release = asyncio.Event(), asyncio.Event()

    async def count_arrival() -> None:
        nonlocal arrived
        arrived += 1
        if arrived == 10:
            all_arrived.set()

    app = make_identity_app()

    @app.get("/slow", dependencies=[Depends(count_arrival)])
    @cache(namespace="slow")
    async def slow() -> dict[str, int]:
        nonlocal started
        started += 1
        await release.wait()
        return {"value": 1}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        requests = [
            asyncio.create_task(
                client.get("/slow", headers={**TENANT, "Cache-Control": "no-cache"})
            )
            for _ in range(10)
        ]
        await asyncio.wait_for(all_arrived.wait(), 5)
        await asyncio.sleep(0.05)  # lets the last arrivals reach the handler's flight
        release.set()
        responses = await asyncio.gather(*requests)

    assert started == 1
    assert [r.json() for r in responses] == [{"value": 1}] * 10
