"""The invalidation journal: what a process keeps during an outage outlives it.

The process tests run the example replica as uvicorn processes on a Redis that persists its data
(AOF, ``appendfsync always``), with the model check's settings (0.2 s timeouts, 0.3 s recovery
interval, 2 s degraded TTL): Redis is killed, a PUT is acknowledged while it is away, the
process that acknowledged it stops (SIGTERM: its shutdown runs) or is killed (SIGKILL: nothing
runs), Redis comes back with its data, and the process starts again. Without a journal, a
process that starts while Redis is away removes every entry before it reads Redis
(``CACHE_FLUSH_AFTER_DEGRADED_START``): the same stop and kill, restarted during the outage.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import pytest

from commons.cache import CacheSettings, cache_status, close_cache, init_cache
from commons.cache.journal import InvalidationJournal, decode_item, encode_item
from commons.cache.pending import PendingItem
from commons.cache.scope import CacheScope, InvalidationTarget
from commons.testing import current_layer
from commons.testing.redis_server import RedisServer
from commons.testing.service_process import ServiceProcess

#: Redis writes every command to its append-only file before answering it.
PERSISTENT = ["--appendonly", "yes", "--appendfsync", "always"]
#: The model check's settings (see the issue's reproduction).
FAST = {
    "REDIS_SOCKET_TIMEOUT_SECONDS": "0.2",
    "REDIS_CONNECT_TIMEOUT_SECONDS": "0.2",
    "CACHE_RECOVERY_INTERVAL_SECONDS": "0.3",
    "CACHE_DEGRADED_TTL_SECONDS": "2",
}
TENANT = {"X-Test-Tenant": "acme"}

ITEMS: list[PendingItem] = [
    None,
    InvalidationTarget("tenant_config"),
    InvalidationTarget("tenant_config", "acme"),
    InvalidationTarget("profile", "acme", "al:ice \n"),
    ("cache:profile:tenant_acme:/x:0", CacheScope("profile", "acme", None)),
    ("cache:odd key", None),
]


@pytest.mark.parametrize("item", ITEMS, ids=repr)
def test_every_kept_item_reads_back_from_its_journal_line_as_it_was_written(
    item: PendingItem,
) -> None:
    line = encode_item(item)

    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert decode_item(line.rstrip(b"\n")) == item


@pytest.mark.parametrize("line", [b'{"target": ["ns", "t"', b"", b'{"key": 1}', b"[1]"])
def test_a_line_cut_short_or_malformed_reads_as_an_error_not_an_item(line: bytes) -> None:
    assert isinstance(decode_item(line), Exception)


async def test_a_journal_left_by_an_ended_process_is_taken_over_and_removed(
    tmp_path: Path,
) -> None:
    first = InvalidationJournal(tmp_path, "svc")
    assert await first.open() == []
    await first.append(InvalidationTarget("ns", "acme"))
    await first.append(None)
    await first.aclose()  # still kept: the file stays for the next process
    assert first.path is not None
    assert first.path.exists()

    second = InvalidationJournal(tmp_path, "svc")
    assert await second.open() == [InvalidationTarget("ns", "acme"), None]
    assert not first.path.exists()
    await second.rewrite(list)  # all applied
    await second.aclose()
    assert _journal_contents(tmp_path) == []


async def test_a_journal_of_another_service_is_left_to_it(tmp_path: Path) -> None:
    other_service = InvalidationJournal(tmp_path, "svc.other")
    await other_service.open()
    await other_service.append(InvalidationTarget("ns"))
    await other_service.aclose()

    ours = InvalidationJournal(tmp_path, "svc")
    assert await ours.open() == []
    await ours.aclose()
    assert other_service.path is not None
    assert other_service.path.read_bytes() == encode_item(InvalidationTarget("ns"))


async def test_the_journal_of_a_live_process_is_left_to_it(tmp_path: Path) -> None:
    live = InvalidationJournal(tmp_path, "svc")
    await live.open()
    await live.append(InvalidationTarget("ns"))

    other = InvalidationJournal(tmp_path, "svc")
    assert await other.open() == []
    await other.aclose()
    await live.aclose()
    assert live.path is not None
    assert live.path.read_bytes() == encode_item(InvalidationTarget("ns"))


def refusing_writes(journal: InvalidationJournal) -> None:
    """The disk under ``journal`` refuses its writes from now on (full)."""

    def refuse(lines: list[bytes]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    journal._write_sync = refuse  # type: ignore[method-assign]


async def test_a_journal_whose_write_failed_hands_over_a_flush_of_everything(
    tmp_path: Path,
) -> None:
    # Its process kept an invalidation the disk refused: the file cannot name it, and a process
    # taking the file over read nothing and served the old entry once Redis was back.
    first = InvalidationJournal(tmp_path, "svc")
    await first.open()
    await first.append(InvalidationTarget("ns", "early"))
    refusing_writes(first)
    await first.append(InvalidationTarget("ns", "acme"))
    await first.aclose()
    assert first.path is not None
    assert first.path.exists()

    second = InvalidationJournal(tmp_path, "svc")
    taken = await second.open()
    await second.aclose()

    assert InvalidationTarget("ns", "early") in taken
    assert None in taken  # a flush of the whole prefix, kept until Redis takes it
    assert not first.path.exists()


async def test_a_rewrite_of_everything_kept_makes_a_failed_journal_whole_again(
    tmp_path: Path,
) -> None:
    journal = InvalidationJournal(tmp_path, "svc")
    await journal.open()
    write = journal._write_sync
    refusing_writes(journal)
    await journal.append(InvalidationTarget("ns", "acme"))
    journal._write_sync = write  # type: ignore[method-assign]  # room again
    await journal.rewrite(lambda: [InvalidationTarget("ns", "acme")])
    await journal.aclose()

    taker = InvalidationJournal(tmp_path, "svc")
    assert await taker.open() == [InvalidationTarget("ns", "acme")]  # no flush
    await taker.rewrite(list)
    await taker.aclose()
    assert _journal_contents(tmp_path) == []


async def test_init_cache_applies_what_the_journal_kept_before_it_reads_redis(
    tmp_path: Path, make_settings: Callable[..., CacheSettings]
) -> None:
    with RedisServer(extra_args=PERSISTENT) as redis:
        settings = make_settings(redis.url, CACHE_INVALIDATION_JOURNAL=str(tmp_path))
        await init_cache(settings)
        layer = current_layer()
        assert layer is not None
        generation_key = "test-cache:#gen:{ns}:t:acme"
        redis.command("SET", generation_key, "old")
        redis.kill()
        await layer.invalidate(InvalidationTarget("ns", "acme"))
        assert cache_status().pending_invalidations == 1
        await close_cache()

        redis.start()
        assert redis.command("EXISTS", generation_key) == b":1\r\n"
        await init_cache(settings)
        try:
            assert cache_status().backend == "redis"
            assert cache_status().pending_invalidations == 0
            assert redis.command("EXISTS", generation_key) == b":0\r\n"
            assert _journal_contents(tmp_path) == [b""]
        finally:
            await close_cache()
    assert _journal_contents(tmp_path) == []


def _an_update_acknowledged_in_an_outage(
    redis: RedisServer, replicas: Callable[..., ServiceProcess], tmp_path: Path
) -> tuple[ServiceProcess, ServiceProcess]:
    """Replicas A and B of one database on ``redis``, B's answer cached; then Redis is killed
    and A acknowledges a PUT (version 1 to 2). Returns A and B."""
    database = tmp_path / "replicas.sqlite"
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.execute("CREATE TABLE IF NOT EXISTS res (tenant TEXT PRIMARY KEY, version INTEGER)")
    env = {
        "REDIS_URL": redis.url,
        "CACHE_PREFIX": "outage",
        "REPLICA_DB": str(database),
        "REPLICA_READ_SECONDS": "0",
        **FAST,
    }
    a, b = replicas(**env), replicas(**env)
    # Both import at once: a start is seconds of imports.
    for replica in (a, b):
        replica.spawn()
    for replica in (a, b):
        replica.wait_until_ready()
    assert _versions(a.url, 2) == [1, 1]
    assert httpx.get(f"{b.url}/res", headers=TENANT).headers["X-FastAPI-Cache"] == "HIT"

    redis.kill()
    put = httpx.put(f"{a.url}/res", headers=TENANT, timeout=10)
    assert put.json() == {"version": 2}
    return a, b


def _journal_contents(directory: Path) -> list[bytes]:
    """What each journal file in ``directory`` holds (a file being renamed into view aside)."""
    return [path.read_bytes() for path in sorted(directory.glob("*.jsonl"))]


def _versions(base_url: str, count: int = 5) -> list[int]:
    """``count`` GETs of the tenant's resource, 0.1 s apart: the versions they answer."""
    seen = []
    for _ in range(count):
        response = httpx.get(f"{base_url}/res", headers=TENANT, timeout=10)
        assert response.status_code == 200
        seen.append(response.json()["version"])
        time.sleep(0.1)
    return seen


