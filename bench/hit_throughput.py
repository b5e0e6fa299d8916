"""HIT throughput and p99: ours vs fastapi-cache2 vs cashews vs no cache vs the floor.

The app (``bench/_apps.py``) serves every variant side by side: the floor (pre-serialised bytes in a
``Response``), no cache (the handler builds the response), ``commons.cache.cache``,
fastapi-cache2's stock decorator and backend, and cashews' ``@cache``; each for a small (~0.9 KB)
and a large (200 pydantic items, ~20 KB) response, on the memory backends and on Redis. Every
cached route is warmed first, so every measured request is a HIT.

- in-process: ``httpx.AsyncClient(transport=ASGITransport(app))``, one request at a time;
- uvicorn: one worker (httptools and uvloop when installed) in a subprocess on a free loopback
  port, loaded by ``bench/_loadgen.py``: a raw-asyncio HTTP/1.1 keep-alive client in its own
  process, 16 connections, one request in flight on each, for a fixed duration.

Variants alternate within each round (the starting variant rotates), so a slow moment on this
shared machine hits them all alike; each figure is also given as a ratio to the floor measured in
the same round set.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

from bench._apps import VARIANTS, http_impl, loop_impl
from bench._common import (
    REPO_ROOT,
    child_env,
    fmt_ratio,
    median,
    percentile,
    stop_process,
    wait_for_port,
)

SIZES = ("small", "large")
LABELS = {
    "floor": "floor",
    "nocache": "no cache",
    "ours": "ours",
    "fc2": "fastapi-cache2",
    "cashews": "cashews",
}
#: Targets for ours as a fraction of the floor (issue 7), per backend and size.
TARGETS = {
    ("memory", "small"): 0.85,
    ("redis", "small"): 0.7,
    ("memory", "large"): 0.8,
    ("redis", "large"): 0.6,
}
CACHED = ("ours", "fc2", "cashews")


def _cells() -> list[tuple[str, str]]:
    return [(size, variant) for size in SIZES for variant in VARIANTS]


def _rotated(items: list[Any], by: int) -> list[Any]:
    by %= len(items)
    return items[by:] + items[:by]


async def _inprocess(backend: str, redis_url: str | None, requests: int, rounds: int) -> dict:
    import httpx

    from bench._apps import create_app

    app = create_app(backend, redis_url)
    latencies: dict[tuple[str, str], list[float]] = {cell: [] for cell in _cells()}
    rates: dict[tuple[str, str], list[float]] = {cell: [] for cell in _cells()}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for size, variant in _cells():
                _check_warm(
                    [await client.get(f"/{variant}/{size}") for _ in range(3)], variant, size
                )
            for round_index in range(rounds):
                for size, variant in _rotated(_cells(), round_index * 3):
                    path = f"/{variant}/{size}"
                    record = latencies[(size, variant)]
                    started = time.perf_counter()
                    for _ in range(requests):
                        sent = time.perf_counter()
                        response = await client.get(path)
                        record.append(time.perf_counter() - sent)
                        if response.status_code != 200:
                            raise RuntimeError(f"{path}: status {response.status_code}")
                    rates[(size, variant)].append(requests / (time.perf_counter() - started))
    return {
        f"{size}/{variant}": {
            "rps": median(rates[(size, variant)]),
            "p99_ms": percentile(latencies[(size, variant)], 99) * 1000,
        }
        for size, variant in _cells()
    }


def _check_warm(responses: list[Any], variant: str, size: str) -> None:
    """The last of the warm-up responses must be a 200 (and a HIT where the cache says so)."""
    last = responses[-1]
    if last.status_code != 200:
        raise RuntimeError(f"/{variant}/{size}: status {last.status_code}: {last.text[:300]}")
    if variant in ("ours", "fc2") and last.headers.get("x-fastapi-cache") != "HIT":
        raise RuntimeError(f"/{variant}/{size}: not a HIT after warm-up: {dict(last.headers)}")
    if responses[0].content != last.content and variant != "cashews":
        raise RuntimeError(f"/{variant}/{size}: the HIT's body differs from the MISS's")


def _uvicorn(
    backend: str, redis_url: str | None, duration: float, warmup: float, rounds: int
) -> dict:
    import httpx

    from commons.testing.redis_server import free_port

    port = free_port()
    command = [
        sys.executable,
        "-c",
        "from bench._apps import serve; serve()",
        "--backend",
        backend,
        "--port",
        str(port),
    ]
    if redis_url:
        command += ["--redis-url", redis_url]
    server = subprocess.Popen(command, cwd=REPO_ROOT, env=child_env())
    runs: dict[tuple[str, str], list[dict[str, float]]] = {cell: [] for cell in _cells()}
    try:
        wait_for_port("127.0.0.1", port, proc=server)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for size, variant in _cells():
                _check_warm([client.get(f"/{variant}/{size}") for _ in range(3)], variant, size)
        for round_index in range(rounds):
            for size, variant in _rotated(_cells(), round_index * 3):
                runs[(size, variant)].append(_load(port, f"/{variant}/{size}", duration, warmup))
    finally:
        stop_process(server)
    out = {}
    for (size, variant), results in runs.items():
        errors = sum(r["errors"] for r in results)
        if errors:
            raise RuntimeError(f"/{variant}/{size}: {errors} failed requests under load")
        out[f"{size}/{variant}"] = {
            "rps": median([r["rps"] for r in results]),
            "p99_ms": median([r["p99_ms"] for r in results]),
        }
    return out


def _load(port: int, path: str, duration: float, warmup: float) -> dict[str, float]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench._loadgen",
            "--port",
            str(port),
            "--path",
            path,
            "--connections",
            "16",
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
        ],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=duration + warmup + 60,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed on {path}: {proc.stderr[-1500:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["requests"]:
        raise RuntimeError(f"no successful request on {path}")
    return result


def run(quick: bool = False) -> dict[str, Any]:
    from commons.testing.redis_server import RedisServer

    requests, inproc_rounds = (50, 1) if quick else (400, 3)
    duration, warmup, rounds = (0.4, 0.1, 1) if quick else (1.5, 0.3, 3)
    measured: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    with RedisServer() as server:
        for backend in ("memory", "redis"):
            url = server.url if backend == "redis" else None
            measured[("in-process", backend)] = asyncio.run(
                _inprocess(backend, url, requests, inproc_rounds)
            )
            measured[("uvicorn", backend)] = _uvicorn(backend, url, duration, warmup, rounds)

    rows: list[list[Any]] = []
    chart_labels: list[str] = []
    chart: dict[str, list[float]] = {LABELS[v]: [] for v in VARIANTS if v != "floor"}
    misses: list[str] = []
    for (mode, backend), figures in measured.items():
        for size in SIZES:
            floor = figures[f"{size}/floor"]["rps"]
            cells: list[Any] = [mode, backend, size, round(floor)]
            for variant in VARIANTS[1:]:
                rps = figures[f"{size}/{variant}"]["rps"]
                cells.append(f"{rps:,.0f} ({fmt_ratio(rps / floor)})")
                chart[LABELS[variant]].append(rps / floor)
            cells.append(" / ".join(f"{figures[f'{size}/{v}']['p99_ms']:.1f}" for v in VARIANTS))
            target = TARGETS[(backend, size)]
            achieved = figures[f"{size}/ours"]["rps"] / floor
            met = achieved >= target
            cells += [f"≥ {target:.2f}×", "yes" if met else f"no ({achieved / target - 1:+.0%})"]
            if mode == "uvicorn" and not met:
                misses.append(f"{backend}/{size}: {achieved:.2f}× vs {target:.2f}×")
            rows.append(cells)
            chart_labels.append(f"{mode} {backend} {size}")

    notes = (
        f"HITs only (every cached route warmed first). in-process: httpx ASGITransport, "
        f"{requests:,} sequential requests per variant per round, {inproc_rounds} round(s), "
        f"median req/s of the rounds, p99 over all requests. "
        f"uvicorn: 1 worker (http={http_impl()}, loop={loop_impl()}), load from "
        f"bench/_loadgen.py (raw asyncio HTTP/1.1 keep-alive client in its own process, 16 "
        f"connections, closed loop; wrk is not installed), {duration:g} s per variant per round "
        f"after {warmup:g} s warm-up, {rounds} round(s), median req/s and p99 of the rounds. "
        "Cells: req/s (ratio to the floor of the same mode, backend and size). Every route binds "
        "the same tenant in an async dependency; fastapi-cache2 uses our tenant key builder, "
        "cashews a per-tenant key template; cashews' Redis backend uses its default (pickle) "
        "serialiser. Targets (issue 7) are defined for uvicorn: "
        + ("all met." if not misses else "MISSED: " + "; ".join(misses) + ".")
    )
    return {
        "name": "hit_throughput",
        "title": "HIT throughput (req/s) and p99: ours vs fastapi-cache2 vs cashews",
        "columns": [
            "mode",
            "backend",
            "size",
            "floor req/s",
            "no cache",
            "ours",
            "fastapi-cache2",
            "cashews",
            "p99 ms floor / no cache / ours / fc2 / cashews",
            "ours target",
            "met",
        ],
        "rows": rows,
        "notes": notes,
        "chart": {"type": "bar", "labels": chart_labels, "series": chart, "unit": "× floor"},
        "data": {f"{mode}/{backend}": figures for (mode, backend), figures in measured.items()},
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
