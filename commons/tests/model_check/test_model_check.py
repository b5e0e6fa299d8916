"""A randomized model check: two replica processes on a real Redis topology, random requests and
faults, every answer checked against a model of the truth (``commons.testing.model_oracle``).

Hypothesis's stateful testing drives it. Each rule is one step: GETs and PUTs on random replicas,
routes, tenants, users, resources and queries (alone, in bursts, or a slow GET racing a PUT), or
a fault injected while requests run. After every step the oracle checks every answer of the step;
a broken guarantee fails the example (the kinds a step broke are raised together), and Hypothesis
shrinks it.

The world is parametrized by topology (``conftest.py``). Every topology has Redis paused (every
node, SIGSTOP) and faults of the network (:class:`FaultsOnEveryTopology`): one connection of one
replica to one node (its hits' read connection, the near cache's subscribed one, or a pooled one),
through the node's loopback proxy, severed silently, black-holed one way or delayed. Each
topology has its own faults besides:

- ``single`` (:class:`RequestsAndFaults`): Redis killed and restarted empty, every client
  connection dropped, memory squeezed under ``allkeys-lru``, the invalidation index's helper keys
  deleted, hostile values written over entries, and a replica killed (SIGKILL) and started again
  while Redis is down after a PUT it acknowledged, Redis coming back with its data (its
  invalidation must come back from the replica's journal);
- ``cluster`` (:class:`ClusterFaults`), 3 primaries and 3 replicas: a primary killed until its
  replica is promoted, ``CLUSTER FAILOVER``, a slot migrated (``ASK``, then ``MOVED``) during an
  invalidation;
- ``sentinel`` (:class:`SentinelFaults`): the master killed until the Sentinel promotes the
  replica, ``SENTINEL FAILOVER``, the Sentinel paused while the master answers (no window at all:
  no replica may degrade).

A fault kind in :data:`KNOWN_FAILING_FAULTS` (a known defect) only runs when named in
``MODEL_CHECK_ENABLE_FAULTS``.

Two tests share the replicas of each world: requests alone (:class:`Requests`), whose examples
fail or pass within a few steps, and requests under the topology's faults.

- ``make test`` runs them bounded, on every topology: ``MODEL_CHECK_SECONDS`` (default 20) of
  examples and shrinking for both on one server, ``MODEL_CHECK_TOPOLOGY_SECONDS`` (default 16) on
  each of the others, a third of it for requests alone; a step that is running at the deadline
  finishes, later steps are not run (except in Hypothesis's final replay of each failure).
- ``make chaos`` runs them for ``CHAOS_SECONDS`` (default 600) split between the topologies; it
  prints its seed, and ``make chaos CHAOS_SEED=<seed>`` replays a run (pytest's
  ``--hypothesis-seed``).

At the end, the terminal summary gives, per topology, how long each kind of fault lasted and the
windows observed: how long after an update (and after the fault ended) the old reads excused by
an outage window (or answered ``STALE``) came.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.control import current_build_context
from hypothesis.stateful import (
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.exceptions import ResponseError

from commons.testing.model_oracle import (
    Answer,
    Fault,
    ForeignBody,
    Item,
    MalformedBody,
    Model,
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
    WindowLog,
    WrongResource,
)
from commons.testing.proxy import ProxiedConnection
from commons.testing.redis_cluster import LocalRedisCluster, bulk_text, info_field
from commons.testing.redis_sentinel import LocalSentinel
from commons.testing.redis_server import RedisServer

pytestmark = [pytest.mark.model_check, pytest.mark.slow]

#: The data space: small, so that random requests meet on the same entries.
TENANTS = 2
USERS = 2
RIDS = 2
QUERIES: tuple[str | None, ...] = (None, "x")
REPLICAS = ("A", "B")
#: ``t``: our decorator; ``u``: ours, per user; ``g``: fastapi-cache2's; ``s``: stale-while-
#: revalidate; ``k``, ``d``: tagged (a literal tag invalidated in the tenant, a function's tag
#: invalidated in every tenant); ``v``: tagged, per user. ``t``, ``g``, ``s``, ``k`` and ``d`` serve
#: the same (tenant, resource) data, ``u`` and ``v`` the same (tenant, user, resource) data: an
#: update must reach every route of its data, whether by namespace or by tag.
TENANT_ROUTES = ("t", "g", "s", "k", "d")
USER_ROUTES = ("u", "v")
ROUTES = (*TENANT_ROUTES, *USER_ROUTES)
#: Each route's namespace (``replica_app.py``).
NAMESPACES = {
    "t": "res",
    "u": "ures",
    "g": "gres",
    "s": "sres",
    "k": "kres",
    "d": "dres",
    "v": "vres",
}

#: Seconds of examples (and shrinking) of both tests together; past them no example is run
#: except Hypothesis's final replay of each failure it reports.
RUN_SECONDS = float(os.environ.get("MODEL_CHECK_SECONDS", "20"))
#: The same for each of the other topologies (a Redis Cluster, Sentinel).
TOPOLOGY_SECONDS = float(os.environ.get("MODEL_CHECK_TOPOLOGY_SECONDS", "16"))
#: The share of the requests-only test: its examples fail (or pass) in a few steps.
REQUESTS_SHARE = 1 / 3
VERBOSE = os.environ.get("MODEL_CHECK_VERBOSE", "") not in ("", "0")

#: In a race, how long the read that may join the slow computation goes ahead of the others.
REJOIN_HEAD_START_SECONDS = 0.015

#: A replica's connections the network faults pick from (``World.connections``).
CONNECTION_ROLES = ("reader", "subscriber", "pool")
NETWORK_FAULTS = ("sever", "black_hole_to_server", "black_hole_to_client", "delay")
#: After a read connection severed silently, how long past the near cache's maximum age an old
#: answer is excused: a read that times out on it, the breaker it may open and the probe that
#: closes it, on a loaded machine.
SEVERED_READER_SLACK_SECONDS = 1.5

#: The order in which the kinds of violation a step found are reported.
#: A stale HIT comes before a stale MISS: the entry it comes from is served again until its TTL.
SEVERITY: tuple[type[Violation], ...] = (
    ForeignBody,
    MalformedBody,
    ServerError,
    NoAnswer,
    WrongResource,
    StaleLateWrite,
    StaleMissedEntry,
    StaleHit,
    StaleMiss,
    UnexpectedStatus,
    SlowAnswer,
)


# -- what a step does ------------------------------------------------------------------------------


class _Compact:
    """Printed in one short line in Hypothesis's report of a failing example."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


