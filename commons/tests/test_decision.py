"""The outcome of one request to a cached route, chosen by one pure function (no Redis, no app).

Each row is a situation a request can be in and the outcome the rules in ``decision.py`` give it;
together they name every outcome. ``COUNTED_AS`` and ``FORWARDED_BECAUSE`` say how each is
counted and why a computed answer went to the handler.
"""

from __future__ import annotations

import pytest

from commons.cache.decision import (
    COUNTED_AS,
    FORWARDED_BECAUSE,
    RequestOutcome,
    Situation,
    decide,
)
from commons.cache.events import LookupOutcome

FRESH = Situation(initialised=True, stored=True, fresh=True, fresh_for=30, stale_ttl=10)
#: Stale for 5 s: within a 10 s stale_ttl.
STALE = Situation(initialised=True, stored=True, fresh_for=-5, stale_ttl=10, stale_if_error=60)
#: Stale for 20 s: past a 10 s stale_ttl, within a 60 s stale_if_error.
TOO_STALE = STALE._replace(fresh_for=-20)

CASES = [
    ("init_cache() has not run", Situation(initialised=False), RequestOutcome.UNINITIALISED),
    (
        "CACHE_ENABLED=false, whatever is asked",
        Situation(initialised=True, enabled=False, is_read=False),
        RequestOutcome.BYPASS_DISABLED,
    ),
    ("a POST", Situation(initialised=True, is_read=False), RequestOutcome.BYPASS_NOT_A_READ),
    (
        "no identity to build a key from",
        Situation(initialised=True, identified=False),
        RequestOutcome.BYPASS_NO_IDENTITY,
    ),
    ("nothing stored", Situation(initialised=True), RequestOutcome.MISS),
    ("a fresh entry", FRESH, RequestOutcome.HIT),
    (
        "a fresh entry the client has",
        FRESH._replace(client_has_it=True),
        RequestOutcome.NOT_MODIFIED,
    ),
    ("an entry within stale_ttl", STALE, RequestOutcome.STALE),
    ("the same, the client has it", STALE._replace(client_has_it=True), RequestOutcome.STALE),
    ("an entry within stale_if_error", TOO_STALE, RequestOutcome.MISS_STALE_FALLBACK),
    (
        "an entry just at the end of stale_if_error",
        TOO_STALE._replace(fresh_for=-60),
        RequestOutcome.MISS_STALE_FALLBACK,
    ),
    ("an entry past both windows", TOO_STALE._replace(fresh_for=-61), RequestOutcome.MISS_STALE),
    (
        "an entry just at the end of stale_ttl",
        STALE._replace(fresh_for=-10, stale_if_error=0),
        RequestOutcome.MISS_STALE,
    ),
    (
        "a client asking for a fresh answer (nothing was read)",
        Situation(initialised=True, asked_fresh=True),
        RequestOutcome.MISS_ASKED_FRESH,
    ),
]


@pytest.mark.parametrize(
    ("situation", "expected"),
    [pytest.param(situation, expected, id=name) for name, situation, expected in CASES],
)
def test_each_situation_has_its_outcome(situation: Situation, expected: str) -> None:
    assert decide(situation) == expected


def test_the_table_names_every_outcome() -> None:
    named = {value for name, value in vars(RequestOutcome).items() if name.isupper()}
    assert {expected for _, _, expected in CASES} == named
    assert set(COUNTED_AS) == named


@pytest.mark.parametrize(
    ("outcome", "counted"),
    [
        (RequestOutcome.HIT, LookupOutcome.HIT),
        (RequestOutcome.NOT_MODIFIED, LookupOutcome.HIT),
        (RequestOutcome.STALE, LookupOutcome.STALE),
        (RequestOutcome.MISS, LookupOutcome.MISS),
        (RequestOutcome.MISS_STALE, LookupOutcome.MISS),
        (RequestOutcome.MISS_STALE_FALLBACK, LookupOutcome.MISS),
        (RequestOutcome.MISS_ASKED_FRESH, LookupOutcome.BYPASS_CLIENT),
        (RequestOutcome.BYPASS_DISABLED, LookupOutcome.BYPASS_DISABLED),
        (RequestOutcome.BYPASS_NO_IDENTITY, LookupOutcome.BYPASS_NO_IDENTITY),
        # Mistakes in the service are logged, not counted as a cache's outcome.
        (RequestOutcome.BYPASS_NOT_A_READ, None),
        (RequestOutcome.UNINITIALISED, None),
    ],
)
def test_each_outcome_is_counted_as_its_lookup_outcome(outcome: str, counted: str | None) -> None:
    assert COUNTED_AS[outcome] == counted


def test_only_misses_say_why_they_went_to_the_handler() -> None:
    assert FORWARDED_BECAUSE == {
        RequestOutcome.MISS: b"fwd=miss",
        RequestOutcome.MISS_ASKED_FRESH: b"fwd=request",
        RequestOutcome.MISS_STALE: b"fwd=stale",
        RequestOutcome.MISS_STALE_FALLBACK: b"fwd=stale",
    }


def test_a_fresh_entry_is_a_hit_whatever_the_stale_windows() -> None:
    # Freshness comes first: a fresh entry with no stale window is never treated as stale.
    assert decide(FRESH._replace(stale_ttl=0, stale_if_error=0)) == RequestOutcome.HIT
