"""The HTTP rules of cached answers, which need no server: what may be stored, ETags and
conditional requests, the headers of a 304, and the Cache-Control a replay sends."""

from __future__ import annotations

import hashlib

import pytest
from starlette.responses import JSONResponse, Response, StreamingResponse

from commons.cache.entry import CachedResponse, decode_payload, encode_payload
from commons.cache.http import (
    NOT_MODIFIED_HEADERS,
    Served,
    asks_for_fresh,
    cache_status,
    cache_status_name,
    cacheable_response,
    entry_etag,
    etag_matches,
    prepare,
    replay,
)

BODY = b'{"total":20}'
ETAG = entry_etag(BODY)
HIT = Served(b"HIT", b"hit", b"svc", ttl=30, age=5)


def test_an_etag_is_the_quoted_first_128_bits_of_the_body_s_sha256() -> None:
    assert '"' + hashlib.sha256(BODY).hexdigest()[:32] + '"' == ETAG


@pytest.mark.parametrize(
    ("if_none_match", "matches"),
    [
        (None, False),
        ("", False),
        ("*", True),
        (" * ", True),
        (ETAG, True),
        (f"W/{ETAG}", True),
        (f'"other", {ETAG}', True),
        (f'"other",W/{ETAG}', True),
        ('"other"', False),
        (ETAG.strip('"'), False),
    ],
)
def test_if_none_match_is_compared_weakly_against_the_etag(
    if_none_match: str | None, matches: bool
) -> None:
    assert etag_matches(if_none_match, ETAG) is matches


@pytest.mark.parametrize(
    ("cache_control", "refuses"),
    [
        ("", False),
        ("max-age=0", False),
        ("no-cache", True),
        ("No-Store", True),
        ("max-age=0, no-cache", True),
        ("private", False),
    ],
)
def test_a_client_refuses_a_stored_answer_with_no_cache_or_no_store(
    cache_control: str, refuses: bool
) -> None:
    assert asks_for_fresh(cache_control) is refuses


def test_a_plain_2xx_answer_in_memory_is_stored_without_its_framing_headers() -> None:
    response = Response(b"<p>hi</p>", 203, {"x-total": "2"}, media_type="text/html")

    stored = cacheable_response(response)

    assert stored == CachedResponse(
        b"<p>hi</p>", 203, "text/html; charset=utf-8", (("x-total", "2"),)
    )


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(JSONResponse({"error": 1}, 500), id="a 5xx"),
        pytest.param(JSONResponse({}, 302), id="a redirect"),
        pytest.param(JSONResponse({}, headers={"set-cookie": "s=1"}), id="a cookie"),
        pytest.param(JSONResponse({}, headers={"vary": "Accept-Language"}), id="vary"),
        pytest.param(JSONResponse({}, headers={"cache-control": "private"}), id="private"),
        pytest.param(JSONResponse({}, headers={"cache-control": "no-store"}), id="no-store"),
        pytest.param(JSONResponse({}, headers={"Cache-Control": "No-Cache"}), id="no-cache"),
        pytest.param(StreamingResponse(iter([b"x"])), id="a stream"),
    ],
)
def test_an_answer_that_must_not_be_shared_is_never_stored(response: Response) -> None:
    assert cacheable_response(response) is None


def _with_raw(name: bytes, value: bytes) -> Response:
    response = JSONResponse({"n": 1})
    response.raw_headers.append((name, value))
    return response


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"Set-Cookie", b"session=alice-secret"),
        (b"SET-COOKIE", b"session=alice-secret"),
        (b"Vary", b"Accept-Language"),
        (b"Cache-Control", b"no-store"),
        (b"CACHE-CONTROL", b"Private"),
    ],
)
def test_a_header_appended_raw_in_any_case_is_read_as_the_same_header(
    name: bytes, value: bytes
) -> None:
    # Starlette's lookups match raw names in lower case only; a handler that copies another
    # response's headers (httpx keeps their case) appends them as they were spelled.
    assert cacheable_response(_with_raw(name, value)) is None


@pytest.mark.parametrize(
    "cache_control",
    ["x-no-store-hint", 'community="no-cache"', "max-age=60, x-private-ish", "no-cachex"],
)
def test_only_the_directives_themselves_forbid_storing(cache_control: str) -> None:
    stored = cacheable_response(JSONResponse({}, headers={"cache-control": cache_control}))
    assert stored is not None


@pytest.mark.parametrize(
    "cache_control",
    ["no-cache", "No-Store", "max-age=0, no-cache", 'private="x-y", max-age=5', " no-store "],
)
def test_an_answer_naming_no_store_no_cache_or_private_is_never_stored(cache_control: str) -> None:
    assert cacheable_response(JSONResponse({}, headers={"cache-control": cache_control})) is None


@pytest.mark.parametrize(
    "cache_control", ["no-cache", "No-Store", "max-age=0, no-cache", " no-store ", 'no-cache="x"']
)
def test_a_request_naming_no_cache_or_no_store_asks_for_a_fresh_answer(cache_control: str) -> None:
    assert asks_for_fresh(cache_control)


@pytest.mark.parametrize(
    "cache_control", ["x-no-store-hint", 'community="no-cache"', "max-age=0", "no-cachex"]
)
def test_a_request_without_those_directives_takes_the_stored_answer(cache_control: str) -> None:
    assert not asks_for_fresh(cache_control)


def test_an_answer_without_a_content_type_is_replayed_without_one() -> None:
    for response in (Response(status_code=204), Response(b"\x89PNG\r\n", 200)):
        stored = cacheable_response(response)
        assert stored is not None
        assert stored.media_type == ""
        decoded = decode_payload(*encode_payload(stored))
        assert decoded == stored
        answer = replay(
            prepare(stored, private=False), max_age=None, served=HIT, not_modified=False, head=False
        )
        assert b"content-type" not in [name for name, _ in answer.raw_headers]


