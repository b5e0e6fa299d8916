"""The model check's oracle on histories written by hand: what it reports, and what it excuses."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from commons.testing.model_oracle import (
    DEGRADED,
    STALE,
    Answer,
    Bounds,
    Fault,
    ForeignBody,
    MalformedBody,
    Model,
    NoAnswer,
    ServerError,
    SlowAnswer,
    StaleLateWrite,
    StaleMiss,
    StaleMissedEntry,
    WindowLog,
    WrongResource,
    percentile,
)

BOUNDS = Bounds(answer_seconds=1.0, window_seconds=3.0)
ITEM = ("tenant", "acme", "r0")


def body(version: int, tenant: str = "acme", **extra: object) -> bytes:
    return json.dumps(
        {"tenant": tenant, "rid": "r0", "q": None, "version": version, **extra}
    ).encode()


def read(
    started: float,
    version: int,
    cache: str = "HIT",
    *,
    ended: float | None = None,
    **changes: object,
) -> Answer:
    answer = Answer(
        method="GET",
        replica="A",
        path="/t/r0",
        tenant="acme",
        user="alice",
        user_scoped=False,
        rid="r0",
        q=None,
        item=ITEM,
        started=started,
        ended=started + 0.01 if ended is None else ended,
        status=200,
        body=body(version),
        cache=cache,
    )
    return replace(answer, **changes)  # type: ignore[arg-type]


def update(started: float, version: int, ended: float | None = None) -> Answer:
    return replace(
        read(started, 0),
        method="PUT",
        replica="B",
        ended=started + 0.01 if ended is None else ended,
        body=json.dumps({"version": version}).encode(),
        cache=None,
    )


def kinds(model: Model, *answers: Answer) -> list[type]:
    return [type(violation) for violation in model.check(answers)]


@pytest.fixture
def model() -> Model:
    return Model(BOUNDS, origin=0.0)


def test_an_answer_of_another_tenant_or_user_breaks_isolation(model: Model) -> None:
    other_tenant = read(1.0, 0, body=body(0, tenant="globex"))
    other_user = replace(
        read(1.1, 0, body=body(0, user="bob")),
        user_scoped=True,
        item=("user", "acme", "alice", "r0"),
    )

    assert kinds(model, other_tenant, other_user) == [ForeignBody, ForeignBody]


@pytest.mark.parametrize(
    "stored", [b"\x00\xffgarbage", b'{"a": 1}', b'{"tenant":"acme","rid"', b"[]"]
)
def test_a_body_that_is_no_answer_of_the_route_is_malformed(model: Model, stored: bytes) -> None:
    assert kinds(model, read(1.0, 0, body=stored)) == [MalformedBody]


def test_another_resource_or_query_is_reported(model: Model) -> None:
    assert kinds(model, read(1.0, 0, q="x")) == [WrongResource]


def test_no_answer_a_5xx_and_a_slow_answer_are_reported(model: Model) -> None:
    dropped = read(1.0, 0, status=None, body=b"", error="RemoteProtocolError")
    failed = read(1.0, 0, status=500, body=b"Internal Server Error")
    slow = read(1.0, 0, ended=2.5)

    assert kinds(model, dropped, failed, slow) == [NoAnswer, ServerError, SlowAnswer]


def test_a_read_that_starts_after_an_acknowledged_update_must_see_it(model: Model) -> None:
    assert kinds(model, read(0.0, 0, cache="MISS")) == []
    assert kinds(model, update(1.0, 1, ended=1.1)) == []

    # Started before the acknowledgement: either version is right.
    assert kinds(model, read(1.05, 0)) == []
    # Started after it: the old entry survived the invalidation.
    assert kinds(model, read(1.2, 0)) == [StaleMissedEntry]
    assert kinds(model, read(1.3, 1)) == []


def test_a_stale_hit_after_a_computation_that_overlapped_the_update_is_a_late_write(
    model: Model,
) -> None:
    slow = read(0.9, 0, cache="MISS", ended=1.3)
    put = update(1.0, 1, ended=1.1)
    assert kinds(model, slow, put) == []

    assert kinds(model, read(1.4, 0)) == [StaleLateWrite]


def test_an_old_miss_after_the_update_joined_an_earlier_computation(model: Model) -> None:
    assert kinds(model, update(1.0, 1, ended=1.1), read(1.2, 0, cache="MISS")) == [StaleMiss]


def test_stale_while_revalidate_answers_are_recorded_not_reported(model: Model) -> None:
    model.check([update(1.0, 1, ended=1.1)])

    assert kinds(model, read(1.5, 0, cache=STALE)) == []
    assert [excused.since_update for excused in model.stale] == [pytest.approx(0.4)]
    # The next answer that is not STALE is held to the rule again.
    assert kinds(model, read(1.6, 0)) == [StaleMissedEntry]


def test_an_outage_excuses_old_reads_until_its_window_ends(model: Model) -> None:
    model.add_fault(Fault("pause", started=2.0, ended=2.5, outage=True))
    model.check([update(1.0, 1, ended=1.1)])

    assert kinds(model, read(2.2, 0)) == []  # during the outage
    assert kinds(model, read(5.4, 0)) == []  # within window_seconds after it
    assert kinds(model, read(5.6, 0)) == [StaleMissedEntry]
    assert [(e.kind, round(e.since_fault_end or 0, 3)) for e in model.excused] == [
        ("pause", -0.3),
        ("pause", 2.9),
    ]


def test_faults_that_are_no_outage_open_no_window(model: Model) -> None:
    model.add_fault(Fault("helper_keys", started=0.5, ended=0.5, outage=False))
    model.check([update(1.0, 1, ended=1.1)])

    assert kinds(model, read(1.2, 0)) == [StaleMissedEntry]


def test_an_old_read_of_a_replica_that_reported_itself_degraded_is_excused_within_the_window(
    model: Model,
) -> None:
    """A switch-over (no outage fault) that opened a replica's breaker: its memory tier is the
    README's degraded window, no more."""
    model.add_fault(Fault("sentinel_failover", started=1.0, ended=1.4, outage=False))
    model.check([update(1.0, 1, ended=1.1)])
    during, after, too_late = read(1.5, 0), read(2.5, 0), read(5.6, 0)
    violations = [v for answer in (during, after, too_late) for v in model.check([answer])]
    degraded = {during.replica: [(1.2, 2.0), (5.0, math.inf)]}

    kept = model.excuse_degraded(violations, degraded)

    assert [violation.answer for violation in kept] == [after, too_late]
    assert [(e.kind, e.answer) for e in model.excused] == [(DEGRADED, during)]


