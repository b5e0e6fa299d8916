"""Ending the processes tests start (servers, service workers): politely, then for sure; and
which TCP connections such a process holds."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["loopback_tcp_ports", "stop_process"]


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds; returns once the
    process is gone (a process that already exited is left as it is)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def loopback_tcp_ports(pid: int) -> set[tuple[int, int]]:
    """The (local port, remote port) of each TCP connection process ``pid`` holds (Linux: its
    sockets' inodes in ``/proc/<pid>/fd``, found in its network namespace's ``tcp`` tables).

    A test that puts a proxy between several processes and a server tells with it which of the
    proxy's connections (by the client's port) belong to which process."""
    inodes = set()
    fds = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fds):
        try:
            target = os.readlink(fds / fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout
            # inode ...; addresses are hex "ADDRESS:PORT".
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
                found.add((local, remote))
    return found
