"""A private Redis Sentinel set-up: one master, one replica, one Sentinel, all on loopback.

``proxied=True`` puts a :class:`~commons.testing.proxy.LoopbackProxy` in front of each server:
the Sentinel monitors the master at its proxy's port, each server announces its proxy's port as a
replica (``replica-announce-port``), so the Sentinel names proxies only, and clients (the
replica's link to its master, the Sentinel's own connections) reach the servers through them. A
test can then fault one connection to whichever server is master. The announcement is in the
server's arguments: a server killed and started again on its port announces it again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from commons.testing.proxy import LoopbackProxy, start_or_let_go
from commons.testing.redis_cluster import info_field
from commons.testing.redis_server import (
    RedisServer,
    find_redis_server,
    free_port,
    started_on_free_ports,
)

__all__ = ["LocalSentinel"]


@dataclass
class LocalSentinel:
    """A master and its replica, watched by one Sentinel (quorum 1) under ``master_name``;
    ``proxied``: each server behind a proxy of its own (module docstring)."""

    master_name: str = "cache-master"
    proxied: bool = False
    servers: list[RedisServer] = field(default_factory=list)
    #: With ``proxied``, each server's proxy, by the server's port.
    proxies: dict[int, LoopbackProxy] = field(default_factory=dict)
    sentinel: RedisServer | None = None
    _sentinel_process: subprocess.Popen[bytes] | None = None
    _workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def sentinels(self) -> str:
        """The ``REDIS_SENTINELS`` value."""
        assert self.sentinel is not None
        return f"127.0.0.1:{self.sentinel.port}"

    def start(self, timeout: float = 20.0) -> LocalSentinel:
        try:
            master = self._started_server()
            self.servers.append(master)
            replica = self._started_server(
                ["--replicaof", master.host, str(self.announced_port(master))]
            )
            self.servers.append(replica)
            deadline = time.monotonic() + timeout
            while info_field(
                replica, "replication", "master_link_status"
            ) != "up" or not master.replicas_confirm(1):
                if time.monotonic() > deadline:
                    raise RuntimeError("the replica did not sync with its master in time")
                time.sleep(0.05)
            self._start_sentinel(master)
            self.wait_for_master(master, deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        return self

    def _started_server(self, extra_args: list[str] | None = None) -> RedisServer:
        """A server started, with its proxy if ``proxied`` (on other ports when one was taken
        meanwhile)."""
        return started_on_free_ports(lambda: self._start_server(extra_args or []))

    def _start_server(self, extra_args: list[str]) -> RedisServer:
        port, announced = free_port(), []
        if self.proxied:
            proxy = self.proxies[port] = LoopbackProxy(port).start()
            announced = ["--replica-announce-port", str(proxy.port)]
        server = RedisServer(port=port, extra_args=[*announced, *extra_args])
        return start_or_let_go(server, self.proxies)

    def announced_port(self, server: RedisServer) -> int:
        """The port the Sentinel and clients know ``server`` by: its proxy's, if ``proxied``."""
        return self.proxies[server.port].port if self.proxied else server.port

    def server_at(self, port: int | None) -> RedisServer:
        """The server the Sentinel knows by ``port`` (see :meth:`announced_port`)."""
        return next(s for s in self.servers if self.announced_port(s) == port)

    def _start_sentinel(self, master: RedisServer) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="redis-sentinel-")
        port = free_port()
        config = Path(self._workdir.name) / "sentinel.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self._workdir.name}\n"
            f"sentinel monitor {self.master_name} {master.host} {self.announced_port(master)} 1\n"
            f"sentinel down-after-milliseconds {self.master_name} 1000\n"
            f"sentinel failover-timeout {self.master_name} 5000\n",
            encoding="utf-8",
        )
        self._sentinel_process = subprocess.Popen(  # noqa: S603 - our binary and config
            [find_redis_server(), str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.sentinel = RedisServer(port=port)

    def master_port(self) -> int | None:
        """The master's port as the Sentinel reports it (its proxy's, if ``proxied``)."""
        assert self.sentinel is not None
        if not self.sentinel.answers_ping():
            return None
        reply = self.sentinel.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        parts = reply.split(b"\r\n")
        return int(parts[4]) if len(parts) > 4 and parts[4].isdigit() else None

    def replica_count(self) -> int:
        assert self.sentinel is not None
        reply = self.sentinel.command("SENTINEL", "REPLICAS", self.master_name)
        return int(reply[1:].split(b"\r\n", 1)[0]) if reply.startswith(b"*") else 0

    def wait_for_master(self, server: RedisServer, timeout: float = 20.0) -> None:
        """Waits until the Sentinel names ``server`` as master and knows its replica."""
        deadline = time.monotonic() + timeout
        while self.master_port() != self.announced_port(server) or self.replica_count() < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the Sentinel did not settle in time")
            time.sleep(0.05)

    def failover(self, timeout: float = 20.0) -> RedisServer:
        """``SENTINEL FAILOVER``; returns the promoted server once it is master and writable."""
        assert self.sentinel is not None
        old = self.master_port()
        deadline = time.monotonic() + timeout
        # Until the Sentinel has read the replica's own INFO it answers NOGOODSLAVE: ask again.
        while self.sentinel.command("SENTINEL", "FAILOVER", self.master_name).startswith(
            b"-NOGOODSLAVE"
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the Sentinel found no replica to promote in time")
            time.sleep(0.1)
        while self.master_port() in (old, None):
            if time.monotonic() > deadline:
                raise RuntimeError("the Sentinel failover did not complete in time")
            time.sleep(0.05)
        promoted = self.server_at(self.master_port())
        while info_field(promoted, "replication", "role") != "master":
            if time.monotonic() > deadline:
                raise RuntimeError("the promoted replica did not become master in time")
            time.sleep(0.05)
        return promoted

    def pause_sentinel(self) -> None:
        """SIGSTOP the Sentinel: it accepts connections and answers nothing (a black hole)."""
        assert self._sentinel_process is not None
        os.kill(self._sentinel_process.pid, signal.SIGSTOP)

    def resume_sentinel(self) -> None:
        """SIGCONT after :meth:`pause_sentinel`."""
        assert self._sentinel_process is not None
        os.kill(self._sentinel_process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self._sentinel_process is not None:
            os.kill(self._sentinel_process.pid, signal.SIGCONT)
            self._sentinel_process.terminate()
            try:
                self._sentinel_process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._sentinel_process.kill()
                self._sentinel_process.wait(timeout=10)
            self._sentinel_process = None
        for server in self.servers:
            server.stop()
        self.servers.clear()
        for proxy in self.proxies.values():
            proxy.stop()
        self.proxies.clear()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> LocalSentinel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
