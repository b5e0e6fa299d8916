"""The test kit's service process: a worker the tests start, stop and kill."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import httpx

from commons.testing.service_process import ServiceProcess


def test_a_first_start_whose_port_was_taken_meanwhile_serves_on_another(
    replica_processes: Callable[..., ServiceProcess], redis_url: str, tmp_path: Path
) -> None:
    # Between picking a free port and binding it, another socket (a test's own client
    # connection) may be given it: the replica then failed at start-up, "address already in use".
    replica = replica_processes(
        REDIS_URL=redis_url, CACHE_PREFIX="kit", REPLICA_DB=str(tmp_path / "kit.db")
    )
    taken = replica.port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()

        replica.start()

        assert replica.port != taken
        assert httpx.get(f"{replica.url}/health", timeout=5).status_code == 200
