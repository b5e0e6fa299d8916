"""The stored format's rules, which need no server: values encoded, decoded, and refused (garbage,
older shapes, another route version or generation), the headers an envelope may replay, and the
route fingerprint."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel

from commons.cache.entry import (
    BODY,
    ENVELOPE,
    CachedResponse,
    RejectReason,
    ValidatedValues,
    decode_payload,
    encode_payload,
    expected_head,
    parse_value,
    rejection_reason,
    route_fingerprint,
    stored_value,
)


def envelope_with(headers: list[list[str]]) -> bytes:
    return json.dumps(
        {"status": 200, "media_type": "text/plain", "headers": headers, "body": "hello"}
    ).encode()


@pytest.mark.parametrize(
    "name",
    ["x bad", "x-bad:", "", "x\tbad", "x(bad)", "x/bad", "é"],
)
def test_an_envelope_whose_header_name_is_no_http_token_is_refused(name: str) -> None:
    assert decode_payload(ENVELOPE, envelope_with([[name, "1"]])) is None


@pytest.mark.parametrize(
    "value", ["a\x01b", "a\x7fb", "a\rb", "a\nb", "a\x00b", " leading", "trailing\t"]
)
def test_an_envelope_whose_header_value_holds_a_control_character_is_refused(value: str) -> None:
    assert decode_payload(ENVELOPE, envelope_with([["x-value", value]])) is None


@pytest.mark.parametrize(
    "name", ["content-length", "Content-Length", "transfer-encoding", "connection", "content-type"]
)
def test_framing_headers_are_never_replayed_from_storage(name: str) -> None:
    decoded = decode_payload(ENVELOPE, envelope_with([[name, "7"], ["x-kept", "yes"]]))

    assert decoded == CachedResponse(b"hello", 200, "text/plain", (("x-kept", "yes"),))


def test_ordinary_headers_survive_the_round_trip() -> None:
    response = CachedResponse(
        b"hello",
        201,
        "text/plain; charset=utf-8",
        (("x-total", "20"), ("link", '</p2>; rel="next"')),
    )

    assert decode_payload(*encode_payload(response)) == response


@pytest.mark.parametrize("vary", ["Accept-Language", "*", "X-Session, Accept"])
def test_an_envelope_that_says_vary_is_refused_as_an_older_deploy_stored_it(vary: str) -> None:
    assert decode_payload(ENVELOPE, envelope_with([["Vary", vary]])) is None


@pytest.mark.parametrize("name", ["set-cookie", "Set-Cookie", "SET-COOKIE"])
def test_an_envelope_that_sets_a_cookie_is_refused_whoever_stored_it(name: str) -> None:
    # This version never stores one; a cookie under a shared key would go to every reader.
    assert decode_payload(ENVELOPE, envelope_with([[name, "session=alice"]])) is None


# -- the stored format: encoded, decoded, refused -----------------------------------------------

FINGERPRINT = b"0123456789abcdef"
GENERATION = b"7"
HEAD = expected_head(FINGERPRINT, GENERATION)


def test_a_stored_value_is_one_json_array_with_the_format_marker() -> None:
    raw = stored_value(head=HEAD, kind=BODY, stale_seconds=5, lifetime=65, payload=b'{"a":1}')

    assert json.loads(raw) == [
        "commons.cache",
        3,
        "0123456789abcdef",
        "7",
        "b",
        5,
        65,
        {"a": 1},
    ]


@pytest.mark.parametrize(
    ("kind", "payload", "stale_seconds", "lifetime"),
    [
        (BODY, b'{"a":1}', 0, 60),
        (BODY, b"[]", 30, 90),
        (ENVELOPE, b'{"status":201,"media_type":"text/plain","headers":[],"body":"x"}', 0, 1),
    ],
)
def test_a_stored_value_parses_back_to_what_was_written(
    kind: bytes, payload: bytes, stale_seconds: int, lifetime: int
) -> None:
    raw = stored_value(
        head=HEAD, kind=kind, stale_seconds=stale_seconds, lifetime=lifetime, payload=payload
    )

    parsed = parse_value(raw, HEAD)

    assert parsed is not None
    assert (parsed.kind, parsed.payload, parsed.stale_seconds, parsed.lifetime) == (
        kind,
        payload,
        stale_seconds,
        lifetime,
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(b"", RejectReason.FORMAT, id="empty"),
        pytest.param(b"not json at all", RejectReason.FORMAT, id="garbage"),
        pytest.param(b'{"a":1}', RejectReason.FORMAT, id="another library's JSON"),
        pytest.param(b"\x80\x04\x95pickle", RejectReason.FORMAT, id="a pickle"),
        pytest.param(
            b'["commons.cache",1,"0123456789abcdef","7","b",0,{"a":1}]',
            RejectReason.FORMAT,
            id="an older format",
        ),
        pytest.param(
            b'["commons.cache",3,"0123456789abcdef","7","x",0,60,{"a":1}]',
            RejectReason.FORMAT,
            id="an unknown kind",
        ),
        pytest.param(
            b'["commons.cache",3,"0123456789abcdef","7","b",0,60,{"a":1}',
            RejectReason.FORMAT,
            id="cut short",
        ),
        pytest.param(
            b'["commons.cache",3,"fedcba9876543210","7","b",0,60,{"a":1}]',
            RejectReason.FINGERPRINT,
            id="another version of the route",
        ),
        pytest.param(
            b'["commons.cache",3,"0123456789abcdef","6","b",0,60,{"a":1}]',
            None,
            id="an invalidated generation (a silent miss)",
        ),
    ],
)
def test_a_value_that_is_not_one_of_ours_now_is_refused_and_says_why(
    raw: bytes, reason: str | None
) -> None:
    assert parse_value(raw, HEAD) is None
    assert rejection_reason(raw, FINGERPRINT) == reason


def test_the_previous_shape_is_still_read_without_a_lifetime() -> None:
    raw = b'["commons.cache",2,"0123456789abcdef","7","b",4,{"a":1}]'

    parsed = parse_value(raw, HEAD)

    assert parsed is not None
    assert (parsed.kind, parsed.payload, parsed.stale_seconds, parsed.lifetime) == (
        BODY,
        b'{"a":1}',
        4,
        None,
    )


def test_the_previous_shape_of_another_generation_is_refused() -> None:
    assert parse_value(b'["commons.cache",2,"0123456789abcdef","6","b",4,{"a":1}]', HEAD) is None


def test_validated_values_serve_equal_bytes_and_refuse_another_fingerprint_or_generation() -> None:
    raw = stored_value(head=HEAD, kind=BODY, stale_seconds=0, lifetime=60, payload=b'{"a":1}')
    values = ValidatedValues()

    first = values.validated("k", raw, FINGERPRINT, GENERATION)
    # Bytes read from Redis again are another object with the same contents.
    again = values.validated("k", bytes(bytearray(raw)), FINGERPRINT, GENERATION)

    assert first is not None
    assert again == first
    assert values.validated("k", raw, b"fedcba9876543210", GENERATION) is None
    assert values.validated("k", raw, FINGERPRINT, b"8") is None


@pytest.mark.parametrize(
    "response",
    [
        CachedResponse(b'{"a":1}'),
        CachedResponse(b"<p>hi</p>", 200, "text/html; charset=utf-8"),
        CachedResponse(b"\x89PNG\r\n", 203, "image/png", (("x-frame", "1"),)),
    ],
)
def test_every_storable_response_survives_encoding_and_decoding(response: CachedResponse) -> None:
    assert decode_payload(*encode_payload(response)) == response


def test_a_plain_json_answer_is_stored_as_its_body_itself() -> None:
    assert encode_payload(CachedResponse(b'{"a":1}')) == (BODY, b'{"a":1}')


@pytest.mark.parametrize(
    "envelope",
    [
        pytest.param(b"[1,2]", id="not an object"),
        pytest.param(b'{"status":500,"media_type":"a/b","headers":[],"body":""}', id="a 5xx"),
        pytest.param(b'{"status":"200","media_type":"a/b","headers":[],"body":""}', id="text"),
        pytest.param(b'{"status":200,"media_type":"a/b","headers":{},"body":""}', id="headers"),
        pytest.param(b'{"status":200,"media_type":"a/b","headers":[],"body":1}', id="body"),
        pytest.param(b'{"status":200,"media_type":"a/b","headers":[]}', id="no body"),
        pytest.param(
            b'{"status":200,"media_type":"a/b","headers":[],"body_base64":"%%"}', id="base64"
        ),
        pytest.param(b'{"status":200,"media_type":"a/b","headers":[],"body":NaN}', id="NaN"),
    ],
)
def test_an_envelope_this_cache_cannot_have_written_is_refused(envelope: bytes) -> None:
    assert decode_payload(ENVELOPE, envelope) is None


# -- the route fingerprint ----------------------------------------------------------------------


class Item(BaseModel):
    id: int


class ItemV2(BaseModel):
    id: int
    name: str


def route_of(app: FastAPI, path: str) -> APIRoute:
    return next(r for r in app.routes if isinstance(r, APIRoute) and r.path == path)


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1", response_model=Item)
    async def v1() -> dict[str, int]:
        return {"id": 1}

    @app.get("/v1-again", response_model=Item)
    async def v1_again() -> dict[str, int]:
        return {"id": 1}

    @app.get("/v2", response_model=ItemV2)
    async def v2() -> dict[str, int]:
        return {"id": 1}

    @app.get("/created", response_model=Item, status_code=201)
    async def created() -> dict[str, int]:
        return {"id": 1}

    return app


def fingerprint_of(app: FastAPI, path: str, producer: str = "commons.cache") -> bytes:
    route = route_of(app, path)
    return route_fingerprint(route, route.endpoint, producer=producer)


def test_a_fingerprint_is_sixteen_hex_digits_the_same_in_every_process() -> None:
    # Computed from names and schemas only: two apps built apart agree on it.
    first, second = fingerprint_of(make_app(), "/v1"), fingerprint_of(make_app(), "/v1")

    assert first == second
    assert len(first) == 16
    assert all(c in b"0123456789abcdef" for c in first)


@pytest.mark.parametrize(
    ("path", "producer"),
    [
        pytest.param("/v2", "commons.cache", id="another response model"),
        pytest.param("/created", "commons.cache", id="another status code"),
        pytest.param("/v1", "fastapi-cache2", id="the other decorator"),
    ],
)
def test_what_changes_the_rendering_changes_the_fingerprint(path: str, producer: str) -> None:
    app = make_app()

    assert fingerprint_of(app, path, producer) != fingerprint_of(app, "/v1")
