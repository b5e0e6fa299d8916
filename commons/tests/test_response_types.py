"""Whatever a handler returns, the HIT is byte for byte the MISS, and both are what FastAPI sends
without the cache: body, status, content type and headers, response_model filtering included.

What Redis holds never breaks a request, and never becomes an answer unless the cache wrote it.

Redis is shared: another service, an operator or an older deploy of the same route can leave
any bytes under an entry's key. A value that the cache did not write (no format marker, or
unreadable), or that another version of the route wrote (a different response model), is a
miss: the handler answers, its answer replaces the value, and the rejection is reported through
``CacheEvents.rejected_entry(namespace, reason)``. This holds for ``commons.cache.cache`` and for
the guide's ``fastapi_cache.decorator.cache`` with ``tenant_cache_key_builder``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi_cache.decorator import cache as guide_cache
from pydantic import BaseModel
from redis.asyncio import Redis

from commons.cache import (
    CacheEvents,
    CacheSettings,
    cache,
    close_cache,
    init_cache,
    tenant_cache_key_builder,
)
from commons.cache.entry import ENVELOPE, expected_head, parse_any, stored_value
from commons.testing.redis_server import RedisServer
from commons.testing.service_process import ServiceProcess

from _support import client_for

TENANT = {"X-Test-Tenant": "acme"}


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Invoice(BaseModel):
    id: uuid.UUID
    issued: datetime
    due: date
    total: Decimal
    colour: Colour
    lines: list[str]


@dataclasses.dataclass
class Point:
    x: int
    label: str
    when: datetime


class PublicUser(BaseModel):
    name: str


class StoredUser(PublicUser):
    password_hash: str


INVOICE = Invoice(
    id=uuid.UUID("12345678-1234-5678-1234-567812345678"),
    issued=datetime(2024, 5, 17, 9, 30, tzinfo=UTC),
    due=date(2024, 6, 1),
    total=Decimal("1234.50"),
    colour=Colour.BLUE,
    lines=["Beratung", "Kaffee ☕"],
)
RAW_DICT = {
    "id": INVOICE.id,
    "when": INVOICE.issued,
    "amount": Decimal("10.25"),
    "colour": Colour.RED,
    "text": "naïve ünïcode",
}


def plain_dict() -> dict[str, Any]:
    return dict(RAW_DICT)


def a_list() -> list[Invoice]:
    return [INVOICE, INVOICE.model_copy(update={"colour": Colour.RED})]


def a_dataclass() -> Point:
    return Point(x=3, label="p", when=INVOICE.issued)


def json_response() -> JSONResponse:
    return JSONResponse({"a": [1, 2.5, None], "é": "ü"})


def created() -> JSONResponse:
    return JSONResponse({"created": True}, status_code=201, headers={"Location": "/things/1"})


def plain_text() -> PlainTextResponse:
    return PlainTextResponse("just text\n", headers={"X-Custom": "kept"})


def html() -> HTMLResponse:
    return HTMLResponse("<h1>Über</h1>", headers={"Content-Language": "de"})


def custom_media_type() -> Response:
    return Response(b"\x00\x01\xffbinary", media_type="application/octet-stream")


# (name, producer, return annotation)
KINDS: list[tuple[str, Callable[[], Any], Any]] = [
    ("pydantic-model", lambda: INVOICE, Invoice),
    ("dict", plain_dict, dict[str, Any]),
    ("unannotated-dict", plain_dict, None),
    ("list-of-models", a_list, list[Invoice]),
    ("dataclass", a_dataclass, Point),
    ("json-response", json_response, JSONResponse),
    ("custom-status-and-headers", created, JSONResponse),
    ("plain-text", plain_text, PlainTextResponse),
    ("html", html, HTMLResponse),
    ("binary", custom_media_type, Response),
]


def make_handler(produce: Callable[[], Any], annotation: Any) -> Callable[..., Any]:
    async def handler() -> Any:
        return produce()

    handler.__annotations__["return"] = annotation
    return handler


def add_routes(app: FastAPI, *, cached: bool) -> None:
    for name, produce, annotation in KINDS:
        handler = make_handler(produce, annotation)
        if cached:
            handler = cache(namespace=name.replace("-", "_"))(handler)
        app.get(f"/{name}")(handler)


@pytest.fixture
def apps(make_identity_app: Callable[[], FastAPI]) -> tuple[FastAPI, FastAPI]:
    cached, uncached = make_identity_app(), make_identity_app()
    add_routes(cached, cached=True)
    add_routes(uncached, cached=False)
    return cached, uncached


@pytest.fixture
async def clients(
    apps: tuple[FastAPI, FastAPI],
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    cached, uncached = (client_for(app) for app in apps)
    async with cached, uncached:
        yield cached, uncached


def without_cache_headers(response: httpx.Response) -> dict[str, str]:
    skipped = {"x-fastapi-cache", "etag", "cache-control", "vary", "cache-status", "age"}
    return {k: v for k, v in response.headers.items() if k not in skipped}


@pytest.mark.parametrize("kind", [kind[0] for kind in KINDS])
async def test_the_hit_is_byte_for_byte_the_miss_and_the_uncached_answer(
    backend: CacheSettings,
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
    kind: str,
) -> None:
    cached, uncached = clients
    reference = await uncached.get(f"/{kind}", headers=TENANT)
    miss = await cached.get(f"/{kind}", headers=TENANT)
    hit = await cached.get(f"/{kind}", headers=TENANT)

    assert (miss.headers["x-fastapi-cache"], hit.headers["x-fastapi-cache"]) == ("MISS", "HIT")
    for response in (miss, hit):
        assert response.status_code == reference.status_code
        assert response.content == reference.content
        assert without_cache_headers(response) == without_cache_headers(reference)


async def test_datetime_decimal_uuid_and_enum_survive_as_fastapi_renders_them(
    backend: CacheSettings, clients: tuple[httpx.AsyncClient, httpx.AsyncClient]
) -> None:
    cached, _ = clients
    await cached.get("/pydantic-model", headers=TENANT)

    hit = await cached.get("/pydantic-model", headers=TENANT)

    assert hit.headers["x-fastapi-cache"] == "HIT"
    assert Invoice.model_validate_json(hit.content) == INVOICE


async def test_custom_status_and_headers_are_replayed_on_a_hit(
    backend: CacheSettings, clients: tuple[httpx.AsyncClient, httpx.AsyncClient]
) -> None:
    cached, _ = clients
    await cached.get("/custom-status-and-headers", headers=TENANT)

    hit = await cached.get("/custom-status-and-headers", headers=TENANT)

    assert hit.headers["x-fastapi-cache"] == "HIT"
    assert hit.status_code == 201
    assert hit.headers["location"] == "/things/1"
    assert hit.json() == {"created": True}


async def test_stored_values_are_json_never_pickle(
    on_redis: CacheSettings, clients: tuple[httpx.AsyncClient, httpx.AsyncClient]
) -> None:
    cached, _ = clients
    for name, _, _ in KINDS:
        await cached.get(f"/{name}", headers=TENANT)

    assert on_redis.REDIS_URL is not None
    client = Redis.from_url(on_redis.REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match="test-cache:*:tenant_acme:*")]
        values = [await client.get(key) for key in keys]
    finally:
        await client.aclose()

    assert len(values) == len(KINDS)
    for value in values:
        json.loads(value)


# -- response_model filtering -------------------------------------------------------------------


@pytest.fixture
async def user_client(
    make_identity_app: Callable[[], FastAPI],
) -> AsyncIterator[httpx.AsyncClient]:
    app = make_identity_app()
    stored = StoredUser(name="Ada", password_hash="pbkdf2$secret")

    @app.get("/annotated")
    @cache(namespace="users")
    async def annotated() -> PublicUser:
        return stored

    @app.get("/declared", response_model=PublicUser)
    @cache(namespace="users")
    async def declared() -> Any:
        return stored

    @app.get("/as-dict", response_model=PublicUser)
    @cache(namespace="users")
    async def as_dict() -> Any:
        return stored.model_dump()

    @app.get("/status", status_code=203, response_class=HTMLResponse)
    @cache(namespace="users")
    async def status() -> str:
        return "<p>non-authoritative</p>"

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        yield client


@pytest.mark.parametrize("path", ["/annotated", "/declared", "/as-dict"])
async def test_fields_outside_the_response_model_never_leak_on_miss_or_hit(
    backend: CacheSettings, user_client: httpx.AsyncClient, path: str
) -> None:
    miss = await user_client.get(path, headers=TENANT)
    hit = await user_client.get(path, headers=TENANT)

    assert hit.headers["x-fastapi-cache"] == "HIT"
    for response in (miss, hit):
        assert response.json() == {"name": "Ada"}
        assert b"secret" not in response.content


async def test_the_route_s_status_code_and_response_class_are_kept(
    backend: CacheSettings, user_client: httpx.AsyncClient
) -> None:
    miss = await user_client.get("/status", headers=TENANT)
    hit = await user_client.get("/status", headers=TENANT)

    assert hit.headers["x-fastapi-cache"] == "HIT"
    for response in (miss, hit):
        assert response.status_code == 203
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.text == "<p>non-authoritative</p>"


async def test_headers_and_status_the_handler_sets_on_fastapi_s_response_are_stored(
    backend: CacheSettings, make_identity_app: Callable[[], FastAPI]
) -> None:
    app = make_identity_app()

    @app.get("/accepted")
    @cache(namespace="accepted")
    async def accepted(response: Response) -> dict[str, str]:
        response.headers["X-Build"] = "7"
        response.status_code = 202
        return {"state": "queued"}

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        miss = await client.get("/accepted", headers=TENANT)
        hit = await client.get("/accepted", headers=TENANT)

    assert hit.headers["x-fastapi-cache"] == "HIT"
    for response in (miss, hit):
        assert response.status_code == 202
        assert response.headers["x-build"] == "7"
        assert response.json() == {"state": "queued"}


# -- what Redis holds never becomes an answer unless the cache wrote it ----------------------------


ACME = {"X-Test-Tenant": "acme"}
NAMESPACE = "items"
DECORATORS = ["commons_cache", "guide_cache"]


def envelope(**fields: str) -> bytes:
    """Today's envelope (``entry.py``) with some of its fields replaced by raw JSON text."""
    values = {
        "status": "200",
        "media_type": '"application/json"',
        "headers": "[]",
        "body": '"{\\"name\\":\\"forged\\"}"',
        **fields,
    }
    inner = ",".join(f'"{name}":{value}' for name, value in values.items())
    return ('{"__commons_cache__":1,' + inner + "}").encode()