@dataclass(frozen=True, repr=False)
class Get(_Compact):
    replica: int
    route: str
    tenant: int
    user: int
    rid: int
    q: int
    delay_ms: int = 0

    @property
    def path(self) -> str:
        query = f"?q={QUERIES[self.q]}" if QUERIES[self.q] is not None else ""
        return f"/{self.route}/r{self.rid}{query}"

    @property
    def who(self) -> str:
        return f"t{self.tenant}" + (f"/u{self.user}" if self.route in USER_ROUTES else "")

    def __repr__(self) -> str:
        delay = f", delay_ms={self.delay_ms}" if self.delay_ms else ""
        return f"Get({REPLICAS[self.replica]!r}, {self.path!r}, {self.who!r}{delay})"


@dataclass(frozen=True, repr=False)
class Put(_Compact):
    replica: int
    user_item: bool
    tenant: int
    user: int
    rid: int

    def __repr__(self) -> str:
        route = "u" if self.user_item else "t"
        who = f"t{self.tenant}" + (f"/u{self.user}" if self.user_item else "")
        return f"Put({REPLICAS[self.replica]!r}, '/{route}/r{self.rid}', {who!r})"


Op = Get | Put


@dataclass(frozen=True, repr=False)
class At(_Compact):
    """An operation started ``ms`` milliseconds into a step."""

    ms: int
    op: Op

    def __repr__(self) -> str:
        return f"At({self.ms}, {self.op!r})"


@dataclass(frozen=True, repr=False)
class Race(_Compact):
    """A slow GET (``leader``), and ``put_after_ms`` into it a PUT of the same data. As soon as
    the PUT is acknowledged, the leader's entry is read on both replicas (on the leader's, such
    a read can join the slow computation), with ``also_after_ack`` (other routes of the same
    data); once the slow GET is answered, the entry is read again on both replicas, with
    ``also_after_leader``. Extra reads are (replica, route) on the leader's tenant, user,
    resource and query."""

    leader: Get
    #: 20 ms or more (the leader has read the data), 40 ms or more before the leader's delay
    #: ends (the PUT's acknowledgement and the read that may join come before it returns).
    put_after_ms: int
    also_after_ack: tuple[tuple[int, str], ...]
    also_after_leader: tuple[tuple[int, str], ...]

    def __repr__(self) -> str:
        def reads(pairs: tuple[tuple[int, str], ...]) -> str:
            return "[" + ", ".join(f"'{REPLICAS[r]} /{route}'" for r, route in pairs) + "]"

        return (
            f"Race({self.leader!r}, put_after_ms={self.put_after_ms}, "
            f"also_after_ack={reads(self.also_after_ack)}, "
            f"also_after_leader={reads(self.also_after_leader)})"
        )


replicas = st.integers(0, len(REPLICAS) - 1)
delays = st.sampled_from((0, 0, 20, 60, 150))


def gets(delay: st.SearchStrategy[int] = delays) -> st.SearchStrategy[Get]:
    return st.builds(
        Get,
        replica=replicas,
        route=st.sampled_from(ROUTES),
        tenant=st.integers(0, TENANTS - 1),
        user=st.integers(0, USERS - 1),
        rid=st.integers(0, RIDS - 1),
        q=st.integers(0, len(QUERIES) - 1),
        delay_ms=delay,
    )


puts = st.builds(
    Put,
    replica=replicas,
    user_item=st.booleans(),
    tenant=st.integers(0, TENANTS - 1),
    user=st.integers(0, USERS - 1),
    rid=st.integers(0, RIDS - 1),
)
ops: st.SearchStrategy[Op] = st.one_of(gets(), gets(), puts)


def timed(within_ms: int, max_size: int = 4) -> st.SearchStrategy[list[At]]:
    return st.lists(st.builds(At, ms=st.integers(0, within_ms), op=ops), max_size=max_size)


@st.composite
def races(draw: st.DrawFn) -> Race:
    leader = draw(gets(delay=st.integers(60, 150)))
    family = USER_ROUTES if leader.route in USER_ROUTES else TENANT_ROUTES
    others = [route for route in family if route != leader.route]
    extra = (
        st.lists(st.tuples(replicas, st.sampled_from(others)), max_size=2)
        if others
        else st.just([])
    )
    return Race(
        leader=leader,
        # The PUT lands once the leader has read the data (20 ms) and while it still computes
        # (its handler sleeps 60 ms or more), with a margin either side for a loaded machine.
        put_after_ms=draw(st.integers(20, leader.delay_ms - 40)),
        also_after_ack=tuple(draw(extra)),
        also_after_leader=tuple(draw(extra)),
    )


#: Fault kinds left out of runs unless named in ``MODEL_CHECK_ENABLE_FAULTS`` (comma-separated),
#: each with the defect it finds today (none at present). The oracle is the same when they run.
KNOWN_FAILING_FAULTS: dict[str, str] = {}
ENABLED_FAULTS = {
    name.strip()
    for name in os.environ.get("MODEL_CHECK_ENABLE_FAULTS", "").split(",")
    if name.strip()
}


def fault_enabled(kind: str) -> Callable[[Any], bool]:
    """A rule's precondition: ``kind`` runs unless it is a known failing fault not enabled."""
    enabled = kind not in KNOWN_FAILING_FAULTS or kind in ENABLED_FAULTS
    return lambda machine: enabled


HOSTILE_KINDS = ("garbage", "foreign_json", "other_tenant", "truncated")


# -- the machine -----------------------------------------------------------------------------------


