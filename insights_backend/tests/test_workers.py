"""``python -m insights_backend`` with ``WORKERS``: several processes, one ``/metrics`` for all.

The service runs as a real process tree (uvicorn's supervisor and two workers) on a private port
against the session's private redis-server. Which worker served a request is read from the
metric files each worker keeps under ``PROMETHEUS_MULTIPROC_DIR`` (one file per process id),
never from anything the service answers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from commons.testing.processes import stop_process
from commons.testing.redis_server import RedisServer, free_port
from insights_backend.__main__ import metrics_directory
from insights_backend.config import ServiceSettings

Bearer = Callable[..., dict[str, str]]

pytestmark = pytest.mark.slow

#: The lookup series whose sum is the number of cached requests answered.
LOOKUPS = ("commons_cache_hits_total", "commons_cache_misses_total")
BATCH = 40


@contextmanager
def running_service(tmp_path: Path, **env: str) -> Iterator[str]:
    """``python -m insights_backend`` with the test's environment plus ``env``; yields its URL.

    ``TMPDIR`` is the test's own, so that the metrics directory the service makes can be found.
    """
    port = free_port()
    environment = {
        name: value for name, value in os.environ.items() if name != "PROMETHEUS_MULTIPROC_DIR"
    }
    environment.update(PORT=str(port), TMPDIR=str(tmp_path), LOGGING_LEVEL="WARNING", **env)
    log = tmp_path / "service.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "insights_backend"],
            env=environment,
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        # Three processes (the supervisor, two workers) import the service at once: on two
        # busy cores that alone has taken over 30 s. How long is not what this test checks.
        deadline = time.monotonic() + 90
        while not _answers(base_url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield base_url
    finally:
        stop_process(process, timeout=15)


def _answers(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def send_cached_requests(base_url: str, headers: dict[str, str], count: int) -> None:
    """``count`` GETs of a route cached with ``@cache``, ten at a time, each on a new connection:
    the kernel hands new connections to whichever worker accepts first, so both workers get some.
    """
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, limits=no_reuse, timeout=10) as client:
        gate = asyncio.Semaphore(10)

        async def one() -> None:
            async with gate:
                response = await client.get("/v1/users/me", headers=headers)
                assert response.status_code == 200

        await asyncio.gather(*(one() for _ in range(count)))


def lookups_per_process(directory: Path) -> dict[int, float]:
    """Hits plus misses counted by each process, from its own metric file."""
    counted: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.rpartition("_")[2])
        families = MultiProcessCollector.merge([str(path)])
        counted[pid] = sum(
            sample.value
            for family in families
            for sample in family.samples
            if sample.name in LOOKUPS
        )
    return counted


def scraped(base_url: str) -> dict[str, float]:
    """``/metrics``: the sum over labels of each sample name (``commons_cache_*`` only), and
    ``backend_state``'s ``redis`` series as ``state=redis``."""
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "commons_cache_backend_state":
                totals[f"state={sample.labels['state']}"] = sample.value
            elif sample.name.startswith("commons_cache_"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def wait_for_replacement(directory: Path, known: set[int]) -> int:
    """The process id of a new worker, once its state series says it is on Redis."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for path in directory.glob("gauge_livesum_*.db"):
            pid = int(path.stem.rpartition("_")[2])
            if pid not in known and _on_redis(path):
                return pid
        time.sleep(0.1)
    raise AssertionError("no worker replaced the one killed")


def _on_redis(path: Path) -> bool:
    return any(
        sample.labels.get("state") == "redis" and sample.value == 1
        for family in MultiProcessCollector.merge([str(path)])
        for sample in family.samples
    )


def test_two_workers_serve_and_metrics_add_up_both(
    redis_server: RedisServer, bearer: Bearer, tmp_path: Path
) -> None:
    redis_server.command("FLUSHALL")
    headers = bearer(1, "alice")
    with running_service(tmp_path, WORKERS="2", REDIS_URL=redis_server.url) as base_url:
        [directory] = tmp_path.glob("insights-backend-metrics-*")
        sent = 0
        # New connections until both workers have served some (almost always the first batch).
        # (A worker's file may exist before it has counted anything.)
        while sent < 10 * BATCH and sum(n > 0 for n in lookups_per_process(directory).values()) < 2:
            asyncio.run(send_cached_requests(base_url, headers, BATCH))
            sent += BATCH
        per_process = lookups_per_process(directory)
        scrapes = [scraped(base_url) for _ in range(4)]
        # A worker killed: uvicorn starts another; the dead one's counts stay in the totals,
        # its state does not.
        killed = min(per_process)
        os.kill(killed, signal.SIGKILL)
        replacement = wait_for_replacement(directory, set(per_process))
        after_kill = [scraped(base_url) for _ in range(4)]

    assert len(per_process) == 2, f"one worker served all {sent} requests: {per_process}"
    assert all(count > 0 for count in per_process.values())
    assert sum(per_process.values()) == sent
    for metrics in scrapes:  # whichever worker answered the scrape
        assert sum(metrics.get(name, 0.0) for name in LOOKUPS) == sent
        assert metrics["commons_cache_misses_total"] >= 1
        assert metrics["commons_cache_operation_duration_seconds_count"] > 0
        assert metrics["state=redis"] == 2  # both workers, each on Redis
    assert replacement not in per_process
    assert not (directory / f"gauge_livesum_{killed}.db").exists()
    for metrics in after_kill:
        assert sum(metrics.get(name, 0.0) for name in LOOKUPS) == sent
        assert metrics["state=redis"] == 2  # the survivor and the replacement
    assert not directory.exists(), "the private metrics directory outlived the service"


def test_a_given_metrics_directory_is_created_or_emptied_of_metric_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    given = tmp_path / "metrics"
    given.mkdir()
    (given / "counter_4242.db").write_bytes(b"left by an earlier run")
    (given / "notes.txt").write_text("not ours")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(given))

    with metrics_directory(workers=2):
        during = sorted(path.name for path in given.iterdir())

    assert during == ["notes.txt"]
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(given)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "new" / "dir"))
    with metrics_directory(workers=1):
        assert (tmp_path / "new" / "dir").is_dir()


def test_a_bad_workers_value_fails_at_start_up_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WORKERS", "0")
    with pytest.raises(ValueError, match="WORKERS"):
        ServiceSettings()
    environment = {**os.environ, "WORKERS": "two", "PORT": str(free_port())}

    result = subprocess.run(
        [sys.executable, "-m", "insights_backend"],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode != 0
    assert "WORKERS" in result.stderr
    assert "Traceback" not in result.stderr


def test_several_workers_without_redis_refuse_to_start_naming_workers_and_redis_url(
    tmp_path: Path,
) -> None:
    # Each worker would keep its own memory cache: one worker's invalidation after a PUT would
    # never reach the others, which would go on serving the old answer.
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")
    }
    environment.update(WORKERS="2", PORT=str(free_port()))
    started = subprocess.run(
        [sys.executable, "-m", "insights_backend"],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        check=False,
    )

    assert started.returncode != 0
    message = started.stderr.decode()
    assert "WORKERS" in message
    assert "REDIS_URL" in message