#: Values the cache did not write, planted under an entry's key.
FORGED: dict[str, bytes] = {
    "binary-garbage": b"\x00\xffgarbage",
    "other-json-object": b'{"a": 1}',
    "fastapi-cache2-spec-type": b'{"_spec_type": "x"}',
    "envelope-with-a-numeric-body": envelope(body="1"),
    "envelope-with-an-infinite-status": envelope(status="1e400"),
    "envelope-with-status-99": envelope(status="99"),
    "envelope-with-a-non-latin-1-header": envelope(headers='[["x-forged","€"]]'),
    "valid-json-of-the-routes-shape": b'{"name": "forged"}',
}


class RecordingEvents(CacheEvents):
    """Records the entries the cache rejected."""

    def __init__(self) -> None:
        self.rejected: list[tuple[str, str]] = []

    def rejected_entry(self, namespace: str, reason: str) -> None:
        self.rejected.append((namespace, reason))


@pytest.fixture
async def events(
    redis_url: str, make_settings: Callable[..., CacheSettings]
) -> AsyncIterator[RecordingEvents]:
    """The cache on Redis, reporting to a :class:`RecordingEvents`."""
    recorder = RecordingEvents()
    await init_cache(make_settings(redis_url), events=recorder)
    try:
        yield recorder
    finally:
        await close_cache()


