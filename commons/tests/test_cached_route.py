"""A route's prepared responses: reused while the stored bytes are the same, and light to keep."""

from __future__ import annotations

import gc
from typing import Any

import pytest

from commons.cache import cached_route
from commons.cache.cached_route import PreparedResponses
from commons.cache.entry import (
    BODY,
    ENVELOPE,
    CachedResponse,
    encode_payload,
    expected_head,
    parse_value,
    stored_value,
)
from commons.cache.memo import HOT_REVIEW_EVERY, HOT_SMALL_ENTRIES, BoundedMemo
from commons.cache.scope import CacheScope, ScopedKey

from _support import walked_containers

HEAD = expected_head(b"route-v1", b"1")


def stored(body: bytes) -> bytes:
    """``body`` as the fill stores it: a plain body, fresh for a minute."""
    return stored_value(head=HEAD, kind=BODY, stale_seconds=0, lifetime=60, payload=body)


def prepared_body(responses: PreparedResponses, key: str, raw: bytes) -> bytes:
    value = parse_value(raw, HEAD)
    assert value is not None
    prepared = responses.get(key, value, private=False)
    assert prepared is not None
    return prepared.body


def test_a_response_prepared_long_ago_is_replayed_with_its_body_and_etag() -> None:
    responses = PreparedResponses()
    raw = stored(b'{"v":1}')
    value = parse_value(raw, HEAD)
    assert value is not None
    first = responses.get("/remembered", value, private=False)
    for n in range(3_000):  # more than the responses kept as objects
        prepared_body(responses, f"/others/{n}", stored(b'{"n":%d}' % n))

    again = responses.get("/remembered", value, private=False)

    assert first is not None
    assert again is not None
    assert (again.body, again.etag, again.headers) == (first.body, first.etag, first.headers)


@pytest.mark.parametrize("private", [False, True])
@pytest.mark.parametrize(
    "raw",
    [
        stored(b'{"v":1}'),
        stored_value(
            head=HEAD,
            kind=ENVELOPE,
            stale_seconds=0,
            lifetime=60,
            payload=encode_payload(CachedResponse(b"v1", 203, "text/plain", (("X-V", "1"),)))[1],
        ),
    ],
    ids=["plain json", "envelope"],
)
def test_a_response_rebuilt_from_what_is_remembered_is_the_one_first_prepared(
    raw: bytes, private: bool
) -> None:
    responses = PreparedResponses()
    value = parse_value(raw, HEAD)
    assert value is not None
    first = responses.get("/remembered", value, private=private)
    cached_route._hot_prepared.clear()  # only what the memo remembers is left

    again = responses.get("/remembered", value, private=private)

    assert first is not None
    assert again is not None
    assert again is not first
    assert (again.body, again.status_code, again.etag, again.private) == (
        first.body,
        first.status_code,
        first.etag,
        private,
    )
    assert (again.headers, again.not_modified_headers) == (
        first.headers,
        first.not_modified_headers,
    )


def test_a_changed_stored_value_is_prepared_anew() -> None:
    responses = PreparedResponses()
    assert prepared_body(responses, "/item", stored(b'{"v":1}')) == b'{"v":1}'

    assert prepared_body(responses, "/item", stored(b'{"v":2}')) == b'{"v":2}'


@pytest.fixture(autouse=True)
def fresh_prepared_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prepared answers are the process's, all routes together: a memo of their own for each
    test, whatever earlier tests prepared (a dict an earlier test left tracked by the collector
    stays so until a full collection, which the test of young collections must not depend on)."""
    fresh = BoundedMemo[str, Any](
        cached_route._PREPARED_MAX_ENTRIES,
        cached_route._prepared_memo.max_bytes,
        admit_seen_twice=True,
    )
    monkeypatch.setattr(cached_route, "_prepared_memo", fresh)


@pytest.fixture
def fresh_hot_objects() -> None:
    """The prepared answers kept as objects are the process's: start them over, whatever earlier
    tests read (their size depends on them)."""
    cached_route._hot_prepared.clear()


@pytest.mark.usefixtures("fresh_hot_objects")
def test_prepared_responses_are_not_walked_by_the_garbage_collector() -> None:
    # A full collection walks every object the collector tracks: a prepared response object
    # kept per key made each one take 100-450 ms over 100k keys. Over a working set larger than
    # the objects kept, only the most recent few stay objects: remembering many more adds next to
    # nothing.
    # Each key an object that knows its scope, built for its request: a memo keyed by it would
    # keep it (and its scope) alive.
    responses = PreparedResponses()
    count = 2_000 + 3 * HOT_REVIEW_EVERY  # past the first review that judges
    values = [stored(b'{"n":%d}' % n) for n in range(count)]

    def request_key(n: int) -> ScopedKey:
        return ScopedKey(f"/item/{n}", CacheScope("items", "t1"))

    for n in range(2_000):
        prepared_body(responses, request_key(n), values[n])
    gc.collect()
    tracked_before = len(gc.get_objects())

    for n in range(2_000, count):
        prepared_body(responses, request_key(n), values[n])
    # A tuple is untracked by a collection that finds only untracked items in it: the headers
    # nest tuples in tuples, one level a collection (young collections do it long before a full
    # one would walk them).
    gc.collect()
    gc.collect()

    assert len(gc.get_objects()) - tracked_before < 10 * HOT_SMALL_ENTRIES  # not one per response


@pytest.mark.usefixtures("fresh_hot_objects")
def test_the_responses_of_a_working_set_that_fits_are_kept_as_objects() -> None:
    # Hits over a few thousand keys find the very object they found before: nothing rebuilt.
    responses = PreparedResponses()
    values = {n: parse_value(stored(b'{"n":%d}' % n), HEAD) for n in range(2_000)}
    first = {n: responses.get(f"/kept/{n}", value, private=False) for n, value in values.items()}

    for _ in range(3 * HOT_REVIEW_EVERY // 2_000 + 1):  # past reviews of the objects kept
        again = {
            n: responses.get(f"/kept/{n}", value, private=False) for n, value in values.items()
        }

    assert all(again[n] is first[n] for n in values)


def test_remembered_responses_stay_out_of_young_collections() -> None:
    # Over a large working set every hit remembers a response: what it keeps must let the memo's
    # dicts leave the collector's walks (see memo.py), or each collection walks sixteen thousand
    # of them. The headers nest tuples in tuples, which a young collection does not untrack.
    responses = PreparedResponses()
    for n in range(20_000):
        prepared_body(responses, f"/item/{n}", stored(b'{"n":%d}' % n))
        if n % 100 == 0:
            gc.collect(0)  # the youngest generation, collected every few hundred allocations

    assert walked_containers(responses) == []
    assert prepared_body(responses, "/item/19999", stored(b'{"n":19999}')) == b'{"n":19999}'


def test_the_prepared_answers_of_every_route_share_one_bound_that_counts_their_bodies() -> None:
    # A bound per route let a worker with many routes hold 32 MiB for each; and a plain answer's
    # body is a copy of the stored payload, which was not counted.
    routes = [PreparedResponses() for _ in range(8)]
    body = b'{"pad":"' + b"x" * 30_000 + b'"}'
    for _ in range(3):  # each key put more than once: a full memo keeps a key on its second put
        for index, responses in enumerate(routes):
            for item in range(400):
                prepared_body(responses, f"/r{index}/{item}", stored(body))

    memo = cached_route._prepared_memo
    assert memo.bytes_held <= memo.max_bytes
    assert memo.bytes_held >= len(memo) * 2 * len(body)
    assert all(responses._memo is memo for responses in routes)
