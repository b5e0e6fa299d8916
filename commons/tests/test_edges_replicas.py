"""Two replicas on one Redis: once a write has returned on one, no replica answers older data.

Each replica is a uvicorn process serving ``replica_app.py``; both share one Redis and one SQLite
file. A GET on replica A reads v1 and is still computing when replica B commits v2 and
invalidates; A's answer (v1, read before the write) must not become the cached answer that every
later GET receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

ROUNDS = 5
#: When B's write starts, after A's GET (which reads at once, then takes 1 s to answer).
WRITE_AFTER_SECONDS = 0.3

pytestmark = pytest.mark.slow


@pytest.fixture
def replicas(redis_url: str, start_replicas: Callable[..., list[str]], tmp_path: Path) -> list[str]:
    """Two replicas of ``replica_app`` on the session's Redis; their base URLs."""
    database = tmp_path / "replicas.sqlite"
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.execute("CREATE TABLE IF NOT EXISTS res (tenant TEXT PRIMARY KEY, version INTEGER)")
    return start_replicas(
        REDIS_URL=redis_url, CACHE_PREFIX="replica-test", REPLICA_DB=str(database)
    )


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