async def only_entry_key(raw_redis: Redis) -> bytes:
    """The one entry key in Redis (helper keys, such as indexes, hold a ``#`` segment)."""
    entries = [key async for key in raw_redis.scan_iter(count=1000) if b":#" not in key]
    assert len(entries) == 1, entries
    return entries[0]


def cached_by(decorator: str) -> Callable[[Any], Any]:
    if decorator == "commons_cache":
        return cache(namespace=NAMESPACE)
    return guide_cache(namespace=NAMESPACE, key_builder=tenant_cache_key_builder)


def summary(response: httpx.Response) -> tuple[int, str | None, bytes]:
    return response.status_code, response.headers.get("X-FastAPI-Cache"), response.content


# -- values the cache did not write --------------------------------------------------------------


class Item(BaseModel):
    name: str


def build_item_app(make_identity_app: Callable[[], FastAPI], decorator: str) -> FastAPI:
    app = make_identity_app()

    @app.get("/item")
    @cached_by(decorator)
    async def get_item() -> Item:
        return Item(name="real")

    return app


@pytest.mark.parametrize("decorator", DECORATORS)
@pytest.mark.parametrize("forged", FORGED.values(), ids=list(FORGED))
async def test_a_value_the_cache_did_not_write_is_a_miss_and_is_replaced(
    events: RecordingEvents,
    raw_redis: Redis,
    make_identity_app: Callable[[], FastAPI],
    decorator: str,
    forged: bytes,
) -> None:
    """Bytes planted under an entry's key are never sent and never break the request: the next
    GET is the handler's answer (a MISS), which replaces them (the GET after is a HIT), and the
    rejection is reported once as a ``format`` problem."""
    app = build_item_app(make_identity_app, decorator)
    real = b'{"name":"real"}'

    async with client_for(app, raise_app_exceptions=False) as client:
        filled = await client.get("/item", headers=ACME)
        key = await only_entry_key(raw_redis)
        assert await raw_redis.set(key, forged, keepttl=True)
        after_forgery = await client.get("/item", headers=ACME)
        next_one = await client.get("/item", headers=ACME)

    assert summary(filled) == (200, "MISS", real)
    assert summary(after_forgery) == (200, "MISS", real)
    assert summary(next_one) == (200, "HIT", real)
    assert events.rejected == [(NAMESPACE, "format")]


