"""A private Redis Cluster (primaries, each with replicas) for tests and benchmarks.

The fixture does what ``redis-cli --cluster create`` would, with raw commands only, so a machine
with nothing but ``redis-server`` runs it: every node starts with ``cluster-enabled yes`` on free
loopback ports (client and bus port both chosen, ``cluster-port``, Redis 7+), meets the first node
(``CLUSTER MEET``), the primaries take equal slot ranges (``CLUSTER ADDSLOTSRANGE``), each replica
follows its primary (``CLUSTER REPLICATE``), and :meth:`RedisCluster.start` returns once every node
reports ``cluster_state:ok`` and every replica's link is up.

``proxied=True`` puts a :class:`~commons.testing.proxy.LoopbackProxy` in front of every node, and
the node announces the proxy's port (``cluster-announce-port``; its cluster bus is announced as it
is, ``cluster-announce-bus-port``): the slot map names the proxies, so every client (and a
replica's link to its primary) reaches every node through one, and a test can fault one
connection. The announcement is in the node's arguments: a node killed and started again on its
port announces it again, and its proxy, which keeps forwarding to that port, follows it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from redis.crc import key_slot

from commons.testing.proxy import LoopbackProxy, start_or_let_go
from commons.testing.redis_server import RedisServer, free_port, started_on_free_ports

__all__ = ["SLOTS", "LocalRedisCluster", "bulk_text", "info_field"]

#: Slots of a Redis Cluster.
SLOTS = 16384


def bulk_text(reply: bytes) -> str:
    """The text of a raw RESP reply (a bulk string or a status line); raises on an error reply."""
    if reply.startswith(b"-"):
        raise RuntimeError(reply.decode().strip())
    if reply.startswith(b"$"):
        _, _, body = reply.partition(b"\r\n")
        return body.rstrip(b"\r\n").decode()
    return reply[1:].decode().strip()


def info_field(server: RedisServer, section: str, name: str) -> str:
    """One field of ``INFO <section>``, or of ``CLUSTER INFO`` for the section ``cluster``."""
    command = ("CLUSTER", "INFO") if section == "cluster" else ("INFO", section)
    try:
        reply = server.command(*command)
    except ConnectionError:
        # A server whose role a Sentinel switches closes its clients' connections (CLIENT KILL
        # TYPE normal), a poll's among them: it is asked once more.
        reply = server.command(*command)
    for line in bulk_text(reply).splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return ""


@dataclass
class LocalRedisCluster:
    """``primaries`` primaries with ``replicas_per_primary`` replicas each, on loopback.

    Args:
        primaries: Number of primaries; the slots are split evenly between them.
        replicas_per_primary: Replicas of each primary.
        node_timeout_ms: ``cluster-node-timeout``: how soon a silent primary is failed over.
        proxied: Whether clients reach each node through a proxy of its own (module docstring).
    """

    primaries: int = 3
    replicas_per_primary: int = 1
    node_timeout_ms: int = 1000
    proxied: bool = False
    nodes: list[RedisServer] = field(default_factory=list)
    #: With ``proxied``, each node's proxy, by the node's port.
    proxies: dict[int, LoopbackProxy] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """A ``redis://`` URL of one running node (a cluster client discovers the rest); with
        ``proxied``, of its proxy."""
        node = next(node for node in self.nodes if node.process is not None)
        return self.proxies[node.port].url if self.proxied else node.url

    def start(self, timeout: float = 30.0) -> LocalRedisCluster:
        total = self.primaries * (1 + self.replicas_per_primary)
        try:
            for _ in range(total):
                self.nodes.append(started_on_free_ports(self._start_node_on_free_ports))
            self._assemble(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node_on_free_ports(self) -> RedisServer:
        port = free_port()
        bus_port = free_port()
        while bus_port == port:
            bus_port = free_port()
        announced: list[str] = []
        if self.proxied:
            proxy = self.proxies[port] = LoopbackProxy(port).start()
            announced = [
                "--cluster-announce-port",
                str(proxy.port),
                "--cluster-announce-bus-port",
                str(bus_port),
            ]
        node = RedisServer(
            port=port,
            extra_args=[
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(bus_port),
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                # A replica takes over even if its link was down for a while.
                "--cluster-replica-validity-factor",
                "0",
                *announced,
            ],
        )
        return start_or_let_go(node, self.proxies)

    def _assemble(self, timeout: float) -> None:
        first = self.nodes[0]
        for node in self.nodes[1:]:
            bulk_text(first.command("CLUSTER", "MEET", node.host, node.port, _bus_port(node)))
        per_primary = SLOTS // self.primaries
        for index, primary in enumerate(self.nodes[: self.primaries]):
            low = index * per_primary
            high = SLOTS - 1 if index == self.primaries - 1 else low + per_primary - 1
            bulk_text(primary.command("CLUSTER", "ADDSLOTSRANGE", low, high))
        deadline = time.monotonic() + timeout
        self._wait(
            lambda: all(self._known_nodes(n) == len(self.nodes) for n in self.nodes), deadline
        )
        if self.proxied:
            # A node met by its own port is named by the port it announces once it is heard.
            self._wait(lambda: all(self._names_proxies(n) for n in self.nodes), deadline)
        replicas = self.nodes[self.primaries :]
        for index, replica in enumerate(replicas):
            primary = self.nodes[index % self.primaries]
            bulk_text(replica.command("CLUSTER", "REPLICATE", self.node_id(primary)))
        self.wait_until_healthy(deadline - time.monotonic())

    def wait_until_healthy(self, timeout: float = 30.0) -> None:
        """Waits until every running node says ``cluster_state:ok`` and every replica is linked."""
        deadline = time.monotonic() + timeout

        def healthy() -> bool:
            return not self._unhealthy()

        try:
            self._wait(healthy, deadline)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {'; '.join(self._unhealthy())}") from None

    def _unhealthy(self) -> list[str]:
        """Why the cluster is not healthy yet, per node (empty: it is)."""
        running = [n for n in self.nodes if n.process is not None and n.answers_ping()]
        if not running:
            return ["no node answers"]
        found = []
        for node in running:
            state = info_field(node, "cluster", "cluster_state")
            if state != "ok":
                found.append(f"{node.port}: cluster_state {state}")
            role = info_field(node, "replication", "role")
            link = info_field(node, "replication", "master_link_status")
            if role == "slave" and link != "up":
                master = info_field(node, "replication", "master_port")
                found.append(f"{node.port}: replica of {master}, link {link}")
            replicas = int(info_field(node, "replication", "connected_slaves") or 0)
            if role == "master" and replicas:
                probe = self._probe_key(node)
                if probe is None or not node.replicas_confirm(replicas, probe_key=probe):
                    found.append(f"{node.port}: {replicas} replica(s) not confirming writes yet")
        return found

    @staticmethod
    def _probe_key(node: RedisServer) -> bytes | None:
        """A key in one of ``node``'s slots (``None`` when it owns none), to probe with a write."""
        mine = next(
            (
                line
                for line in bulk_text(node.command("CLUSTER", "NODES")).splitlines()
                if "myself" in line.split()[2]
            ),
            "",
        )
        ranges = []
        for part in mine.split()[8:]:
            if part.startswith("["):
                continue  # a slot being migrated or imported
            first, _, last = part.partition("-")
            ranges.append((int(first), int(last or first)))
        if not ranges:
            return None
        for n in range(100_000):
            key = b"__replication_probe__%d" % n
            if any(first <= key_slot(key) <= last for first, last in ranges):
                return key
        return None

    @staticmethod
    def _wait(condition: object, deadline: float) -> None:
        assert callable(condition)
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not become ready in time")
            time.sleep(0.05)

    def _names_proxies(self, node: RedisServer) -> bool:
        """Whether ``node``'s view of the cluster gives every node its proxy's port."""
        view = bulk_text(node.command("CLUSTER", "NODES"))
        return all(f":{proxy.port}@" in view for proxy in self.proxies.values())

    @staticmethod
    def _known_nodes(node: RedisServer) -> int:
        return int(info_field(node, "cluster", "cluster_known_nodes") or 0)

    @staticmethod
    def node_id(node: RedisServer) -> str:
        return bulk_text(node.command("CLUSTER", "MYID"))

    def role(self, node: RedisServer) -> str:
        """``master`` or ``slave``, as the node itself reports."""
        return info_field(node, "replication", "role")

    def current_primaries(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.answers_ping() and self.role(n) == "master"]

    def replica_of(self, primary: RedisServer) -> RedisServer:
        """A running replica of ``primary``."""
        primary_id = self.node_id(primary)
        for node in self.nodes:
            if node is primary or not node.answers_ping():
                continue
            if self.role(node) == "slave":
                own = self.node_id(node)
                for line in bulk_text(node.command("CLUSTER", "NODES")).splitlines():
                    fields = line.split()
                    if fields and fields[0] == own and fields[3] == primary_id:
                        return node
        raise LookupError("the primary has no running replica")

    def owner_of_slot(self, slot: int) -> RedisServer:
        """The running primary that serves ``slot``."""
        for node in self.current_primaries():
            for line in bulk_text(node.command("CLUSTER", "NODES")).splitlines():
                fields = line.split()
                if "myself" not in fields[2]:
                    continue
                for part in fields[8:]:
                    low, _, high = part.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return node
        raise LookupError(f"no running primary serves slot {slot}")

    def key_slot(self, key: str | bytes) -> int:
        return int(bulk_text(self.nodes[0].command("CLUSTER", "KEYSLOT", key)))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()
        for proxy in self.proxies.values():
            proxy.stop()
        self.proxies.clear()

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bus_port(node: RedisServer) -> int:
    args = list(node.extra_args)
    return int(args[args.index("--cluster-port") + 1])