def test_an_update_acknowledged_while_degraded_excuses_old_reads_until_it_recovers(
    model: Model,
) -> None:
    """The updater's invalidation is kept until it reaches Redis again (the README's outage
    rule): another replica may serve the old entry from Redis until then, and not after."""
    model.add_fault(Fault("sentinel_failover", started=1.0, ended=2.8, outage=False))
    model.check([update(1.0, 1, ended=1.3)])
    before_recovery, within_window, too_late = read(1.5, 0), read(5.5, 0), read(6.5, 0)
    violations = [
        v for answer in (before_recovery, within_window, too_late) for v in model.check([answer])
    ]
    degraded = {"B": [(1.2, 3.0)]}

    kept = model.excuse_degraded(violations, degraded)

    assert [violation.answer for violation in kept] == [too_late]
    assert [e.answer for e in model.excused] == [before_recovery, within_window]


def test_an_updater_degraded_only_after_its_acknowledgement_excuses_nothing(model: Model) -> None:
    model.add_fault(Fault("sentinel_failover", started=1.0, ended=2.8, outage=False))
    model.check([update(1.0, 1, ended=1.1)])
    violations = model.check([read(1.5, 0)])

    assert model.excuse_degraded(violations, {"B": [(1.2, 3.0)]}) == violations


def test_a_degraded_period_excuses_old_reads_only_until_the_window_after_its_fault(
    model: Model,
) -> None:
    """The updater stays degraded long after the fault that degraded it (its Sentinels away,
    say): the excuse ends ``window_seconds`` after the fault, not with the degraded period."""
    model.add_fault(Fault("sentinel_failover", started=1.0, ended=1.5, outage=False))
    model.check([update(1.0, 1, ended=1.3)])
    within, too_late = read(4.4, 0), read(4.6, 0)
    violations = [v for answer in (within, too_late) for v in model.check([answer])]

    kept = model.excuse_degraded(violations, {"B": [(1.2, math.inf)]})

    assert [violation.answer for violation in kept] == [too_late]
    assert [e.answer for e in model.excused] == [within]


def test_no_fault_no_excuse_for_a_degraded_replica(model: Model) -> None:
    model.check([update(1.0, 1, ended=1.3)])
    violations = model.check([read(1.5, 0)])

    assert model.excuse_degraded(violations, {"B": [(1.2, 3.0)], "A": [(1.2, 3.0)]}) == violations


def test_a_fault_the_readme_promises_no_window_for_excuses_no_degraded_replica(
    model: Model,
) -> None:
    """Sentinels away, master up: no process degrades, so none is excused if it does."""
    model.add_fault(Fault("sentinels_away", started=1.0, ended=2.0, outage=False, degrades=False))
    model.check([update(1.0, 1, ended=1.3)])
    violations = model.check([read(1.5, 0)])

    assert model.excuse_degraded(violations, {"B": [(1.2, 3.0)], "A": [(1.2, 3.0)]}) == violations


def test_the_window_log_summarises_excused_reads_per_fault() -> None:
    model = Model(BOUNDS, origin=0.0)
    model.add_fault(Fault("kill", started=2.0, ended=2.5, outage=True))
    model.check([update(1.0, 1, ended=1.1), read(2.1, 0), read(3.1, 0)])
    log = WindowLog()

    log.add(model)

    assert log.faults == {"kill": 1}
    assert log.reads == 2
    assert log.lines()[-1] == "kill               |     2 | 2000 / 2000 | 600"


def test_percentile_is_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]

    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 99) == 0.0


def test_the_explanation_shows_the_history_of_the_item(model: Model) -> None:
    model.check([read(0.0, 0, cache="MISS"), update(1.0, 1, ended=1.1)])
    (violation,) = model.check([read(1.2, 0)])

    text = model.explain(violation)

    assert "StaleMissedEntry" in text
    assert "+1.000s PUT /t/r0 on B as acme" in text
    assert "> +1.200s GET /t/r0 on A as acme" in text
