"""Helpers shared by the benchmarks: timing, statistics, Redis and process plumbing, PING monitor.

Nothing here talks to a Redis it did not start: every benchmark runs its own ``redis-server``
(:class:`commons.testing.redis_server.RedisServer`, a free loopback port, no persistence).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` percentile (0..100) of ``values`` by nearest rank; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def fmt_ratio(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}×"
    return f"{value:.2f}×"


def spread(values: Sequence[float]) -> dict[str, float]:
    """The median of ``values`` (each round's ratio) as ``ratio``, the lowest and the highest as
    ``ratio_low`` and ``ratio_high``."""
    if not values:
        nan = float("nan")
        return {"ratio": nan, "ratio_low": nan, "ratio_high": nan}
    return {"ratio": median(values), "ratio_low": min(values), "ratio_high": max(values)}


def fmt_ratio_range(figure: dict[str, float]) -> str:
    """``ratio`` with the lowest and highest rounds' in brackets (see :func:`spread`): on a
    shared machine one round can differ from the next by a third, and a median alone hides how
    close a figure is to its target."""
    low, high = figure["ratio_low"], figure["ratio_high"]
    if low == high or low != low:  # one round, or none
        return fmt_ratio(figure["ratio"])
    return f"{fmt_ratio(figure['ratio'])} ({low:.2f}-{high:.2f})"


def machine_info() -> dict[str, object]:
    """What the numbers were measured on."""
    from commons.testing.redis_server import find_redis_server, redis_server_version

    try:
        redis_version = ".".join(str(p) for p in redis_server_version(find_redis_server()))
    except (RuntimeError, OSError, subprocess.SubprocessError):
        redis_version = "unknown"
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "redis_server": redis_version,
        "loadavg_at_end": load,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def child_env() -> dict[str, str]:
    """Environment for benchmark subprocesses: the repo importable, no stray cache settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHE_", "REDIS_"))}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    )
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def wait_for_port(
    host: str, port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Waits until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on {host}:{port} within {timeout}s")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


# -- PING monitor: a second client, in its own process, PINGing Redis in a tight loop ----------


def _ping_monitor_main(host: str, port: int) -> None:
    """Child side: PING until a line arrives on stdin, then print the latencies as JSON."""
    conn = socket.create_connection((host, port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stdin = sys.stdin.fileno()
    print("ready", flush=True)
    worst = 0.0
    count = 0
    slow: list[float] = []
    started = time.perf_counter()
    while True:
        sent = time.perf_counter()
        conn.sendall(b"PING\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = conn.recv(64)
            if not chunk:
                raise RuntimeError("Redis closed the monitor's connection")
            reply += chunk
        elapsed = time.perf_counter() - sent
        count += 1
        worst = max(worst, elapsed)
        if elapsed > 0.001:
            slow.append(elapsed)
        if count % 64 == 0 and select.select([stdin], [], [], 0)[0]:
            break
    total = time.perf_counter() - started
    print(
        json.dumps(
            {
                "max_ms": worst * 1000,
                "pings": count,
                "over_1ms": len(slow),
                "seconds": total,
            }
        ),
        flush=True,
    )


@contextlib.contextmanager
def ping_monitor(host: str, port: int) -> Iterator[dict[str, float]]:
    """Runs a PING loop in another process while the block runs; fills the dict with its stats.

    A separate process (not a thread) so the benchmark's own GIL never delays a PING.
    """
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from bench._common import _ping_monitor_main as m; "
            "m(sys.argv[1], int(sys.argv[2]))",
            host,
            str(port),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=REPO_ROOT,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    result: dict[str, float] = {}
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("PING monitor did not start")
        time.sleep(0.05)  # let it reach its steady loop before the measured work starts
        yield result
        time.sleep(0.02)
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        result.update(json.loads(line))
        proc.wait(timeout=10)
    finally:
        stop_process(proc)
