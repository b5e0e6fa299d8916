"""The stored format's rules that need no server: which stored headers an envelope may replay."""

from __future__ import annotations

import json

import pytest

from commons.cache.entry import ENVELOPE, CachedResponse, decode_payload, encode_payload


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
