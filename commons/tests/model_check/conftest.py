"""The model check's world: a Redis topology and two replica processes, shared by every example.

The topology is a parameter of the world (``MODEL_CHECK_TOPOLOGIES``, comma-separated; all three by
default, which ``make test`` runs, each for a bounded time):

- ``single``: one ``redis-server``; the replicas get its ``REDIS_URL``;
- ``cluster``: a Redis Cluster of 3 primaries and 3 replicas (:class:`LocalRedisCluster`); the
  replicas get the ``REDIS_URL`` of one node (the cluster is auto-detected);
- ``sentinel``: a master, its replica and one Sentinel (:class:`LocalSentinel`); the replicas get
  ``REDIS_SENTINELS`` and ``REDIS_SENTINEL_MASTER``.

Every topology puts loopback proxies (:class:`LoopbackProxy`) between the replicas and its data
nodes, so that the driver can fault one connection of one replica: severed silently, black-holed
one way, delayed (:meth:`World.connections`). On one server each replica has a proxy of its own;
on a cluster each node has one and announces its port (``cluster-announce-port``), so the slot
map names the proxies; behind Sentinel each server has one, the Sentinel monitors the master at
its proxy and each server announces its proxy as a replica (``replica-announce-port``). A proxy
in front of a node is shared by both replicas (and by the nodes' replication links and the
Sentinel): the replica a connection belongs to is found by its port among the replica process's
own sockets (``/proc``).

Each replica keeps its invalidation journal (``CACHE_INVALIDATION_JOURNAL``) in a directory of its
own, which a replica killed and started again takes back.

Starting them costs seconds, so the module starts each world once (``model_world``); between
examples every fault is healed (stopped nodes resumed, killed nodes started again and rejoined),
Redis is emptied and both replicas are back on Redis (:meth:`World.heal`). Each replica is
``replica_app.py`` under uvicorn on a free loopback port, with the cache's timeouts made small so
that faults play out within a step or two.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import ReadOnlyError

from commons.testing.model_oracle import Bounds, WindowLog
from commons.testing.processes import loopback_tcp_ports
from commons.testing.proxy import LoopbackProxy, ProxiedConnection
from commons.testing.redis_cluster import LocalRedisCluster, bulk_text, info_field
from commons.testing.redis_sentinel import LocalSentinel
from commons.testing.redis_server import (
    RedisServer,
    find_redis_server,
    free_port,
    redis_server_version,
)

APP = Path(__file__).with_name("replica_app.py")
PREFIX = "mc"
#: The cache's settings in every replica: small, so that an outage and its recovery take a
#: fraction of a second.
SOCKET_TIMEOUT_SECONDS = 0.2
CONNECT_TIMEOUT_SECONDS = 0.2
RECOVERY_INTERVAL_SECONDS = 0.3
DEGRADED_TTL_SECONDS = 2
#: The near cache's maximum age (CACHE_NEAR_CACHE_MAX_AGE_SECONDS): what bounds an old answer
#: after a network fault that fools tracking.
NEAR_CACHE_MAX_AGE_SECONDS = 1.0
TTL_SECONDS = 30
REPLICA_NAMES = ("A", "B")
#: Redis's eviction policy when no fault is on (redis-server's default).
DEFAULT_POLICY = "noeviction"
#: The longest a cached handler sleeps (the driver's ``X-Delay-Ms``).
MAX_DELAY_MS = 150

#: What the oracle holds the replicas to. A request: its handler's sleep (a request can wait
#: for a computation that sleeps the longest), up to three Redis timeouts, one second of slack
#: for a loaded 2-core machine. Freshness after an outage: a replica that lost Redis serves its
#: memory tier for at most CACHE_DEGRADED_TTL_SECONDS, and an invalidation kept during the outage
#: reaches the other replica when it is replayed after the next probe
#: (CACHE_RECOVERY_INTERVAL_SECONDS); one second of slack.
BOUNDS = Bounds(
    answer_seconds=MAX_DELAY_MS / 1000 + 3 * SOCKET_TIMEOUT_SECONDS + 1.0,
    window_seconds=DEGRADED_TTL_SECONDS + RECOVERY_INTERVAL_SECONDS + 1.0,
)

#: The topologies a run covers (``MODEL_CHECK_TOPOLOGIES``, comma-separated).
TOPOLOGIES = ("single", "cluster", "sentinel")
#: What a run covers when ``MODEL_CHECK_TOPOLOGIES`` is unset (see the module docstring).
DEFAULT_TOPOLOGIES = ",".join(TOPOLOGIES)
#: Nodes of the cluster world: 3 primaries, 3 replicas.
CLUSTER_NODES = 6
#: On a cluster, a command that times out makes redis-py re-read the slot map from every node it
#: knows, each within a timeout (README, "Outages per topology"): the single server's bound with
#: its one Redis timeout replaced by (1 + nodes) of them.
CLUSTER_BOUNDS = Bounds(
    answer_seconds=MAX_DELAY_MS / 1000 + (2 + 1 + CLUSTER_NODES) * SOCKET_TIMEOUT_SECONDS + 1.0,
    window_seconds=BOUNDS.window_seconds,
)


def selected_topologies() -> list[str]:
    names = [
        name.strip()
        for name in os.environ.get("MODEL_CHECK_TOPOLOGIES", DEFAULT_TOPOLOGIES).split(",")
        if name.strip()
    ]
    unknown = sorted(set(names) - set(TOPOLOGIES))
    if unknown:
        raise ValueError(f"MODEL_CHECK_TOPOLOGIES: unknown {unknown}; known: {TOPOLOGIES}")
    return names


def replica_env(redis_env: dict[str, str], db_path: Path, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHE_", "REDIS_"))}
    env.update(redis_env)
    env.update(
        {
            "CACHE_PREFIX": PREFIX,
            "CACHE_TTL_SECONDS": str(TTL_SECONDS),
            "REDIS_SOCKET_TIMEOUT_SECONDS": str(SOCKET_TIMEOUT_SECONDS),
            "REDIS_CONNECT_TIMEOUT_SECONDS": str(CONNECT_TIMEOUT_SECONDS),
            "CACHE_RECOVERY_INTERVAL_SECONDS": str(RECOVERY_INTERVAL_SECONDS),
            "CACHE_DEGRADED_TTL_SECONDS": str(DEGRADED_TTL_SECONDS),
            "CACHE_NEAR_CACHE_MAX_AGE_SECONDS": str(NEAR_CACHE_MAX_AGE_SECONDS),
            "MODEL_CHECK_DB": str(db_path),
            "MODEL_CHECK_REPLICA": name,
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    return env


def create_database(path: Path) -> None:
    """The data every replica reads: empty tables, WAL (readers never wait for the writer)."""
    import sqlite3

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(
            "CREATE TABLE tenant_items "
            "(tenant TEXT, rid TEXT, version INTEGER, PRIMARY KEY (tenant, rid))"
        )
        conn.execute(
            "CREATE TABLE user_items "
            "(tenant TEXT, user TEXT, rid TEXT, version INTEGER, PRIMARY KEY (tenant, user, rid))"
        )
    finally:
        conn.close()


def _spawn(port: int, env: dict[str, str], log: Any, workdir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(APP), str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )


@dataclass
class Replica:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    log: Any
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def launch(cls, name: str, env: dict[str, str], workdir: Path) -> Replica:
        """Starts ``replica_app.py`` on a free port; :meth:`World.wait_until_serving` waits."""
        log_path, port = workdir / f"replica-{name}.log", free_port()
        log = log_path.open("ab")
        return cls(name, port, _spawn(port, env, log, workdir), log_path, log, env)

    def crash_and_restart(self) -> None:
        """SIGKILL (nothing of its shutdown runs), then the same replica started again on the
        same port, with the same environment (its invalidation journal included)."""
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = _spawn(self.port, self.env, self.log, self.log_path.parent)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


@dataclass
class World:
    """Redis (one of :data:`TOPOLOGIES`), the replicas, and the faults the driver injects."""

    workdir: Path
    topology: str = "single"
    prefix: str = PREFIX
    bounds: Bounds = BOUNDS
    max_delay_ms: int = MAX_DELAY_MS
    near_cache_max_age: float = NEAR_CACHE_MAX_AGE_SECONDS
    redis: RedisServer = field(default_factory=RedisServer)
    cluster: LocalRedisCluster | None = None
    sentinel: LocalSentinel | None = None
    replicas: list[Replica] = field(default_factory=list)
    #: On one server, each replica's proxy to it, by replica name (a cluster's or a Sentinel
    #: set-up's proxies are their nodes', shared: :attr:`node_proxies`).
    proxies: dict[str, LoopbackProxy] = field(default_factory=dict)
    paused: bool = False
    sentinels_paused: bool = False
    down: bool = False

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> World:
        redis_env = self._start_redis()
        self._tune()
        db_path = self.workdir / "data.sqlite"
        create_database(db_path)
        for name in REPLICA_NAMES:
            journal = self.workdir / f"journal-{name}"
            journal.mkdir()
            env = replica_env(redis_env, db_path, name)
            if self.topology == "single":
                proxy = self.proxies[name] = LoopbackProxy(self.redis.port).start()
                env["REDIS_URL"] = proxy.url
            env["CACHE_INVALIDATION_JOURNAL"] = str(journal)
            self.replicas.append(Replica.launch(name, env, self.workdir))
        for replica in self.replicas:
            self.wait_until_serving(replica)
        return self

    def _start_redis(self) -> dict[str, str]:
        """Starts the topology; returns the replicas' Redis variables."""
        if self.topology == "cluster":
            self.cluster = LocalRedisCluster(
                primaries=3, replicas_per_primary=1, proxied=True
            ).start()
            self.bounds = CLUSTER_BOUNDS
            return {"REDIS_URL": self.cluster.url}
        if self.topology == "sentinel":
            self.sentinel = LocalSentinel(proxied=True).start()
            return {
                # The host and port of REDIS_URL are not used with Sentinels.
                "REDIS_URL": "redis://unused:1/0",
                "REDIS_SENTINELS": self.sentinel.sentinels,
                "REDIS_SENTINEL_MASTER": self.sentinel.master_name,
            }
        self.redis.start()
        return {"REDIS_URL": self.redis.url}

    def _tune(self) -> None:
        for node in self.nodes:
            self.quick_sync(node)
        if self.sentinel is not None:
            # The Sentinel's failover-timeout (5 s in LocalSentinel) is also how long a failover
            # stays in progress and how soon the same master may be failed over again: 2 s
            # lets several failovers happen in one example.
            reply = self._sentinel_node().command(
                "SENTINEL", "SET", self.sentinel.master_name, "failover-timeout", "2000"
            )
            if not reply.startswith(b"+OK"):
                raise RuntimeError(f"SENTINEL SET failover-timeout: {reply!r}")

    def wait_until_serving(
        self, replica: Replica, timeout: float = 30.0, *, on_redis: bool = True
    ) -> None:
        """Until the replica answers ``/_status`` (and, ``on_redis``, is on Redis)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if replica.process.poll() is not None:
                    raise RuntimeError(
                        f"replica {replica.name} exited at start:\n{replica.log_tail()}"
                    )
                try:
                    status = client.get(f"{replica.url}/_status").json()
                except httpx.HTTPError:
                    status = None
                if status is not None and (status["backend"] == "redis" or not on_redis):
                    return
                time.sleep(0.05)
        raise RuntimeError(f"replica {replica.name} did not start:\n{replica.log_tail()}")

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()
        if self.cluster is not None:
            self.cluster.stop()
        if self.sentinel is not None:
            self.sentinel.stop()
        for proxy in self.proxies.values():
            proxy.stop()
        self.redis.stop()

    def check_alive(self) -> None:
        for replica in self.replicas:
            if replica.process.poll() is not None:
                raise RuntimeError(f"replica {replica.name} exited:\n{replica.log_tail()}")

    @property
    def nodes(self) -> list[RedisServer]:
        """Every data node of the topology (not the Sentinel)."""
        if self.cluster is not None:
            return self.cluster.nodes
        if self.sentinel is not None:
            return self.sentinel.servers
        return [self.redis]

    # -- faults (called from the example's event loop) ---------------------------------------

    def admin(self) -> Redis:
        """A client of our own for the driver's Redis commands (never one of the replicas'); on
        a cluster or behind Sentinel, of the first node (the faults of those topologies address
        their nodes themselves, see :meth:`node_admin`)."""
        node = self.nodes[0]
        return self.node_admin(node)

    @staticmethod
    def node_admin(node: RedisServer) -> Redis:
        """A plain client of one node."""
        return Redis(host=node.host, port=node.port, socket_timeout=5, socket_connect_timeout=5)

    @property
    def node_proxies(self) -> list[LoopbackProxy]:
        """The proxies in front of the data nodes of a cluster or a Sentinel set-up, in the
        nodes' order (on one server, each replica has its own: :attr:`proxies`)."""
        shared = self.cluster or self.sentinel
        if shared is None:
            return []
        return [shared.proxies[node.port] for node in self.nodes]

    def _proxied_connections(self, replica: Replica) -> list[ProxiedConnection]:
        """The replica's connections through the proxies, oldest first (node by node on a
        shared proxy)."""
        if self.topology == "single":
            return list(self.proxies[replica.name].connections)
        held = loopback_tcp_ports(replica.process.pid)
        return [
            connection
            for proxy in self.node_proxies
            for connection in list(proxy.connections)
            if (connection.client_port, proxy.port) in held
        ]

    def connections(self, replica: Replica, role: str) -> list[ProxiedConnection]:
        """The replica's open connections of ``role``, to any data node: ``reader`` (the
        pipelined hits, which start with ``CLIENT TRACKING``; on a cluster, one to each primary),
        ``subscriber`` (the near cache's invalidations; one to each primary) or ``pool``
        (redis-py's: writes, invalidations, locks)."""
        markers = {"reader": b"TRACKING", "subscriber": b"SUBSCRIBE"}
        found = []
        for connection in self._proxied_connections(replica):
            if not connection.open:
                continue
            marker = markers.get(role)
            if marker is None:
                if not any(m in connection.sent for m in markers.values()):
                    found.append(connection)
            elif marker in connection.sent:
                found.append(connection)
        return found

    def end_network_faults(self) -> None:
        """Every connection with a fault on closed, on both sides (the replica reconnects)."""
        for proxy in [*self.proxies.values(), *self.node_proxies]:
            for connection in list(proxy.connections):
                if connection.faulty:
                    connection.close()

    def pause(self) -> None:
        """SIGSTOP on every data node: the whole topology black-holed."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.pause()
        self.paused = True

    def pause_sentinels(self) -> None:
        """SIGSTOP on the Sentinel: it accepts connections and answers nothing."""
        assert self.sentinel is not None
        self.sentinel.pause_sentinel()
        self.sentinels_paused = True

    def resume(self) -> None:
        if self.sentinels_paused and self.sentinel is not None:
            self.sentinel.resume_sentinel()
            self.sentinels_paused = False
        if self.paused:
            for node in self.nodes:
                if node.process is not None and node.process.poll() is None:
                    node.resume()
            self.paused = False

    async def kill(self, *, keep_data: bool = False) -> None:
        """SIGKILL of the single server (the ``single`` topology's fault); ``keep_data``: what
        it holds is saved first (``SAVE``), and :meth:`restart` brings it back, as a Redis
        with persistence comes back after a crash."""
        assert self.topology == "single"
        if keep_data:
            await asyncio.to_thread(self.redis.command, "SAVE")
        self.paused = False
        self.down = True
        await asyncio.to_thread(self.redis.kill)

    async def restart(self) -> None:
        """Starts Redis again on the same port after :meth:`kill` (or if it exited by itself):
        empty, unless the kill kept its data. The other topologies' killed nodes are started
        again by :meth:`rejoin`."""
        if self.topology != "single":
            return
        process = self.redis.process
        if self.down or process is None or process.poll() is not None:
            await asyncio.to_thread(self._start_again, self.redis)
            self.down = False
        # Loaded, if there was any: the next start is empty again.
        if self.redis.data_dir is not None:
            (self.redis.data_dir / "dump.rdb").unlink(missing_ok=True)

    @classmethod
    def _start_again(cls, node: RedisServer) -> None:
        node.kill()  # closes what is left of the old process
        node.start()
        cls.quick_sync(node)

    @staticmethod
    def quick_sync(node: RedisServer) -> None:
        """No wait before a full resynchronisation (``repl-diskless-sync-delay`` is 5 s by
        default): a node that rejoins as a replica is in sync within a step."""
        node.command("CONFIG", "SET", "repl-diskless-sync-delay", "0")

    @staticmethod
    def is_dead(node: RedisServer) -> bool:
        return node.process is None or node.process.poll() is not None

    async def rejoin(self) -> None:
        """Cluster and Sentinel: every killed node started again (with its cluster
        configuration: it rejoins as a replica of the node that took over), and the topology
        settled: every node linked, the Sentinel naming a master with its replica."""
        for node in self.nodes:
            if self.is_dead(node):
                await asyncio.to_thread(self._start_again, node)
        if self.cluster is not None:
            # Once, after a switch-over and a slot migration, it did not settle within 30 s (the
            # cause is not known yet: the timeout's message now names the nodes and why).
            await asyncio.to_thread(self.cluster.wait_until_healthy, 60.0)
        if self.sentinel is not None:
            await asyncio.to_thread(self.settle_sentinel, 30.0)

    def sentinel_master(self) -> RedisServer:
        """The server the Sentinel names as master."""
        assert self.sentinel is not None
        return self.sentinel.server_at(self.sentinel.master_port())

    def settle_sentinel(self, timeout: float) -> None:
        """Waits until the Sentinel names a master that says it is one, and the other server
        replicates it. An old master (restarted, or demoted by a switch-over) is told to
        replicate the new one at once, as the Sentinel itself does only after 8 s or more."""
        assert self.sentinel is not None
        # Ports as the Sentinel knows the servers: their proxies'.
        known_as = self.sentinel.announced_port
        deadline = time.monotonic() + timeout
        told: set[int] = set()
        while True:
            port = self.sentinel.master_port()
            servers = self.sentinel.servers
            for server in servers:
                if port is None or known_as(server) == port or server.port in told:
                    continue
                if info_field(server, "replication", "master_port") != str(port):
                    server.command("REPLICAOF", "127.0.0.1", port)
                    told.add(server.port)
            settled = port is not None and all(
                info_field(s, "replication", "role")
                == ("master" if known_as(s) == port else "slave")
                and (
                    known_as(s) == port
                    or (
                        info_field(s, "replication", "master_link_status") == "up"
                        and info_field(s, "replication", "master_port") == str(port)
                    )
                )
                for s in servers
            )
            # A replica whose link is up counts for WAIT only after its first acknowledgement,
            # up to a second later: until then the world's first invalidations would degrade.
            settled = settled and self.sentinel.server_at(port).replicas_confirm(1)
            # A Sentinel refuses a new failover (INPROG) until the last one is over.
            over = b"failover_in_progress" not in self._sentinel_node().command(
                "SENTINEL", "MASTER", self.sentinel.master_name
            )
            if settled and over and self.sentinel.replica_count() >= 1:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the Sentinel set-up did not settle in time")
            time.sleep(0.05)

    @staticmethod
    def _serves_slots(node: RedisServer) -> bool:
        """Whether a cluster node serves slots by its own account (a primary that was failed
        over can call itself one, without slots, for a moment)."""
        for line in bulk_text(node.command("CLUSTER", "NODES")).splitlines():
            fields = line.split()
            if len(fields) > 2 and "myself" in fields[2]:
                return len(fields) > 8
        return False

    def _sentinel_node(self) -> RedisServer:
        assert self.sentinel is not None
        assert self.sentinel.sentinel is not None
        return self.sentinel.sentinel

    def primaries(self) -> list[RedisServer]:
        """The nodes that take writes now: every cluster primary, the Sentinel's master, or the
        single server."""
        if self.cluster is not None:
            return sorted(
                (node for node in self.cluster.current_primaries() if self._serves_slots(node)),
                key=lambda node: node.port,
            )
        if self.sentinel is not None:
            return [self.sentinel_master()]
        return [self.redis]

    async def _empty_primaries(self) -> None:
        """Every primary in its default configuration and empty. A failover's old primary may
        still call itself one for a moment (a write then answers READONLY): asked again."""
        deadline = time.monotonic() + 15.0
        while True:
            primaries = await asyncio.to_thread(self.primaries)
            try:
                for node in primaries:
                    admin = self.node_admin(node)
                    try:
                        await admin.config_set("maxmemory", 0)
                        await admin.config_set("maxmemory-policy", DEFAULT_POLICY)
                        await admin.flushall()
                    finally:
                        await admin.aclose()
                return
            except ReadOnlyError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def heal(self) -> None:
        """Every fault healed, Redis empty and in its default configuration, both replicas on
        Redis with nothing pending."""
        self.check_alive()
        self.resume()
        await asyncio.to_thread(self.end_network_faults)
        await self.restart()
        if self.topology != "single":
            await self.rejoin()
        await self._empty_primaries()
        deadline = time.monotonic() + 15.0
        async with httpx.AsyncClient(timeout=1.0) as client:
            while True:
                states = [
                    (await client.get(f"{replica.url}/_status")).json() for replica in self.replicas
                ]
                if all(s["backend"] == "redis" and not s["pending_invalidations"] for s in states):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the replicas did not come back to Redis: {states}")
                await asyncio.sleep(0.05)


@pytest.fixture(scope="module", params=selected_topologies())
def model_world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """One world per topology, shared by the module's tests (pytest orders the tests so that
    each world is started once)."""
    topology = str(request.param)
    if topology == "cluster" and redis_server_version(find_redis_server()) < (7,):
        pytest.skip("the cluster world needs redis-server 7+")
    world = World(tmp_path_factory.mktemp(f"model-check-{topology}"), topology=topology)
    try:
        world.start()
        yield world
    finally:
        world.stop()


# -- the windows' summary, printed at the end of the run ------------------------------------------

_window_logs = pytest.StashKey[list[tuple[str, WindowLog]]]()


@pytest.fixture
def window_log(request: pytest.FixtureRequest) -> WindowLog:
    """Gathers the excused old reads of one test; printed in the terminal summary."""
    log = WindowLog()
    request.config.stash.setdefault(_window_logs, []).append((request.node.nodeid, log))
    return log


def _summary_sections(config: pytest.Config) -> list[tuple[str, list[str]]]:
    return [
        (f"model check windows: {nodeid}", log.lines())
        for nodeid, log in config.stash.get(_window_logs, [])
    ]


def pytest_sessionfinish(session: pytest.Session) -> None:
    # In a pytest-xdist worker nothing it prints is seen: its sections go to the controller,
    # which prints them (commons/tests/conftest.py, ``pytest_terminal_summary``).
    worker_output = getattr(session.config, "workeroutput", None)
    if worker_output is not None:
        worker_output["terminal_sections"] = _summary_sections(session.config)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    for title, lines in _summary_sections(config):
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)