class Requests(RuleBasedStateMachine):
    """Requests only: GETs alone and in bursts, PUTs, and a slow GET racing a PUT on the other
    replica.

    One example: a fresh model over the shared world (its own tenants, so nothing an earlier
    example left behind can be mistaken for this one's data).
    """

    world: Any = None
    log: WindowLog | None = None
    deadline = 0.0
    examples = 0

    def __init__(self) -> None:
        super().__init__()
        # Past the run's time, an example draws its steps but runs none of them (Hypothesis
        # then finishes quickly: the data it draws stays the same, only nothing is executed),
        # except Hypothesis's final replay of a failing example, which must run to be reported.
        self.idle = time.monotonic() > Requests.deadline and not current_build_context().is_final
        self.steps = 0
        self.trace: list[str] = []
        self.failure: Exception | None = None
        if self.idle:
            return
        self.started = time.monotonic()
        Requests.examples += 1
        self.epoch = f"e{Requests.examples}"
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self.world.heal())
        except BaseException:
            self.loop.close()
            raise
        self.admin = self.world.admin()
        self.clients = [
            # A connection per request: a connection the server closed after an earlier answer
            # can then never be taken for a dropped request.
            httpx.AsyncClient(
                base_url=replica.url,
                timeout=self.world.bounds.answer_seconds + 2.0,
                limits=httpx.Limits(max_keepalive_connections=0),
            )
            for replica in self.world.replicas
        ]
        self.model = Model(self.world.bounds, origin=time.monotonic())

    def teardown(self) -> None:
        if self.idle:
            return
        if VERBOSE:
            print(
                f"example {self.epoch}: {self.steps} steps, {len(self.model.answers)} answers, "
                f"{len(self.model.faults)} faults, {time.monotonic() - self.started:.1f}s, "
                f"{Requests.deadline - time.monotonic():.1f}s left: {' '.join(self.trace)}"
                + (f" -> {type(self.failure).__name__}" if self.failure else ""),
                flush=True,
            )
        try:
            self.world.resume()
            self.loop.run_until_complete(self._close())
        finally:
            self.loop.close()
            if Requests.log is not None:
                Requests.log.add(self.model)
        if self.failure is not None:
            # Hypothesis tells failures apart by the exception's type (and a group's by theirs).
            raise self.failure

    async def _close(self) -> None:
        await self.world.restart()
        for client in self.clients:
            await client.aclose()
        await self.admin.aclose()

    # -- requests ----------------------------------------------------------------------------------

    def _names(self, op: Op) -> tuple[str, str, str]:
        return f"{self.epoch}t{op.tenant}", f"u{op.user}", f"r{op.rid}"

    async def _send(self, op: Op) -> Answer:
        tenant, user, rid = self._names(op)
        headers = {"X-Tenant": tenant, "X-User": user}
        item: Item
        if isinstance(op, Get):
            method, q, user_scoped = "GET", QUERIES[op.q], op.route in USER_ROUTES
            path = f"/{op.route}/{rid}" + (f"?q={q}" if q is not None else "")
            headers["X-Delay-Ms"] = str(op.delay_ms)
        else:
            method, q, user_scoped = "PUT", None, op.user_item
            path = f"/{'u' if op.user_item else 't'}/{rid}"
        item = ("user", tenant, user, rid) if user_scoped else ("tenant", tenant, rid)
        fields: dict[str, Any] = {
            "method": method,
            "replica": REPLICAS[op.replica],
            "path": path,
            "tenant": tenant,
            "user": user,
            "user_scoped": user_scoped,
            "rid": rid,
            "q": q,
            "item": item,
            "delay_ms": op.delay_ms if isinstance(op, Get) else 0,
        }
        client = self.clients[op.replica]
        started = time.monotonic()
        try:
            response = await client.request(method, path, headers=headers)
        except httpx.HTTPError as exc:
            ended = time.monotonic()
            return Answer(
                **fields, started=started, ended=ended, status=None, error=f"{type(exc).__name__}"
            )
        ended = time.monotonic()
        return Answer(
            **fields,
            started=started,
            ended=ended,
            status=response.status_code,
            body=response.content,
            cache=response.headers.get("x-fastapi-cache"),
        )

    def _entry_key(self, get: Get) -> str:
        """The key our key builders give the entry of ``get`` (see ``commons.cache.keys``)."""
        tenant, user, rid = self._names(get)
        namespace = NAMESPACES[get.route]
        scope = f"tenant_{tenant}" + (f":user_{user}" if get.route in USER_ROUTES else "")
        q = QUERIES[get.q]
        digest = hashlib.md5((f"q={q}" if q is not None else "").encode()).hexdigest()
        return f"{self.world.prefix}:{namespace}:{scope}:/{get.route}/{rid}:{digest}"

    async def _at(self, at: At) -> Answer:
        await asyncio.sleep(at.ms / 1000)
        return await self._send(at.op)

    async def _schedule(self, plan: Sequence[At]) -> list[Answer]:
        return list(await asyncio.gather(*(self._at(at) for at in plan)))

    # -- checking ----------------------------------------------------------------------------------

    def _step(self, work: Callable[[], Awaitable[list[Answer]]]) -> None:
        # After a violation the example's remaining steps are drawn but not run, and the violation
        # is raised at the end (teardown): whether a step fails depends on timing, and Hypothesis
        # requires every run of the same choices to draw the same data.
        if self.idle or self.failure is not None:
            return
        if time.monotonic() > Requests.deadline and not current_build_context().is_final:
            # Past the run's time an example that is still going stops running steps (a fault
            # of a cluster or Sentinel set-up takes seconds): the run stays bounded.
            return
        self.steps += 1
        self.trace.append(sys._getframe(1).f_code.co_name)
        self.world.check_alive()
        answers = self.loop.run_until_complete(work())
        violations = self.model.check(answers)
        if any(isinstance(violation, StaleRead) for violation in violations):
            degraded = self.loop.run_until_complete(self._degraded_periods())
            violations = self.model.excuse_degraded(violations, degraded)
        if violations:
            rule_name = sys._getframe(1).f_code.co_name
            self.failure = self._failure(violations, f"step {self.steps} ({rule_name})")

    def _failure(self, violations: list[Violation], where: str) -> Exception:
        """What the example raises: each kind of violation the step found, once (the first of
        each, with its history), as one exception or a group of them."""
        self.model.notes = self.loop.run_until_complete(self._state_changes())
        by_kind: dict[type[Violation], list[Violation]] = {}
        for violation in sorted(violations, key=lambda v: SEVERITY.index(type(v))):
            by_kind.setdefault(type(violation), []).append(violation)
        found: list[Exception] = []
        for kind, same in by_kind.items():
            text = self.model.explain(same[0])
            if len(same) > 1:
                text += f"\n  and {len(same) - 1} more in this step:"
                text += "".join(
                    f"\n    {v.answer.describe(self.model.origin)}: {v.message}" for v in same[1:6]
                )
            text += f"\n  found at {where}; the steps printed after it were drawn but not run"
            found.append(kind(text, same[0].answer))
        if len(found) == 1:
            return found[0]
        kinds = ", ".join(kind.__name__ for kind in by_kind)
        return ExceptionGroup(f"{where} broke {len(found)} guarantees: {kinds}", found)

    async def _degraded_periods(self) -> dict[str, list[tuple[float, float]]]:
        """Each replica's degraded periods as its ``/_status`` reports them, on the driver's
        clock (one still under way ends at ``inf``); a replica that does not answer has none."""
        offset = time.time() - time.monotonic()
        periods: dict[str, list[tuple[float, float]]] = {}
        for replica, client in zip(self.world.replicas, self.clients, strict=True):
            try:
                changes = (await client.get("/_status")).json()["changes"]
            except httpx.HTTPError:
                continue
            start: float | None = None
            for wall, state in changes:
                if state == "degraded" and start is None:
                    start = wall - offset
                elif state != "degraded" and start is not None:
                    periods.setdefault(replica.name, []).append((start, wall - offset))
                    start = None
            if start is not None:
                periods.setdefault(replica.name, []).append((start, math.inf))
        return periods

    async def _state_changes(self) -> list[str]:
        """The replicas' cache state changes during this example (for the failure message)."""
        offset = time.time() - time.monotonic()
        lines = []
        for replica, client in zip(self.world.replicas, self.clients, strict=True):
            try:
                status = (await client.get("/_status")).json()
            except httpx.HTTPError:
                # A replica closes a connection on which its app raised (a 500): ask again.
                try:
                    status = (await client.get("/_status")).json()
                except httpx.HTTPError as exc:
                    lines.append(f"replica {replica.name}: /_status failed ({type(exc).__name__})")
                    continue
            reasons = dict(status.get("reasons", []))
            changes = [
                f"+{wall - offset - self.model.origin:.3f}s {state}"
                + (f" ({reasons[wall]})" if state != "redis" and wall in reasons else "")
                for wall, state in status["changes"]
                if wall - offset >= self.model.origin
            ]
            lines.append(
                f"replica {replica.name} cache states: {', '.join(changes) or 'redis throughout'}"
            )
        return lines

    def _fault(
        self,
        kind: str,
        started: float,
        ended: float,
        outage: bool,
        detail: str,
        degrades: bool | None = None,
        healed: float | None = None,
        window: float | None = None,
    ) -> None:
        self.model.add_fault(Fault(kind, started, ended, outage, detail, degrades, healed, window))

    # -- rules: requests ---------------------------------------------------------------------------

    @rule(get=gets())
    def get(self, get: Get) -> None:
        self._step(lambda: self._schedule([At(0, get)]))

    @rule(plan=st.lists(st.builds(At, ms=st.integers(0, 30), op=gets()), min_size=2, max_size=6))
    def burst(self, plan: list[At]) -> None:
        """Several GETs at once (within 30 ms)."""
        self._step(lambda: self._schedule(plan))

    @rule(put=puts)
    def put(self, put: Put) -> None:
        self._step(lambda: self._schedule([At(0, put)]))

    @rule(race=races())
    def race_across_replicas(self, race: Race) -> None:
        """The PUT on the other replica than the slow GET's."""
        self._step(lambda: self._race(race, 1 - race.leader.replica))

    async def _race(self, race: Race, put_replica: int) -> list[Answer]:
        leader = race.leader
        slow = asyncio.ensure_future(self._send(leader))
        await asyncio.sleep(race.put_after_ms / 1000)
        put = Put(put_replica, leader.route in USER_ROUTES, leader.tenant, leader.user, leader.rid)
        answers = [await self._send(put)]

        def read(replica: int, route: str) -> Get:
            return replace(leader, replica=replica, route=route, delay_ms=0)

        # First the leader's entry on the leader's replica, alone: whether it joins the slow
        # computation must not depend on a read on the other replica storing the entry first.
        rejoin = asyncio.ensure_future(self._send(read(leader.replica, leader.route)))
        await asyncio.sleep(REJOIN_HEAD_START_SECONDS)
        others = [read(1 - leader.replica, leader.route), *(read(*r) for r in race.also_after_ack)]
        answers += await asyncio.gather(slow, rejoin, *map(self._send, others))
        again = [read(r, leader.route) for r in (leader.replica, 1 - leader.replica)]
        again += [read(*r) for r in race.also_after_leader]
        answers += await asyncio.gather(*map(self._send, again))
        return answers


