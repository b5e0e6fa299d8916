"""What the model check's oracle (``model_oracle.py``) is told and decides: answers, faults,
updates, the reads it excused, and its bounds."""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["DEGRADED", "STALE", "Answer", "Bounds", "Excused", "Fault", "Item", "Update"]

#: A data item: ``("tenant", tenant, rid)`` or ``("user", tenant, user, rid)``.
Item = tuple[str, ...]

#: The ``X-FastAPI-Cache`` value of a stale-while-revalidate answer.
STALE = "STALE"


# -- what happened ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """One request the driver sent, and what came back.

    Times are the driver's monotonic clock: ``started`` just before the request was sent,
    ``ended`` once its answer (or its failure) was received.
    """

    method: str
    replica: str
    #: The path and query sent, e.g. ``/t/r0?q=x``.
    path: str
    tenant: str
    user: str | None
    #: Whether the body must carry ``user`` too (a user-scoped route).
    user_scoped: bool
    rid: str
    q: str | None
    item: Item
    started: float
    ended: float
    #: The HTTP status; ``None`` when no answer came (``error`` says why).
    status: int | None
    body: bytes = b""
    #: The ``X-FastAPI-Cache`` header, if any.
    cache: str | None = None
    error: str | None = None
    delay_ms: int = 0

    @property
    def elapsed(self) -> float:
        return self.ended - self.started

    def document(self) -> dict[str, object] | None:
        """The body as a JSON object; ``None`` when it is none."""
        try:
            parsed = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None
        return parsed if isinstance(parsed, dict) else None

    def version(self) -> int | None:
        document = self.document()
        version = None if document is None else document.get("version")
        return version if isinstance(version, int) and not isinstance(version, bool) else None

    def describe(self, origin: float) -> str:
        """One line: what was asked, when, and what came back."""
        who = (
            self.tenant
            if self.user is None or not self.user_scoped
            else f"{self.tenant}/{self.user}"
        )
        head = (
            f"+{self.started - origin:.3f}s {self.method} {self.path} on {self.replica} as {who}"
            f" ({self.elapsed * 1000:.0f} ms"
            + (f", handler delay {self.delay_ms} ms" if self.delay_ms else "")
            + ")"
        )
        if self.status is None:
            return f"{head} -> no answer: {self.error}"
        document = self.document()
        if document is None:
            shown = self.body[:60]
            return f"{head} -> {self.status} {self.cache or ''} body {shown!r}".replace("  ", " ")
        details = ", ".join(f"{k}={v}" for k, v in document.items())
        return f"{head} -> {self.status} {self.cache or '-'} {{{details}}}"


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault the driver injected, from ``started`` until it was healed at ``ended``."""

    kind: str
    started: float
    ended: float
    #: Redis unreachable (paused, killed): opens a window for freshness.
    outage: bool
    detail: str = ""
    #: Whether a replica may degrade because of it, which excuses old reads for a bounded time
    #: (:meth:`Model.excuse_degraded`); ``None``: every fault may (a switch-over's failed
    #: commands, dropped connections), except those the README promises no window for.
    degrades: bool | None = None
    #: When every replica was seen back on Redis with nothing pending, if the driver waited
    #: for it: no outage excuse outlives that (each dropped its memory tier on the way back).
    healed: float | None = None
    #: How long after its end this fault excuses old reads, when not :attr:`Bounds.window_seconds`
    #: (a network fault's: what the README promises after it, e.g. the near cache's maximum age).
    window: float | None = None

    @property
    def may_degrade(self) -> bool:
        return self.degrades is not False

    def window_end(self, window: float) -> float:
        """The last moment a read may start and be excused by this fault (``window``: the
        bounds' window, used unless the fault has its own)."""
        end = self.ended + (window if self.window is None else self.window)
        return end if self.healed is None else min(end, self.healed)

    def describe(self, origin: float) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return (
            f"+{self.started - origin:.3f}s..+{self.ended - origin:.3f}s fault {self.kind}{extra}"
        )


@dataclass(frozen=True, slots=True)
class Update:
    """An acknowledged update: from ``acked`` on, reads of ``item`` owe ``version`` or newer."""

    item: Item
    version: int
    acked: float
    answer: Answer


#: The kind of an old read excused because its replica was degraded (see Model.excuse_degraded).
DEGRADED = "degraded"


@dataclass(frozen=True, slots=True)
class Excused:
    """A read older than an acknowledged update that the rules excuse, and by what."""

    #: The outage's kind, or ``STALE`` for a stale-while-revalidate answer.
    kind: str
    #: Seconds from the missed update's acknowledgement to the read's start.
    since_update: float
    #: Seconds from the outage's end to the read's start (negative: during the outage).
    since_fault_end: float | None
    answer: Answer


@dataclass(frozen=True, slots=True)
class Bounds:
    """The limits the oracle holds answers to."""

    #: Longest time any request may take.
    answer_seconds: float
    #: How long after an outage ends freshness may still lag (see the module docstring).
    window_seconds: float


# -- what went wrong -------------------------------------------------------------------------------
