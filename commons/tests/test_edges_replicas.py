"""Two replicas on one Redis: once a write has returned on one, no replica answers older data.

Each replica is a uvicorn process serving ``replica_app.py``; both share one Redis and one SQLite
file. A GET on replica A reads v1 and is still computing when replica B commits v2 and
invalidates; A's answer (v1, read before the write) must not become the cached answer that every
later GET receives.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from commons.testing.redis_server import free_port

TESTS_DIR = Path(__file__).resolve().parent
ROUNDS = 5
#: When B's write starts, after A's GET (which reads at once, then takes 1 s to answer).
WRITE_AFTER_SECONDS = 0.3

pytestmark = pytest.mark.slow


def wait_until_ready(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"replica exited at start-up:\n{log.read_text()}")
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"replica at {base_url} did not start:\n{log.read_text()}")


@pytest.fixture
def replicas(redis_url: str, tmp_path: Path) -> Iterator[list[str]]:
    """Two replicas of ``replica_app`` on the session's Redis; yields their base URLs."""
    database = tmp_path / "replicas.sqlite"
    with sqlite3.connect(database) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS res (tenant TEXT PRIMARY KEY, version INTEGER)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHE_", "REDIS_"))}
    env.update(REDIS_URL=redis_url, CACHE_PREFIX="replica-test", REPLICA_DB=str(database))
    started: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    try:
        for index in range(2):
            port = free_port()
            log = tmp_path / f"replica-{index}.log"
            with log.open("wb") as output:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        "replica_app:app",
                        "--app-dir",
                        str(TESTS_DIR),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--log-level",
                        "warning",
                    ],
                    env=env,
                    cwd=tmp_path,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            started.append((f"http://127.0.0.1:{port}", process, log))
        for base_url, process, log in started:
            wait_until_ready(base_url, process, log)
        yield [base_url for base_url, _, _ in started]
    finally:
        for _, process, _ in started:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)


async def test_after_a_write_returns_no_replica_caches_the_answer_computed_before_it(
    replicas: list[str],
) -> None:
    """Per round (a fresh tenant each): A's GET reads v1 and is computing; 0.3 s later B's PUT
    commits v2, invalidates and returns; once A's GET has answered, a GET on A and a GET on B
    both answer v2. Five rounds."""
    replica_a, replica_b = replicas
    rounds: list[dict[str, object]] = []
    async with (
        httpx.AsyncClient(base_url=replica_a, timeout=30) as a,
        httpx.AsyncClient(base_url=replica_b, timeout=30) as b,
    ):
        for _ in range(ROUNDS):
            tenant = {"X-Test-Tenant": f"t-{uuid.uuid4().hex[:12]}"}
            first = asyncio.create_task(a.get("/res", headers=tenant))
            await asyncio.sleep(WRITE_AFTER_SECONDS)
            write = await b.put("/res", headers=tenant)
            during_write = await first
            on_a, on_b = await asyncio.gather(
                a.get("/res", headers=tenant), b.get("/res", headers=tenant)
            )
            rounds.append(
                {
                    "write": write.json(),
                    "during_write": during_write.json(),
                    "after": (on_a.json(), on_b.json()),
                }
            )

    assert [r["write"] for r in rounds] == [{"version": 2}] * ROUNDS
    assert [r["during_write"] for r in rounds] == [{"version": 1}] * ROUNDS
    stale = sum(r["after"] != ({"version": 2}, {"version": 2}) for r in rounds)
    assert [r["after"] for r in rounds] == [({"version": 2}, {"version": 2})] * ROUNDS, (
        f"{stale} of {ROUNDS} rounds answered old data after the write"
    )