class FaultsOnEveryTopology(Requests):
    """The requests of :class:`Requests`, the same race with the PUT on the slow GET's replica,
    and the faults every topology has: all its nodes stopped (SIGSTOP) while requests run, and
    one connection of one replica to one node faulted through the node's proxy."""

    #: The roles of a replica's connections on this topology (``World.connections``).
    connection_roles: tuple[str, ...] = CONNECTION_ROLES

    # -- rules: the same race on one replica -------------------------------------------------------

    @rule(race=races())
    def race_on_one_replica(self, race: Race) -> None:
        """The PUT on the slow GET's replica."""
        self._step(lambda: self._race(race, race.leader.replica))

    # -- rules: outages ----------------------------------------------------------------------------

    # At most 800 ms: below a cluster's node timeout and the Sentinel's down-after time (1 s),
    # so that stopping every node is an outage, never a failover.
    @rule(pause_ms=st.integers(100, 800), plan=timed(600))
    def pause_redis(self, pause_ms: int, plan: list[At]) -> None:
        """SIGSTOP on every node: Redis black-holed; requests run; SIGCONT after ``pause_ms``."""
        self._step(lambda: self._paused(pause_ms, plan))

    async def _paused(self, pause_ms: int, plan: list[At]) -> list[Answer]:
        started = time.monotonic()
        self.world.pause()
        running = asyncio.ensure_future(self._schedule(plan))
        try:
            await asyncio.sleep(pause_ms / 1000)
        finally:
            self.world.resume()
            ended = time.monotonic()
            answers = await running
        self._fault("pause", started, ended, True, f"{pause_ms} ms")
        return answers

    # -- rules: faults of the network between one replica and Redis ----------------------------

    @rule(
        replica=replicas,
        role=st.sampled_from(CONNECTION_ROLES),
        pick=st.integers(0, 5),
        fault=st.sampled_from(NETWORK_FAULTS),
        hold_ms=st.integers(0, 1500),
        update=puts,
        update_ms=st.integers(0, 1500),
        plan=timed(1500),
    )
    def network_fault(
        self,
        replica: int,
        role: str,
        pick: int,
        fault: str,
        hold_ms: int,
        update: Put,
        update_ms: int,
        plan: list[At],
    ) -> None:
        """One connection of one replica, through a proxy: of the replica's open connections of
        ``role`` (to any node; behind Sentinel a pooled one, the only kind there), the
        ``pick``-th from the newest (modulo their number: on a cluster a reader or subscriber is
        one primary's); ``sever`` (the server's side closed, the replica told nothing, ever: a
        NAT's idle timeout), ``black_hole_to_server`` or ``black_hole_to_client`` (one
        direction's bytes dropped, nobody told), ``delay`` (the server's bytes reach the replica
        ``hold_ms`` late); requests run, and ``update_ms`` in the other replica updates
        ``update``'s item, which the faulted replica read (twice) just before the fault; after
        ``hold_ms`` a black hole or a delay ends by closing the connection (a NAT that finally
        resets it), a severed one is left as it is."""
        self._step(
            lambda: self._network_fault(
                replica, role, pick, fault, hold_ms, update, update_ms, plan
            )
        )

    # The fault that fools tracking, which the near cache's maximum age bounds (README), as a
    # rule of its own: drawn as one of network_fault's many, it came too seldom for a bounded
    # run to find a near cache that outlives that bound.
    @precondition(lambda self: "reader" in self.connection_roles)
    @rule(
        replica=replicas,
        pick=st.integers(0, 5),
        update=puts,
        update_ms=st.integers(0, 1500),
        plan=timed(1500),
    )
    def sever_read_connection(
        self, replica: int, pick: int, update: Put, update_ms: int, plan: list[At]
    ) -> None:
        """:meth:`network_fault` of a read connection severed silently (one primary's, on a
        cluster): Redis forgets what the connection tracked and tells no one; the other replica
        updates what the replica holds; past the maximum age (and slack) nothing old may come
        from the replica."""
        self._step(
            lambda: self._network_fault(
                replica, "reader", pick, "sever", 0, update, update_ms, plan
            )
        )

    async def _network_fault(
        self,
        replica: int,
        role: str,
        pick: int,
        fault: str,
        hold_ms: int,
        update: Put,
        update_ms: int,
        plan: list[At],
    ) -> list[Answer]:
        victim = self.world.replicas[replica]
        update = replace(update, replica=1 - replica)  # the other replica updates
        if role not in self.connection_roles:
            role = "pool"
        # What the update changes is in the faulted replica's memory when the fault comes (the
        # first read may compute and fill, the second is one its near cache keeps): only Redis
        # can tell it of the update, through the connections the fault may break.
        held = _item_read(update, replica)
        answers = [await self._send(held), await self._send(held)]
        connections = await asyncio.to_thread(self.world.connections, victim, role)
        chosen = connections[-1 - pick % len(connections)] if connections else None
        started = time.monotonic()
        if chosen is not None:
            _inject(chosen, fault, hold_ms)
        running = asyncio.ensure_future(self._schedule([At(update_ms, update), *plan]))
        try:
            await asyncio.sleep(hold_ms / 1000)
        finally:
            if chosen is not None and fault != "sever":
                await asyncio.to_thread(chosen.close)
            ended = time.monotonic()
            answers += await running
        detail = (
            f"{role} of {victim.name} to {chosen.upstream_port}"
            if chosen is not None
            else f"no {role} of {victim.name}"
        )
        # The subscribed connection's faults degrade nothing: the near cache empties itself
        # within its silence limit, and answers nothing older than its maximum age.
        subscriber = role == "subscriber"
        window = self.world.near_cache_max_age + 1.0 if subscriber else None
        severed_reader = chosen is not None and fault == "sever" and role == "reader"
        if severed_reader:
            # Nothing ever tells the replica: what its near cache holds is bounded by the
            # maximum age from the sever on (a timed-out read may open its breaker meanwhile,
            # which the probe closes within a recovery interval), not by an outage's window.
            ended = started
            window = self.world.near_cache_max_age + SEVERED_READER_SLACK_SECONDS
        self._fault(
            f"net_{fault}",
            started,
            ended,
            True,
            detail,
            False if subscriber else None,
            None,
            window,
        )
        if severed_reader and window is not None:
            # Past that bound, the updated item and the plan's reads again on the severed
            # replica: none may be old.
            await asyncio.sleep(max(0.0, started + window + 0.05 - time.monotonic()))
            late = [held] + [
                replace(at.op, replica=replica) for at in plan if isinstance(at.op, Get)
            ]
            answers += list(await asyncio.gather(*map(self._send, late)))
        return answers