def headers_of(response: Response) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in response.raw_headers}


def test_a_304_carries_only_the_headers_the_rfc_lists_and_the_cache_s_own() -> None:
    prepared = prepare(
        CachedResponse(BODY, headers=(("expires", "0"), ("x-total", "20"))), private=True
    )

    answer = replay(prepared, max_age=None, served=HIT, not_modified=True, head=False)

    assert (answer.status_code, answer.body) == (304, b"")
    assert headers_of(answer) == {
        "etag": ETAG,
        "vary": "Authorization",
        "expires": "0",
        "cache-control": "private, no-cache",
        "x-fastapi-cache": "HIT",
        "cache-status": "svc; hit; ttl=30",
        "age": "5",
    }
    assert {"etag", "vary", "expires", "cache-control"} <= NOT_MODIFIED_HEADERS
    assert "x-total" not in NOT_MODIFIED_HEADERS


def test_a_304_s_header_list_is_the_rfc_s() -> None:
    # RFC 9110, 15.4.5: the fields a 200 would have sent that a 304 must send too.
    assert {
        "cache-control",
        "content-location",
        "date",
        "etag",
        "expires",
        "vary",
    } == NOT_MODIFIED_HEADERS


@pytest.mark.parametrize(
    ("private", "max_age", "cache_control"),
    [
        (False, None, "no-cache"),
        (True, None, "private, no-cache"),
        (False, 60, "max-age=60"),
        (True, 60, "private, max-age=60"),
        (False, -3, "max-age=0"),
    ],
)
def test_the_cache_control_of_a_replay(
    private: bool, max_age: int | None, cache_control: str
) -> None:
    prepared = prepare(CachedResponse(BODY), private=private)
    stored_now = HIT._replace(age=None)

    answer = replay(prepared, max_age=max_age, served=stored_now, not_modified=False, head=False)

    assert headers_of(answer)["cache-control"] == cache_control


@pytest.mark.parametrize(("reuse", "age", "max_age"), [(60, 5, 65), (0, 48, 48), (-3, 7, 7)])
def test_max_age_counts_from_the_age_it_is_sent_with(reuse: int, age: int, max_age: int) -> None:
    # RFC 9111, 4.2.3-4.2.4: a client's copy is fresh while its age, the Age header included,
    # is below max-age: reuse for 60 s of an answer 5 s old is max-age=65.
    prepared = prepare(CachedResponse(BODY), private=False)

    for not_modified in (False, True):
        answer = replay(
            prepared,
            max_age=reuse,
            served=HIT._replace(age=age),
            not_modified=not_modified,
            head=False,
        )
        headers = headers_of(answer)
        assert (headers["cache-control"], headers["age"]) == (f"max-age={max_age}", str(age))


@pytest.mark.parametrize("private", [False, True])
def test_a_plain_json_answer_is_prepared_with_its_type_length_etag_and_vary_if_private(
    private: bool,
) -> None:
    vary = [(b"vary", b"Authorization")] if private else []

    prepared = prepare(CachedResponse(BODY), private=private)

    assert list(prepared.headers) == [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(BODY)).encode()),
        (b"etag", ETAG.encode()),
        *vary,
    ]
    assert list(prepared.not_modified_headers) == [(b"etag", ETAG.encode()), *vary]
    assert (prepared.body, prepared.status_code, prepared.etag) == (BODY, 200, ETAG)


def test_an_answer_with_headers_of_its_own_keeps_them_beside_the_cache_s() -> None:
    cached = CachedResponse(BODY, 200, "application/json", (("X-Total", "20"),))

    prepared = prepare(cached, private=True)

    assert list(prepared.headers) == [
        (b"x-total", b"20"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(BODY)).encode()),
        (b"etag", ETAG.encode()),
        (b"vary", b"Authorization"),
    ]
    assert not prepared.plain_json


def test_a_full_replay_sends_the_body_its_length_and_etag_and_a_head_only_the_headers() -> None:
    prepared = prepare(CachedResponse(BODY), private=False)

    get = replay(prepared, max_age=None, served=HIT, not_modified=False, head=False)
    head = replay(prepared, max_age=None, served=HIT, not_modified=False, head=True)

    assert (get.status_code, get.body) == (200, BODY)
    assert headers_of(get)["content-length"] == str(len(BODY))
    assert headers_of(get)["etag"] == ETAG
    assert "vary" not in headers_of(get)
    assert (head.status_code, head.body) == (200, b"")
    assert headers_of(head) == headers_of(get)


@pytest.mark.parametrize(
    ("prefix", "name"),
    [
        ("svc", b"svc"),
        ("svc:v2", b"svc:v2"),
        ("my cache", b'"my cache"'),
        ('say "hi"', b'"say \\"hi\\""'),
        ("caché", b"commons.cache"),
    ],
)
def test_the_cache_s_name_in_cache_status_is_its_prefix_as_a_token_or_a_string(
    prefix: str, name: bytes
) -> None:
    assert cache_status_name(prefix) == name


@pytest.mark.parametrize(
    ("served", "value"),
    [
        (HIT, b"svc; hit; ttl=30"),
        (Served(b"MISS", b"fwd=miss; stored", b"svc"), b"svc; fwd=miss; stored"),
        (Served(b"STALE", b"hit", b"svc", ttl=-4), b"svc; hit; ttl=-4"),
    ],
)
def test_cache_status_says_how_an_answer_was_served(served: Served, value: bytes) -> None:
    assert cache_status(served) == value