# -- a deploy that changes the response model ----------------------------------------------------


class ItemV1(BaseModel):
    name: str


class ItemV2(BaseModel):
    name: str
    region: str


def build_versioned_app(
    make_identity_app: Callable[[], FastAPI], decorator: str, model: type[BaseModel]
) -> FastAPI:
    """The same route, module and function in two deploys; only the response model differs."""
    app = make_identity_app()
    fields = {"name": "widget", "region": "eu-west-1"}

    @app.get("/item", response_model=model)
    @cached_by(decorator)
    async def get_item() -> Any:
        return model(
            **{name: value for name, value in fields.items() if name in model.model_fields}
        )

    return app


@pytest.mark.parametrize("decorator", DECORATORS)
async def test_a_new_response_model_never_reads_the_old_deploys_entries(
    events: RecordingEvents, make_identity_app: Callable[[], FastAPI], decorator: str
) -> None:
    """v2 (which adds a required field) and v1 share Redis, a namespace and a path: each version
    misses on the other's entry and answers in its own shape, never a 500 or the other's body."""
    v1 = build_versioned_app(make_identity_app, decorator, ItemV1)
    v2 = build_versioned_app(make_identity_app, decorator, ItemV2)
    v1_body = b'{"name":"widget"}'
    v2_body = b'{"name":"widget","region":"eu-west-1"}'

    async with (
        client_for(v1, raise_app_exceptions=False) as v1_client,
        client_for(v2, raise_app_exceptions=False) as v2_client,
    ):
        v1_miss = await v1_client.get("/item", headers=ACME)
        v1_hit = await v1_client.get("/item", headers=ACME)
        v2_first = await v2_client.get("/item", headers=ACME)
        rejected_by_v2 = list(events.rejected)
        v1_after_v2 = await v1_client.get("/item", headers=ACME)

    assert summary(v1_miss) == (200, "MISS", v1_body)
    assert summary(v1_hit) == (200, "HIT", v1_body)
    assert summary(v2_first) == (200, "MISS", v2_body)
    assert summary(v1_after_v2) == (200, "MISS", v1_body)
    assert rejected_by_v2 == [(NAMESPACE, "fingerprint")]
    assert events.rejected == [(NAMESPACE, "fingerprint")] * 2


