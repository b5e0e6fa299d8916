"""Whatever a handler returns, the HIT is byte for byte the MISS, and both are what FastAPI sends
without the cache: body, status, content type and headers, response_model filtering included."""

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
from pydantic import BaseModel
from redis.asyncio import Redis

from commons.cache import CacheSettings, cache, close_cache, init_cache

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
    cached, uncached = (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        for app in apps
    )
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


@pytest.fixture
async def on_redis(
    redis_url: str, make_settings: Callable[..., CacheSettings]
) -> AsyncIterator[CacheSettings]:
    settings = make_settings(redis_url)
    await init_cache(settings)
    try:
        yield settings
    finally:
        await close_cache()


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
