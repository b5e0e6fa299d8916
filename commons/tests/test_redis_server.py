"""The test kit's redis-server processes: started on private ports, whatever else takes one."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from commons.testing import redis_cluster
from commons.testing.redis_cluster import LocalRedisCluster
from commons.testing.redis_server import (
    PortTakenError,
    RedisServer,
    find_redis_server,
    free_port,
    redis_server_version,
)


def _squat(port: int) -> socket.socket:
    """A socket listening on ``port``, as another process's server or a client's port would."""
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    return squatter


def test_a_server_whose_chosen_port_was_taken_meanwhile_starts_on_another() -> None:
    # Between picking a free port and the server's bind, another socket may be given it: the
    # server exited at start with "Address already in use" (logged to its stdout, unread).
    server = RedisServer()
    taken = server.port
    with _squat(taken), server:
        assert server.port != taken
        assert server.answers_ping()
        assert server.command("PING") == b"+PONG\r\n"


def test_a_server_given_a_taken_port_says_so_and_leaves_the_choice_to_its_owner() -> None:
    port = free_port()
    with _squat(port):
        server = RedisServer(port=port)
        with pytest.raises(PortTakenError, match=f"port {port} taken"):
            server.start()
        server.stop()


def test_a_restart_keeps_its_port_and_fails_when_it_is_taken() -> None:
    # Its clients know the address: moving would leave them talking to whatever took it.
    with RedisServer() as server:
        port = server.port
        server.kill()
        with _squat(port), pytest.raises(RuntimeError, match="exited at start") as refused:
            server.start()
        assert not isinstance(refused.value, PortTakenError)
        assert server.port == port
        server.start()
        assert server.answers_ping()


def test_a_cluster_node_whose_ports_were_taken_starts_on_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    binary = find_redis_server()
    if redis_server_version(binary) < (7,):
        pytest.skip(f"the cluster fixture needs redis-server 7+ ({binary} is older)")
    taken = free_port()
    squatter = _squat(taken)

    def ports() -> Iterator[int]:
        yield taken  # the first node's port: taken by the time it binds
        while True:
            yield free_port()

    chosen = ports()
    monkeypatch.setattr(redis_cluster, "free_port", lambda: next(chosen))
    cluster = LocalRedisCluster(primaries=3, replicas_per_primary=0)
    try:
        cluster.start()
        assert taken not in [node.port for node in cluster.nodes]
        assert len(cluster.nodes) == 3
        assert all(node.answers_ping() for node in cluster.nodes)
    finally:
        cluster.stop()
        squatter.close()