def _status(replica: ServiceProcess) -> dict[str, object]:
    return dict(httpx.get(f"{replica.url}/cache-status", timeout=10).json())


def _until_back_on_redis(replica: ServiceProcess, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while _status(replica)["backend"] != "redis":
        assert time.monotonic() < deadline, _status(replica)
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "restarted"),
    [("sigterm", "after"), ("sigkill", "after"), ("sigkill", "during")],
    ids=["stopped-then-redis-back", "killed-then-redis-back", "killed-and-restarted-in-the-outage"],
)
def test_an_invalidation_kept_during_an_outage_outlives_the_process_that_kept_it(
    stop: str,
    restarted: str,
    replica_processes: Callable[..., ServiceProcess],
    tmp_path: Path,
) -> None:
    """A's PUT during the outage is acknowledged; A stops (or is killed), and starts again
    after Redis is back with the entry from before the PUT, or while Redis is still away;
    from then on neither A nor another replica B answers the old version."""
    journal = tmp_path / "journal"
    journal.mkdir()
    with RedisServer(extra_args=PERSISTENT) as redis:
        replicas = partial(replica_processes, CACHE_INVALIDATION_JOURNAL=str(journal))
        a, b = _an_update_acknowledged_in_an_outage(redis, replicas, tmp_path)
        assert _status(a) == {"backend": "degraded", "pending_invalidations": 1}
        a.kill() if stop == "sigkill" else a.stop()

        if restarted == "during":
            a.start()
            assert _status(a) == {"backend": "degraded", "pending_invalidations": 1}
        redis.start()
        # The entry from before the PUT is back, with its generation.
        assert int(redis.command("DBSIZE")[1:].strip()) > 0
        if restarted == "after":
            a.start()
        _until_back_on_redis(a)

        assert _status(a) == {"backend": "redis", "pending_invalidations": 0}
        assert _versions(a.url) == [2] * 5
        assert _versions(b.url) == [2] * 5
        assert _journal_contents(journal) == [b"", b""]


# -- without a journal: a start during the outage vouches for nothing --------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_without_a_journal_a_restart_during_the_outage_serves_no_old_answer(
    stop: str, replica_processes: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """A's PUT during the outage is acknowledged and kept in A's memory only; A stops (or is
    killed) and starts again while Redis is still away; Redis comes back with the entry from
    before the PUT. A, having started without reaching Redis, removes every entry before it
    reads Redis: neither A nor B answers the old version once A is back on Redis."""
    with RedisServer(extra_args=PERSISTENT) as redis:
        a, b = _an_update_acknowledged_in_an_outage(redis, replica_processes, tmp_path)
        a.kill() if stop == "sigkill" else a.stop()
        a.start()
        # What the stopped process kept is gone with it; the flush stands in for it.
        assert _status(a) == {"backend": "degraded", "pending_invalidations": 1}
        redis.start()
        assert int(redis.command("DBSIZE")[1:].strip()) > 0
        _until_back_on_redis(a)

        assert _status(a) == {"backend": "redis", "pending_invalidations": 0}
        assert _versions(a.url) == [2] * 5
        assert _versions(b.url) == [2] * 5
