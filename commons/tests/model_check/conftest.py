"""The model check's world: one ``redis-server`` and two replica processes, shared by every example.

Starting them costs seconds, so the module starts them once (``model_world``); between examples
every fault is healed, Redis is emptied and both replicas are back on Redis (:meth:`World.heal`).
Each replica is ``replica_app.py`` under uvicorn on a free loopback port, with the cache's
timeouts made small so that faults play out within a step or two.
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

from commons.testing.model_oracle import Bounds, WindowLog
from commons.testing.redis_server import RedisServer, free_port

APP = Path(__file__).with_name("replica_app.py")
PREFIX = "mc"
#: The cache's settings in every replica: small, so that an outage and its recovery take a
#: fraction of a second.
SOCKET_TIMEOUT_SECONDS = 0.2
CONNECT_TIMEOUT_SECONDS = 0.2
RECOVERY_INTERVAL_SECONDS = 0.3
DEGRADED_TTL_SECONDS = 2
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


def replica_env(redis_url: str, db_path: Path, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHE_", "REDIS_"))}
    env.update(
        {
            "REDIS_URL": redis_url,
            "CACHE_PREFIX": PREFIX,
            "CACHE_TTL_SECONDS": str(TTL_SECONDS),
            "REDIS_SOCKET_TIMEOUT_SECONDS": str(SOCKET_TIMEOUT_SECONDS),
            "REDIS_CONNECT_TIMEOUT_SECONDS": str(CONNECT_TIMEOUT_SECONDS),
            "CACHE_RECOVERY_INTERVAL_SECONDS": str(RECOVERY_INTERVAL_SECONDS),
            "CACHE_DEGRADED_TTL_SECONDS": str(DEGRADED_TTL_SECONDS),
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


@dataclass
class Replica:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    log: Any

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
    """Redis, the replicas, and the faults the driver injects into Redis."""

    workdir: Path
    prefix: str = PREFIX
    bounds: Bounds = BOUNDS
    max_delay_ms: int = MAX_DELAY_MS
    redis: RedisServer = field(default_factory=RedisServer)
    replicas: list[Replica] = field(default_factory=list)
    paused: bool = False
    down: bool = False

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> World:
        self.redis.start()
        db_path = self.workdir / "data.sqlite"
        create_database(db_path)
        for name in REPLICA_NAMES:
            port = free_port()
            log_path = self.workdir / f"replica-{name}.log"
            log = log_path.open("wb")
            process = subprocess.Popen(
                [sys.executable, str(APP), str(port)],
                env=replica_env(self.redis.url, db_path, name),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
            self.replicas.append(Replica(name, port, process, log_path, log))
        for replica in self.replicas:
            self._wait_until_serving(replica)
        return self

    def _wait_until_serving(self, replica: Replica, timeout: float = 30.0) -> None:
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
                if status is not None and status["backend"] == "redis":
                    return
                time.sleep(0.05)
        raise RuntimeError(f"replica {replica.name} did not start:\n{replica.log_tail()}")

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()
        self.redis.stop()

    def check_alive(self) -> None:
        for replica in self.replicas:
            if replica.process.poll() is not None:
                raise RuntimeError(f"replica {replica.name} exited:\n{replica.log_tail()}")

    # -- faults (called from the example's event loop) ---------------------------------------

    def admin(self) -> Redis:
        """A client of our own for the driver's Redis commands (never one of the replicas')."""
        return Redis(
            host=self.redis.host,
            port=self.redis.port,
            socket_timeout=5,
            socket_connect_timeout=5,
        )

    def pause(self) -> None:
        self.redis.pause()
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.redis.resume()
            self.paused = False

    async def kill(self) -> None:
        self.paused = False
        self.down = True
        await asyncio.to_thread(self.redis.kill)

    async def restart(self) -> None:
        """Starts Redis again on the same port, empty (no persistence), after :meth:`kill` (or
        if it exited by itself)."""
        process = self.redis.process
        if self.down or process is None or process.poll() is not None:
            await asyncio.to_thread(self._start_again)
            self.down = False

    def _start_again(self) -> None:
        self.redis.kill()  # closes what is left of the old process
        self.redis.start()

    async def heal(self) -> None:
        """Every fault healed, Redis empty and in its default configuration, both replicas on
        Redis with nothing pending."""
        self.check_alive()
        self.resume()
        await self.restart()
        admin = self.admin()
        try:
            await admin.config_set("maxmemory", 0)
            await admin.config_set("maxmemory-policy", DEFAULT_POLICY)
            await admin.flushall()
        finally:
            await admin.aclose()
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


@pytest.fixture(scope="module")
def model_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    world = World(tmp_path_factory.mktemp("model-check"))
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


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    logs = config.stash.get(_window_logs, [])
    for nodeid, log in logs:
        terminalreporter.section(f"model check windows: {nodeid}")
        for line in log.lines():
            terminalreporter.write_line(line)
