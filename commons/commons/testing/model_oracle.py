"""The model check's oracle: what replicas sharing one Redis may answer, checked answer by answer.

A driver (``commons/tests/model_check``) sends requests to replica processes and injects faults;
it hands every answer and every fault to a :class:`Model`, which keeps the truth (the version each
acknowledged update wrote, per data item) and returns the guarantees each answer broke:

- **answered**: every request gets an answer (no dropped connection), never a 5xx, within
  :attr:`Bounds.answer_seconds`;
- **isolation**: the body is the requester's: its tenant (and user, on a user-scoped route), its
  resource and its query are the request's, whatever was written into Redis;
- **freshness**: a read that *starts* after an update of the same item was acknowledged answers
  that update's version or a newer one. Two exceptions, both recorded rather than reported:
  (a) reads that overlap an *outage window*, from the moment an outage fault starts (Redis paused
  or down) until :attr:`Bounds.window_seconds` after it ends, and (b) answers marked
  ``X-FastAPI-Cache: STALE`` (stale-while-revalidate serves old data by design; the next answer
  that is not ``STALE`` is held to the rule again). Faults that are no outage (dropped
  connections, eviction, lost helper keys, hostile values) open no window. An outage's window
  also ends once the driver saw every replica back on Redis with nothing pending
  (:attr:`Fault.healed`), and a degraded replica's excuse (:meth:`Model.excuse_degraded`) never
  outlasts the window of a fault that may degrade one: every excuse is bounded in time.

Every excused read is kept with how long after the update it missed it started, per kind of
fault, so that the windows actually observed can be reported (:class:`WindowLog`).

Which entries an update must reach is the :data:`Item` each answer names: the data the answer
shows, whatever route, namespace or tag holds its entry. Routes of several namespaces show one
item, and some are reached by an update only through a tag (``invalidate_tags`` in the item's
tenant, for one user, or in every tenant): a tag invalidation that misses an entry, at any of
those scopes, is an old read of the item like any other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from commons.testing.model_records import (
    DEGRADED,
    STALE,
    Answer,
    Bounds,
    Excused,
    Fault,
    Item,
    Update,
)
from commons.testing.model_violations import (
    ForeignBody,
    MalformedBody,
    NoAnswer,
    ServerError,
    SlowAnswer,
    StaleHit,
    StaleLateWrite,
    StaleMiss,
    StaleMissedEntry,
    StaleRead,
    UnexpectedStatus,
    Violation,
    WrongResource,
)
from commons.testing.model_windows import WindowLog, percentile

__all__ = [
    "DEGRADED",
    "STALE",
    "Answer",
    "Bounds",
    "Excused",
    "Fault",
    "ForeignBody",
    "Item",
    "MalformedBody",
    "Model",
    "NoAnswer",
    "ServerError",
    "SlowAnswer",
    "StaleHit",
    "StaleLateWrite",
    "StaleMiss",
    "StaleMissedEntry",
    "StaleRead",
    "UnexpectedStatus",
    "Update",
    "Violation",
    "WindowLog",
    "WrongResource",
    "percentile",
]


# -- the model -------------------------------------------------------------------------------------


_CONTEXT_BEFORE_SECONDS = 1.0
#: After a ``STALE`` answer, one background refresh computes and stores the entry again; it is
#: counted as a computation that may overlap an update for this long after the answer.
_REFRESH_SECONDS = 0.5


class Model:
    """The truth, and the oracle that holds every answer to it."""

    def __init__(self, bounds: Bounds, origin: float) -> None:
        self.bounds = bounds
        #: Times in messages are shown relative to this.
        self.origin = origin
        self.answers: list[Answer] = []
        self.updates: dict[Item, list[Update]] = {}
        self.faults: list[Fault] = []
        #: Old reads inside an outage window.
        self.excused: list[Excused] = []
        #: Old reads answered ``STALE``.
        self.stale: list[Excused] = []
        #: Extra lines for messages (the replicas' state changes, say), by the driver.
        self.notes: list[str] = []

    def add_fault(self, fault: Fault) -> None:
        self.faults.append(fault)

    def excuse_degraded(
        self, violations: list[Violation], degraded: dict[str, list[tuple[float, float]]]
    ) -> list[Violation]:
        """``violations`` without the old reads that the README's outage rule allows.

        Whatever made a replica degrade (a switch-over whose failed commands opened its breaker,
        say), two kinds of old read follow, each for a bounded time:

        - the degraded replica serves its own memory tier, which no other replica's invalidation
          reaches, for at most ``CACHE_DEGRADED_TTL_SECONDS``: its old reads within
          ``window_seconds`` of the missed update are excused;
        - an update that a replica acknowledged while degraded had its invalidation kept, to be
          applied once that replica reaches Redis again: other replicas may serve the old entry
          from Redis until then, so their old reads are excused until ``window_seconds`` after
          that degraded period ends.

        ``degraded`` holds each replica's degraded periods as it reported them (driver's clock;
        a period still under way ends at ``inf``). Either excuse also needs a fault that may
        degrade a replica, from whose start until ``window_seconds`` after whose end the read
        starts: a replica that stays degraded longer (its Sentinels away, say) is no excuse,
        whatever the fault. Excused reads are recorded, kind ``degraded``, with their lateness,
        so the measured window is reported.
        """
        kept: list[Violation] = []
        window = self.bounds.window_seconds
        for violation in violations:
            answer = violation.answer
            if not isinstance(violation, StaleRead) or not self._in_a_fault_window(answer):
                kept.append(violation)
                continue
            missed = self.first_missed(answer.item, violation.version, answer.started)
            since_update = answer.started - missed.acked if missed is not None else math.inf
            reader = _period_overlapping(degraded, answer.replica, answer.started, answer.ended)
            updater = None
            if missed is not None:
                update = missed.answer
                updater = _period_overlapping(
                    degraded, update.replica, update.started, missed.acked
                )
            if reader is not None and since_update <= window:
                self.excused.append(
                    Excused(DEGRADED, since_update, answer.started - reader[1], answer)
                )
            elif updater is not None and answer.started <= updater[1] + window:
                self.excused.append(
                    Excused(DEGRADED, since_update, answer.started - updater[1], answer)
                )
            else:
                kept.append(violation)
        return kept

    def _in_a_fault_window(self, answer: Answer) -> bool:
        """Whether the read starts between the start of a fault that may degrade a replica and
        ``window_seconds`` after its end."""
        window = self.bounds.window_seconds
        return any(
            fault.may_degrade and fault.started <= answer.started <= fault.window_end(window)
            for fault in self.faults
        )

    # -- checking ---------------------------------------------------------------------------------

    def check(self, answers: Iterable[Answer]) -> list[Violation]:
        """Records ``answers`` (one step's) and returns every guarantee they broke."""
        new = sorted(answers, key=lambda answer: answer.started)
        self.answers.extend(new)
        violations: list[Violation] = []
        # Updates first: a read of this very step may start after one of them was acknowledged.
        for answer in new:
            if answer.method != "GET":
                violations.extend(self._check_update(answer))
        for answer in new:
            if answer.method == "GET":
                violations.extend(self._check_read(answer))
        return violations

    def _answered(self, answer: Answer, bound: float) -> list[Violation]:
        found: list[Violation] = []
        if answer.status is None:
            found.append(NoAnswer(f"no answer: {answer.error}", answer))
            return found
        if answer.status >= 500:
            found.append(ServerError(f"answered {answer.status}", answer))
        elif answer.status != 200:
            found.append(UnexpectedStatus(f"answered {answer.status}", answer))
        if answer.elapsed > bound:
            found.append(
                SlowAnswer(
                    f"took {answer.elapsed:.3f}s, more than the bound of {bound:.3f}s", answer
                )
            )
        return found

    def _check_update(self, answer: Answer) -> list[Violation]:
        found = self._answered(answer, self.bounds.answer_seconds)
        if answer.status != 200:
            return found
        version = answer.version()
        if version is None:
            found.append(MalformedBody(f"no version in {answer.body[:80]!r}", answer))
            return found
        updates = self.updates.setdefault(answer.item, [])
        updates.append(Update(answer.item, version, answer.ended, answer))
        updates.sort(key=lambda update: update.acked)
        return found

    def _check_read(self, answer: Answer) -> list[Violation]:
        found = self._answered(answer, self.bounds.answer_seconds)
        if answer.status != 200:
            return found
        document = answer.document()
        version = answer.version()
        if document is None or version is None or "tenant" not in document:
            found.append(
                MalformedBody(
                    f"served {answer.body[:80]!r} ({answer.cache or 'no cache header'}) "
                    "as the route's answer",
                    answer,
                )
            )
            return found
        if document.get("tenant") != answer.tenant or (
            answer.user_scoped and document.get("user") != answer.user
        ):
            owner = document.get("tenant")
            if answer.user_scoped:
                owner = f"{owner}/{document.get('user')}"
            found.append(
                ForeignBody(
                    f"served the body of {owner} ({answer.cache or 'no cache header'}): "
                    f"{answer.body[:120]!r}",
                    answer,
                )
            )
            return found
        if document.get("rid") != answer.rid or document.get("q") != answer.q:
            found.append(
                WrongResource(
                    f"asked for rid={answer.rid} q={answer.q}, got rid={document.get('rid')} "
                    f"q={document.get('q')}",
                    answer,
                )
            )
            return found
        stale = self._freshness(answer, version)
        if stale is not None:
            found.append(stale)
        return found

    def owed(self, item: Item, at: float) -> Update | None:
        """The newest update of ``item`` acknowledged before ``at``."""
        acknowledged = [u for u in self.updates.get(item, ()) if u.acked < at]
        return max(acknowledged, key=lambda update: update.version, default=None)

    def first_missed(self, item: Item, version: int, at: float) -> Update | None:
        """The earliest acknowledged (before ``at``) update of ``item`` newer than ``version``."""
        return next(
            (u for u in self.updates.get(item, ()) if u.acked < at and u.version > version),
            None,
        )

    def outage_window(self, answer: Answer) -> Fault | None:
        """The latest outage whose window the answer overlaps, if any."""
        overlapping = [
            fault
            for fault in self.faults
            if fault.outage
            and fault.started <= answer.ended
            and answer.started <= fault.window_end(self.bounds.window_seconds)
        ]
        return max(overlapping, key=lambda fault: fault.started, default=None)

    def _freshness(self, answer: Answer, version: int) -> Violation | None:
        owed = self.owed(answer.item, answer.started)
        if owed is None or version >= owed.version:
            return None
        missed = self.first_missed(answer.item, version, answer.started)
        assert missed is not None
        since_update = answer.started - missed.acked
        if answer.cache == STALE:
            self.stale.append(Excused(STALE, since_update, None, answer))
            return None
        window = self.outage_window(answer)
        if window is not None:
            self.excused.append(
                Excused(window.kind, since_update, answer.started - window.ended, answer)
            )
            return None
        kind: type[StaleRead]
        if answer.cache == "MISS":
            kind = StaleMiss
        elif self._racing_computation(answer, version, missed):
            kind = StaleLateWrite
        else:
            kind = StaleMissedEntry
        message = (
            f"version {version}, but version {owed.version} was acknowledged "
            f"{(answer.started - owed.acked) * 1000:.0f} ms before this read started "
            f"(the first missed update, version {missed.version}, "
            f"{since_update * 1000:.0f} ms before)"
        )
        violation = kind(message, answer)
        violation.version = version
        return violation

    def _racing_computation(self, answer: Answer, version: int, missed: Update) -> bool:
        """Whether a computation of the same entry may have read the data before ``missed``
        was acknowledged and stored ``version`` after it started: a ``MISS`` of that version
        running across the update's start, or the background refresh after a ``STALE`` answer
        sent shortly before the acknowledgement."""
        begun, acked = missed.answer.started, missed.acked
        for other in self.answers:
            if other is answer or other.method != "GET" or other.path != answer.path:
                continue
            if other.item != answer.item:
                continue
            if (
                other.cache == "MISS"
                and other.started < acked
                and other.ended > begun
                and other.version() == version
            ):
                return True
            if other.cache == STALE and begun - _REFRESH_SECONDS < other.ended < acked:
                return True
        return False

    # -- reporting --------------------------------------------------------------------------------

    def explain(self, violation: Violation) -> str:
        """The violation with what led to it: the item's recent history and the faults."""
        answer = violation.answer
        lines = [
            f"{type(violation).__name__}: {violation.guarantee}",
            f"  {answer.describe(self.origin)}",
            f"  {violation.message}",
        ]
        since = answer.started - _CONTEXT_BEFORE_SECONDS
        missed = self._missed_for(violation)
        if missed is not None:
            since = min(since, missed.answer.started - _CONTEXT_BEFORE_SECONDS)
        history = [
            a
            for a in self.answers
            if a.item == answer.item and a.ended >= since and a.started <= answer.ended
        ]
        if history:
            lines.append(f"  history of {'/'.join(answer.item)} (times from the example's start):")
            lines.extend(
                f"    {'>' if a is answer else ' '} {a.describe(self.origin)}" for a in history
            )
        faults = [f for f in self.faults if f.ended + self.bounds.window_seconds >= since]
        lines.extend(f"  {fault.describe(self.origin)}" for fault in faults)
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)

    def _missed_for(self, violation: Violation) -> Update | None:
        if not isinstance(violation, StaleRead):
            return None
        version = violation.answer.version()
        if version is None:
            return None
        return self.first_missed(violation.answer.item, version, violation.answer.started)


def _period_overlapping(
    periods: dict[str, list[tuple[float, float]]], replica: str, start: float, end: float
) -> tuple[float, float] | None:
    """The first of ``replica``'s ``periods`` that overlaps ``[start, end]``, if any."""
    return next((p for p in periods.get(replica, ()) if p[0] <= end and start <= p[1]), None)