# -- stored headers a server cannot send ---------------------------------------------------------

#: Envelopes in today's format whose headers would break the response if replayed as they are.
HOSTILE_HEADERS: dict[str, list[list[str]]] = {
    "a-name-that-is-no-token": [["x bad", "1"]],
    "a-name-with-a-colon": [["x-bad:", "1"]],
    "an-empty-name": [["", "1"]],
    "a-value-with-a-control-character": [["x-forged", "a\x01b"]],
    "a-value-with-a-delete": [["x-forged", "a\x7fb"]],
    "a-content-length-that-is-no-number": [["content-length", "abc"]],
    "a-content-length-that-lies": [["content-length", "3"]],
    "a-transfer-encoding": [["transfer-encoding", "chunked"]],
}


@pytest.fixture(scope="module")
def replica(
    redis_server: RedisServer,
    module_replica_processes: Callable[..., ServiceProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    """One uvicorn process serving ``replica_app`` (``GET /res``, namespace ``res``) on the
    session's Redis, shared by the module's tests: each test empties Redis (``redis_url``) and
    asks as a tenant of its own, so none meets what another left in the process."""
    database = tmp_path_factory.mktemp("hostile") / "replica.sqlite"
    process = module_replica_processes(
        REDIS_URL=redis_server.url,
        CACHE_PREFIX="hostile",
        REPLICA_DB=str(database),
        REPLICA_READ_SECONDS="0",
    )
    return process.start().url


async def plant_envelope(raw_redis: Redis, key: bytes, headers: list[list[str]]) -> None:
    """Rewrites the entry under ``key`` as a well-formed envelope of the same route and generation
    with the same body and ``headers``, as a writable Redis could hold it."""
    stored = await raw_redis.get(key)
    assert stored is not None
    parsed = parse_any(stored)
    assert parsed is not None
    fingerprint, generation, value = parsed
    payload = json.dumps(
        {
            "status": 200,
            "media_type": "application/json",
            "headers": headers,
            "body": value.payload.decode(),
        }
    ).encode()
    head = expected_head(fingerprint, generation)
    planted = stored_value(head=head, kind=ENVELOPE, stale_seconds=0, lifetime=60, payload=payload)
    assert await raw_redis.set(key, planted, keepttl=True)


@pytest.mark.slow
@pytest.mark.parametrize("headers", HOSTILE_HEADERS.values(), ids=list(HOSTILE_HEADERS))
async def test_stored_headers_a_server_cannot_send_never_break_the_answer(
    replica: str, raw_redis: Redis, headers: list[list[str]]
) -> None:
    """Through a real server (uvicorn): the answer is the route's body with its true length,
    whether the envelope is refused (a miss) or served without the framing headers."""
    tenant = {"X-Test-Tenant": f"acme-{uuid.uuid4().hex[:12]}"}
    async with httpx.AsyncClient(base_url=replica, timeout=10) as client:
        first = await client.get("/res", headers=tenant)
        await plant_envelope(raw_redis, await only_entry_key(raw_redis), headers)
        after = [await client.get("/res", headers=tenant) for _ in range(3)]

    assert first.json() == {"version": 1}
    for response in after:
        assert response.status_code == 200
        assert response.json() == {"version": 1}
        assert response.headers["content-length"] == str(len(response.content))
        assert "transfer-encoding" not in response.headers
        assert "x-forged" not in response.headers