class RequestsAndFaults(FaultsOnEveryTopology):
    """One server: requests, and faults injected into Redis while requests run."""

    restarted = False

    @rule(down_ms=st.integers(0, 600), plan=timed(600))
    def kill_redis(self, down_ms: int, plan: list[At]) -> None:
        """SIGKILL, requests, and Redis started again on the same port, empty."""
        self._step(lambda: self._killed(down_ms, plan))

    async def _killed(self, down_ms: int, plan: list[At]) -> list[Answer]:
        started = time.monotonic()
        await self.world.kill()
        running = asyncio.ensure_future(self._schedule(plan))
        try:
            await asyncio.sleep(down_ms / 1000)
        finally:
            await self.world.restart()
            ended = time.monotonic()
            answers = await running
        self._fault("kill", started, ended, True, f"down {down_ms} ms")
        return answers

    # A replica takes about two seconds to start: once an example, so that the bounded run
    # still reaches the other faults.
    @precondition(lambda self: not self.restarted)
    @rule(put=puts, down_ms=st.integers(0, 600), plan=timed(300))
    def restart_replica_in_outage(self, put: Put, down_ms: int, plan: list[At]) -> None:
        """The PUT's item cached on both replicas; Redis killed (its data saved first); the PUT
        on one replica (its invalidation kept, and journaled) and requests; that replica killed
        (SIGKILL) and started again while Redis is still down; Redis back with the data from
        before the PUT ``down_ms`` later; once both replicas are back on Redis with nothing
        pending, the item read on both again."""
        self.restarted = True
        self._step(lambda: self._restarted_in_outage(put, down_ms, plan))

    async def _restarted_in_outage(self, put: Put, down_ms: int, plan: list[At]) -> list[Answer]:
        victim = self.world.replicas[put.replica]
        # The PUT's item cached on both replicas first: Redis keeps it through the outage.
        reads = [_item_read(put, replica) for replica in range(len(self.world.replicas))]
        answers = list(await asyncio.gather(*map(self._send, reads)))
        started = time.monotonic()
        # Killed, not paused: a paused server still reads the invalidation waiting in its
        # socket buffer once resumed, and a killed one must come back with its data.
        await self.world.kill(keep_data=True)
        try:
            answers += [await self._send(put), *await self._schedule(plan)]
            await asyncio.to_thread(victim.crash_and_restart)
            await asyncio.to_thread(self.world.wait_until_serving, victim, on_redis=False)
            await asyncio.sleep(down_ms / 1000)
        finally:
            await self.world.restart()
            ended = time.monotonic()
        healed = await self._until_healed()
        detail = f"replica {victim.name} killed and started"
        self._fault("restart", started, ended, True, detail, healed=healed)
        # Nothing excuses an old answer now: the invalidation must have come back.
        return answers + list(await asyncio.gather(*map(self._send, reads)))

    async def _until_healed(self, within: float = 10.0) -> float:
        """When every replica is back on Redis with nothing pending (the driver's clock)."""

        async def healed() -> bool:
            for client in self.clients:
                status = (await client.get("/_status")).json()
                if status["backend"] != "redis" or status["pending_invalidations"]:
                    return False
            return True

        deadline = time.monotonic() + within
        while not await healed():
            if time.monotonic() > deadline:
                raise AssertionError(f"the replicas did not come back to Redis in {within} s")
            await asyncio.sleep(0.02)
        return time.monotonic()

    # -- rules: faults that are no outage ----------------------------------------------------------

    @rule(kill_at_ms=st.integers(0, 150), plan=timed(150))
    def drop_connections(self, kill_at_ms: int, plan: list[At]) -> None:
        """``CLIENT KILL TYPE normal`` while requests run: every replica connection dropped."""
        self._step(lambda: self._dropped(kill_at_ms, plan))

    async def _dropped(self, kill_at_ms: int, plan: list[At]) -> list[Answer]:
        running = asyncio.ensure_future(self._schedule(plan))
        try:
            await asyncio.sleep(kill_at_ms / 1000)
            at = time.monotonic()
            # Every connection but the one sending this (CLIENT KILL skips its own).
            killed = await self.admin.execute_command("CLIENT", "KILL", "TYPE", "normal")
        finally:
            answers = await running
        self._fault("client_kill", at, at, False, f"{killed} connections")
        return answers

    @rule(hold_ms=st.integers(0, 500), plan=timed(500))
    def squeeze_memory(self, hold_ms: int, plan: list[At]) -> None:
        """``maxmemory`` just above what Redis uses, ``allkeys-lru``, junk written until keys
        are evicted; requests run; the memory limit lifted after ``hold_ms``."""
        self._step(lambda: self._squeezed(hold_ms, plan))

    async def _squeezed(self, hold_ms: int, plan: list[At]) -> list[Answer]:
        started = time.monotonic()
        admin = self.admin
        evicted_before = int((await admin.info("stats"))["evicted_keys"])
        used = int((await admin.info("memory"))["used_memory"])
        await admin.config_set("maxmemory-policy", "allkeys-lru")
        await admin.config_set("maxmemory", used + 64 * 1024)
        running: asyncio.Future[list[Answer]] | None = None
        try:
            for n in range(400):
                try:
                    await admin.set(f"junk:{self.epoch}:{n}", b"j" * 4096)
                except ResponseError:
                    break  # OOM: nothing left that Redis can evict
                if n % 8 == 7:
                    stats = await admin.info("stats")
                    if int(stats["evicted_keys"]) > evicted_before:
                        break
            running = asyncio.ensure_future(self._schedule(plan))
            await asyncio.sleep(hold_ms / 1000)
        finally:
            await admin.config_set("maxmemory", 0)
            await admin.config_set("maxmemory-policy", "noeviction")
            answers = [] if running is None else await running
        evicted = int((await admin.info("stats"))["evicted_keys"]) - evicted_before
        junk = [key async for key in admin.scan_iter(match="junk:*", count=1000)]
        if junk:
            await admin.unlink(*junk)
        self._fault("memory", started, time.monotonic(), False, f"{evicted} keys evicted")
        return answers

    @rule(plan=timed(100, max_size=3))
    def delete_helper_keys(self, plan: list[At]) -> None:
        """Every helper key of the prefix (index, registries, locks) deleted; then requests."""
        self._step(lambda: self._helpers_deleted(plan))

    async def _helpers_deleted(self, plan: list[At]) -> list[Answer]:
        at = time.monotonic()
        helpers = [
            key async for key in self.admin.scan_iter(match=f"{self.world.prefix}:#*", count=1000)
        ]
        if helpers:
            await self.admin.delete(*helpers)
        self._fault("helper_keys", at, at, False, f"{len(helpers)} keys")
        return await self._schedule(plan)

    @rule(
        entry=gets(delay=st.just(0)),
        kind=st.sampled_from(HOSTILE_KINDS),
        reads=st.lists(replicas, min_size=1, max_size=2),
    )
    def hostile_value(self, entry: Get, kind: str, reads: list[int]) -> None:
        """The target's entry (a GET stores it first) overwritten in Redis: ``garbage`` bytes,
        ``foreign_json`` (``{"a": 1}``), ``other_tenant`` (a valid body of another tenant's
        answer), ``truncated`` (the entry's first half); then the target read on ``reads``."""
        self._step(lambda: self._hostile(entry, kind, reads))

    async def _hostile(self, target: Get, kind: str, reads: list[int]) -> list[Answer]:
        answers = [await self._send(target)]
        key = self._entry_key(target)
        current = await self.admin.get(key)
        at = time.monotonic()
        if current is not None:
            await self.admin.set(key, self._hostile_bytes(target, kind, current), keepttl=True)
        self._fault("hostile", at, at, False, f"{kind} over {key}" if current else "no entry")
        for replica in reads:
            answers.append(await self._send(replace(target, replica=replica)))
        return answers

    def _hostile_bytes(self, target: Get, kind: str, current: bytes) -> bytes:
        if kind == "garbage":
            return b"\x00\xffnot json at all\x81"
        if kind == "foreign_json":
            return b'{"a": 1}'
        if kind == "truncated":
            return current[: max(1, len(current) // 2)]
        other = f"{self.epoch}t{(target.tenant + 1) % TENANTS}"
        body: dict[str, object] = {"tenant": other}
        if target.route in USER_ROUTES:
            body["user"] = f"u{target.user}"
        _, _, rid = self._names(target)
        body.update({"rid": rid, "q": QUERIES[target.q], "version": 0, "by": "A"})
        return json.dumps(body, separators=(",", ":")).encode()


def _inject(connection: ProxiedConnection, fault: str, hold_ms: int) -> None:
    if fault == "sever":
        connection.sever_silently()
    elif fault == "delay":
        connection.delay_replies(hold_ms / 1000)
    else:
        connection.black_hole(fault.removeprefix("black_hole_"))


def _item_read(put: Put, replica: int) -> Get:
    """A GET of what ``put`` updates, on ``replica``."""
    route = "u" if put.user_item else "t"
    return Get(replica, route, put.tenant, put.user, put.rid, 0)


async def _until(condition: Callable[[], bool], within: float, what: str) -> None:
    """Waits (bounded) until ``condition()``, called in a thread (it may talk to Redis)."""
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not within {within:.0f}s")
        await asyncio.sleep(0.05)


class ClusterFaults(FaultsOnEveryTopology):
    """A Redis Cluster of 3 primaries, each with a replica: requests, every node stopped, and the
    cluster's own faults while requests run: a primary killed until its replica is promoted,
    ``CLUSTER FAILOVER``, and a slot migrated (``ASK``, then ``MOVED``) while it is invalidated.

    Windows: a killed primary is an outage (``CLUSTERDOWN`` for every slot until its replica takes
    over): its window is measured from the promotion. ``CLUSTER FAILOVER`` and a migration are no
    outage: the README promises that a manual failover waits for the replica, so nothing is lost,
    and that redirects are followed; they open no window.
    """

    @property
    def cluster(self) -> LocalRedisCluster:
        cluster = self.world.cluster
        assert cluster is not None
        return cluster

    async def _primary_and_replica(self, index: int) -> tuple[RedisServer, RedisServer]:
        """A primary that has a running replica, and that replica. After several failovers a
        shard can be left with two replicas and another with none (Redis migrates replicas
        between shards, and an old primary may take a moment to follow its successor)."""

        def pairs() -> list[tuple[RedisServer, RedisServer]]:
            found = []
            for primary in self.world.primaries():
                try:
                    found.append((primary, self.cluster.replica_of(primary)))
                except LookupError:
                    continue
            return found

        deadline = time.monotonic() + 15.0
        while not (candidates := await asyncio.to_thread(pairs)):
            if time.monotonic() > deadline:
                raise RuntimeError("no cluster primary with a running replica")
            await asyncio.sleep(0.1)
        return candidates[index % len(candidates)]

    @rule(primary=st.integers(0, 2), plan=timed(2000, max_size=6))
    def kill_primary(self, primary: int, plan: list[At]) -> None:
        """SIGKILL of a primary, requests; the fault ends once its replica is promoted and the
        cluster is ``ok``; then the killed node is started again (it rejoins as a replica)."""
        self._step(lambda: self._primary_killed(primary, plan))

    async def _primary_killed(self, index: int, plan: list[At]) -> list[Answer]:
        victim, heir = await self._primary_and_replica(index)
        # A crash loses what the primary acknowledged but had not replicated yet; the README
        # documents that such an invalidation's entries live until their TTL. This fault is the
        # crash of a primary whose replica has caught up: replication is waited for first.
        await asyncio.to_thread(victim.command, "WAIT", 1, 2000)
        started = time.monotonic()
        await asyncio.to_thread(victim.kill)
        running = asyncio.ensure_future(self._schedule(plan))
        try:
            await _until(lambda: self.cluster.role(heir) == "master", 30, "the replica's promotion")
            await asyncio.to_thread(self.cluster.wait_until_healthy, 30.0)
            ended = time.monotonic()
        finally:
            answers = await running
        self._fault(
            "kill_primary", started, ended, True, f"port {victim.port}, promoted {heir.port}"
        )
        await self.world.rejoin()
        return answers

    async def _manual_failover(self, heir: RedisServer) -> None:
        """``CLUSTER FAILOVER`` on ``heir`` until it is primary. A manual failover that gets no
        votes is given up after 5 s (the primaries vote for a shard's replicas only once in two
        node timeouts, so one that follows a promotion of the same shard can fail): asked again,
        a few times."""
        for _ in range(5):
            bulk_text(await asyncio.to_thread(heir.command, "CLUSTER", "FAILOVER"))
            try:
                await _until(lambda: self.cluster.role(heir) == "master", 6, "manual failover")
            except RuntimeError:
                continue
            return
        raise RuntimeError(f"CLUSTER FAILOVER on {heir.port} never completed")

    @rule(primary=st.integers(0, 2), plan=timed(600))
    def cluster_failover(self, primary: int, plan: list[At]) -> None:
        """``CLUSTER FAILOVER`` on a primary's replica while requests run; the fault ends once
        the replica is primary and the cluster is ``ok``."""
        self._step(lambda: self._failed_over(primary, plan))

    async def _failed_over(self, index: int, plan: list[At]) -> list[Answer]:
        victim, heir = await self._primary_and_replica(index)
        started = time.monotonic()
        running = asyncio.ensure_future(self._schedule(plan))
        try:
            await self._manual_failover(heir)
            await asyncio.to_thread(self.cluster.wait_until_healthy, 30.0)
            ended = time.monotonic()
        finally:
            answers = await running
        self._fault("cluster_failover", started, ended, False, f"port {victim.port} -> {heir.port}")
        return answers

    @precondition(fault_enabled("slot_migration"))
    @rule(
        entry=gets(delay=st.just(0)),
        helper=st.integers(-1, 50),
        to=st.integers(0, 1),
        put_replica=replicas,
        put_ms=st.integers(0, 300),
        hold_ms=st.integers(0, 300),
        batch=st.integers(1, 4),
        plan=timed(300, max_size=3),
    )
    def migrate_slot(
        self,
        entry: Get,
        helper: int,
        to: int,
        put_replica: int,
        put_ms: int,
        hold_ms: int,
        batch: int,
        plan: list[At],
    ) -> None:
        """A slot moved to another primary while requests and an update of ``entry``'s data run:
        the slot of its entry (``helper`` -1), or of one of the prefix's helper keys (index,
        generation, lock; ``helper`` picks one), set ``IMPORTING``/``MIGRATING``, its keys moved
        ``batch`` at a time (``ASK`` meanwhile), ``hold_ms`` more in that state, then given to
        the new owner (``MOVED``). A GET stores ``entry`` first; both replicas read it after."""
        self._step(
            lambda: self._migrated(
                entry,
                helper,
                to,
                Put(
                    put_replica,
                    entry.route in USER_ROUTES,
                    entry.tenant,
                    entry.user,
                    entry.rid,
                ),
                put_ms,
                hold_ms,
                batch,
                plan,
            )
        )

    async def _helper_keys(self) -> list[bytes]:
        found: list[bytes] = []
        for node in await asyncio.to_thread(self.world.primaries):
            admin = self.world.node_admin(node)
            try:
                found += await admin.keys(f"{self.world.prefix}:#*")
            finally:
                await admin.aclose()
        return sorted(found)

    async def _migrated(
        self,
        entry: Get,
        helper: int,
        to: int,
        put: Put,
        put_ms: int,
        hold_ms: int,
        batch: int,
        plan: list[At],
    ) -> list[Answer]:
        cluster = self.cluster
        answers = [await self._send(entry)]
        key: str | bytes = self._entry_key(entry)
        if helper >= 0:
            helpers = await self._helper_keys()
            if helpers:
                key = helpers[helper % len(helpers)]
        slot = await asyncio.to_thread(cluster.key_slot, key)
        source = await asyncio.to_thread(cluster.owner_of_slot, slot)
        primaries = await asyncio.to_thread(self.world.primaries)
        others = [node for node in primaries if node.port != source.port]
        dest = others[to % len(others)]
        source_id = await asyncio.to_thread(cluster.node_id, source)
        dest_id = await asyncio.to_thread(cluster.node_id, dest)
        started = time.monotonic()
        bulk_text(dest.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id))
        bulk_text(source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", dest_id))
        running = asyncio.ensure_future(self._schedule([At(put_ms, put), *plan]))
        admin = self.world.node_admin(source)
        moved = 0
        try:

            async def move_keys() -> None:
                nonlocal moved
                for _ in range(1000):
                    keys = await admin.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                    if not keys:
                        return
                    await admin.execute_command(
                        "MIGRATE", dest.host, dest.port, "", 0, 5000, "KEYS", *keys
                    )
                    moved += len(keys)
                    await asyncio.sleep(0.02)
                raise RuntimeError(f"slot {slot} never emptied")

            await move_keys()
            await asyncio.sleep(hold_ms / 1000)
            await move_keys()
            # The new owner first, then the old one, then the others (as redis-cli does).
            bulk_text(dest.command("CLUSTER", "SETSLOT", slot, "NODE", dest_id))
            bulk_text(source.command("CLUSTER", "SETSLOT", slot, "NODE", dest_id))
            for node in (n for n in others if n is not dest):
                reply = node.command("CLUSTER", "SETSLOT", slot, "NODE", dest_id)
                # A restarted primary the cluster has turned into a replica since it was listed
                # learns the slot's owner from its master.
                if b"only with masters" not in reply:
                    bulk_text(reply)
            ended = time.monotonic()
        finally:
            answers += await running
            await admin.aclose()
        name = key.decode() if isinstance(key, bytes) else key
        self._fault(
            "slot_migration",
            started,
            ended,
            False,
            f"slot {slot} of {name} from {source.port} to {dest.port}, {moved} keys moved",
        )
        answers += await asyncio.gather(
            *(self._send(replace(entry, replica=r)) for r in range(len(REPLICAS)))
        )
        return answers


class SentinelFaults(FaultsOnEveryTopology):
    """A master and its replica behind a Sentinel: requests, both servers stopped, and the
    set-up's own faults while requests run: the master killed until the Sentinel promotes the
    replica, and ``SENTINEL FAILOVER``.

    Windows: a killed master is an outage until the Sentinel names another one (README): its
    window is measured from the promotion. A ``SENTINEL FAILOVER`` waits for the replica, so
    nothing is lost (README, "Cluster failover"): it opens no window.
    """

    # Behind Sentinel the store keeps no near cache (no read connection, no subscribed one): its
    # reads and writes share redis-py's pool.
    connection_roles = ("pool",)

    @property
    def sentinel(self) -> LocalSentinel:
        sentinel = self.world.sentinel
        assert sentinel is not None
        return sentinel

    @rule(plan=timed(2500, max_size=6))
    def kill_master(self, plan: list[At]) -> None:
        """SIGKILL of the master, requests; the fault ends once the Sentinel names the replica
        and it is master; then the killed server is started again (the Sentinel turns it into
        the new master's replica)."""
        self._step(lambda: self._master_killed(plan))

    async def _master_killed(self, plan: list[At]) -> list[Answer]:
        victim = await asyncio.to_thread(self.world.sentinel_master)
        heir = next(s for s in self.sentinel.servers if s is not victim)
        # As for a cluster's primary: the crash of a master whose replica has caught up.
        await asyncio.to_thread(victim.command, "WAIT", 1, 2000)
        started = time.monotonic()
        await asyncio.to_thread(victim.kill)
        running = asyncio.ensure_future(self._schedule(plan))
        try:
            await _until(
                lambda: (
                    self.sentinel.master_port() == self.sentinel.announced_port(heir)
                    and info_field(heir, "replication", "role") == "master"
                ),
                30,
                "the Sentinel's promotion",
            )
            ended = time.monotonic()
        finally:
            answers = await running
        self._fault("kill_master", started, ended, True, f"port {victim.port} -> {heir.port}")
        await self.world.rejoin()
        return answers

    # Below the Sentinel's down-after time (1 s): resumed, it must not take the master for down.
    @rule(put=puts, away_ms=st.integers(100, 400), plan=timed(400, max_size=6))
    def sentinels_away(self, put: Put, away_ms: int, plan: list[At]) -> None:
        """The PUT's item cached on both replicas; SIGSTOP on the Sentinel, the master up; the
        PUT, then the item read on both replicas, and requests; the Sentinel resumed after
        ``away_ms``. No replica may degrade, so the oracle excuses no old read (the README
        promises none)."""
        self._step(lambda: self._sentinels_away(put, away_ms, plan))

    async def _sentinels_away(self, put: Put, away_ms: int, plan: list[At]) -> list[Answer]:
        reads = [_item_read(put, replica) for replica in range(len(self.world.replicas))]
        answers = list(await asyncio.gather(*map(self._send, reads)))
        started = time.monotonic()
        self.world.pause_sentinels()
        running = asyncio.ensure_future(self._schedule(plan))
        try:
            answers.append(await self._send(put))
            answers += await asyncio.gather(*map(self._send, reads))
            await asyncio.sleep(max(0.0, started + away_ms / 1000 - time.monotonic()))
        finally:
            self.world.resume()
            ended = time.monotonic()
            answers += await running
        self._fault("sentinels_away", started, ended, False, f"{away_ms} ms", degrades=False)
        return answers

    @rule(plan=timed(600))
    def sentinel_failover(self, plan: list[At]) -> None:
        """``SENTINEL FAILOVER`` while requests run; the fault ends once the replica is master."""
        self._step(lambda: self._switched_over(plan))

    async def _switched_over(self, plan: list[At]) -> list[Answer]:
        started = time.monotonic()
        running = asyncio.ensure_future(self._schedule(plan))
        try:
            promoted = await asyncio.to_thread(self.sentinel.failover, 20.0)
            ended = time.monotonic()
        finally:
            answers = await running
        self._fault("sentinel_failover", started, ended, False, f"promoted {promoted.port}")
        await asyncio.to_thread(self.world.settle_sentinel, 30.0)
        return answers


# -- the test --------------------------------------------------------------------------------------


def run_machine(
    machine: type[Requests], seconds: float, steps: int, world: Any, log: WindowLog
) -> None:
    Requests.world = world
    Requests.log = log
    Requests.deadline = time.monotonic() + seconds
    run_state_machine_as_test(
        machine,
        settings=settings(
            # Past the deadline the remaining examples are drawn but not run (a few ms each), so
            # this only needs to be more than the examples that fit in the time.
            max_examples=int(os.environ.get("MODEL_CHECK_EXAMPLES", seconds * 3)),
            stateful_step_count=steps,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            # No explain phase: it replays variations of a failure under a tracer, which costs
            # more than the whole run.
            phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
        ),
    )


#: The faults of each topology (the requests-only test is the same on all).
FAULTS: dict[str, type[Requests]] = {
    "single": RequestsAndFaults,
    "cluster": ClusterFaults,
    "sentinel": SentinelFaults,
}


def run_seconds(world: Any) -> float:
    return RUN_SECONDS if world.topology == "single" else TOPOLOGY_SECONDS


def test_concurrent_requests_answer_as_the_model_says(
    model_world: Any, window_log: WindowLog
) -> None:
    run_machine(Requests, run_seconds(model_world) * REQUESTS_SHARE, 10, model_world, window_log)


def test_requests_under_faults_answer_as_the_model_says(
    model_world: Any, window_log: WindowLog
) -> None:
    # A cluster's or Sentinel's fault takes seconds (a promotion): fewer steps an example.
    steps = 12 if model_world.topology == "single" else 8
    run_machine(
        FAULTS[model_world.topology],
        run_seconds(model_world) * (1 - REQUESTS_SHARE),
        steps,
        model_world,
        window_log,
    )
