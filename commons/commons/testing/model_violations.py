"""The guarantees an answer can break, one class each (see ``model_oracle.py``): a test runner
that tells failures apart by their type reports each kind separately."""

from __future__ import annotations

from commons.testing.model_records import Answer

__all__ = [
    "ForeignBody",
    "MalformedBody",
    "NoAnswer",
    "ServerError",
    "SlowAnswer",
    "StaleHit",
    "StaleLateWrite",
    "StaleMiss",
    "StaleMissedEntry",
    "StaleRead",
    "UnexpectedStatus",
    "Violation",
    "WrongResource",
]


class Violation(AssertionError):
    """A guarantee one answer broke. Each guarantee is a class of its own, so that a test runner
    that tells failures apart by their type reports each kind separately."""

    guarantee = "a guarantee"

    def __init__(self, message: str, answer: Answer) -> None:
        super().__init__(message)
        self.message = message
        self.answer = answer


class NoAnswer(Violation):
    guarantee = "every request is answered"


class ServerError(Violation):
    guarantee = "never a 5xx"


class UnexpectedStatus(Violation):
    guarantee = "a read answers 200"


class SlowAnswer(Violation):
    guarantee = "every request is answered within the bound"


class MalformedBody(Violation):
    guarantee = "the body is the handler's answer (JSON with the route's fields)"


class ForeignBody(Violation):
    guarantee = "isolation: never another tenant's or user's body"


class WrongResource(Violation):
    guarantee = "the body is the requested resource and query"


class StaleRead(Violation):
    guarantee = "freshness: a read that starts after an acknowledged update sees it"
    #: The version the answer carried.
    version = -1


class StaleMiss(StaleRead):
    """An old version with ``X-FastAPI-Cache: MISS``: the answer was computed for this request,
    or shared from a computation it joined, and that computation read the data before the update.
    """

    guarantee = "freshness (MISS): a read sent after an update does not get a value computed before"


class StaleHit(StaleRead):
    """An old version from the cache (``HIT``)."""

    guarantee = "freshness (HIT): no entry older than an acknowledged update is served"


class StaleLateWrite(StaleHit):
    """A ``HIT`` on a value that a computation overlapping the update (it was still running when
    the update started) had read: it was most likely stored after the update's invalidation."""

    guarantee = (
        "freshness (HIT): a value computed before an update is not stored after its invalidation"
    )


class StaleMissedEntry(StaleHit):
    """A ``HIT`` on an entry that was already stored before the update started, and that no
    computation overlapping the update could have written again: the invalidation missed it."""

    guarantee = "freshness (HIT): an update's invalidation removes every entry stored before it"
