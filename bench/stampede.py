"""Stampede: 100 concurrent GETs on a cold key whose handler sleeps 100 ms.

How many times does the handler run, and how long until the last answer? Ours
(``commons.cache.cache``) against fastapi-cache2's decorator, in one process (httpx
ASGITransport, memory and Redis backends), and across two uvicorn servers on one Redis with 50
requests each at once: ours with ``distributed_lock=True`` (one computation across replicas), ours
without it, and fastapi-cache2. Every round uses a fresh key; the routes are in ``bench/_apps.py``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from typing import Any

from bench._common import REPO_ROOT, child_env, median, stop_process, wait_for_port

CONCURRENCY = 100
LABELS = {"ours": "ours", "ours_lock": "ours, distributed_lock", "fc2": "fastapi-cache2"}


async def _burst(clients: list[Any], variant: str) -> tuple[int, float]:
    """Sends CONCURRENCY requests for one fresh key, split evenly over ``clients``."""
    key = uuid.uuid4().hex
    before_by = [(await c.get("/calls")).json().get(variant, 0) for c in clients]
    per_client = CONCURRENCY // len(clients)
    started = time.perf_counter()
    responses = await asyncio.gather(
        *(c.get(f"/stampede/{variant}/{key}") for c in clients for _ in range(per_client))
    )
    wall = time.perf_counter() - started
    _check(variant, [r.status_code for r in responses], [r.content for r in responses])
    after_by = [(await c.get("/calls")).json().get(variant, 0) for c in clients]
    return sum(after_by) - sum(before_by), wall * 1000


async def _in_process(backend: str, redis_url: str | None, rounds: int) -> dict[str, Any]:
    import httpx

    from bench._apps import create_app

    app = create_app(backend, redis_url)
    out: dict[str, list[tuple[int, float]]] = {"ours": [], "fc2": []}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://bench", timeout=30
        ) as client:
            for _ in range(rounds):
                for variant in out:
                    out[variant].append(await _burst([client], variant))
    return out


def _two_processes(redis_url: str, rounds: int) -> dict[str, Any]:
    from commons.testing.redis_server import free_port

    ports = [free_port(), free_port()]
    servers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from bench._apps import serve; serve()",
                "--backend",
                "redis",
                "--redis-url",
                redis_url,
                "--port",
                str(port),
            ],
            cwd=REPO_ROOT,
            env=child_env(),
        )
        for port in ports
    ]
    try:
        for port, server in zip(ports, servers, strict=True):
            wait_for_port("127.0.0.1", port, proc=server)
        return asyncio.run(_bursts_over_http(ports, rounds))
    finally:
        for server in servers:
            stop_process(server)


async def _bursts_over_http(ports: list[int], rounds: int) -> dict[str, Any]:
    """Raw sockets, opened beforehand: all 100 requests leave within a millisecond."""
    import httpx

    from bench._loadgen import burst, open_connections

    per_server = CONCURRENCY // len(ports)
    out: dict[str, list[tuple[int, float]]] = {"ours_lock": [], "ours": [], "fc2": []}
    connections = [await open_connections(port, per_server) for port in ports]
    clients = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") for port in ports]

    async def calls(variant: str) -> int:
        return sum([(await c.get("/calls")).json().get(variant, 0) for c in clients])

    try:
        for _ in range(rounds):
            for variant in out:
                key = uuid.uuid4().hex
                before = await calls(variant)
                started = time.perf_counter()
                answers = await asyncio.gather(
                    *(
                        burst(conns, port, f"/stampede/{variant}/{key}")
                        for conns, port in zip(connections, ports, strict=True)
                    )
                )
                wall = (time.perf_counter() - started) * 1000
                flat = [a for per in answers for a in per]
                _check(variant, [status for status, _ in flat], [body for _, body in flat])
                out[variant].append((await calls(variant) - before, wall))
    finally:
        for client in clients:
            await client.aclose()
        for conns in connections:
            for _, writer in conns:
                writer.close()
    return out


def _check(variant: str, statuses: list[int], bodies: list[bytes]) -> None:
    bad = [status for status in statuses if status != 200]
    if bad:
        raise RuntimeError(f"{variant}: {len(bad)} failed responses: {bad[:5]}")
    if len(set(bodies)) != 1:
        raise RuntimeError(f"{variant}: {len(set(bodies))} different bodies for one key")


def run(quick: bool = False) -> dict[str, Any]:
    from commons.testing.redis_server import RedisServer

    rounds = 1 if quick else 3
    measured: dict[str, dict[str, list[tuple[int, float]]]] = {}
    with RedisServer() as server:
        measured["1 process, memory"] = asyncio.run(_in_process("memory", None, rounds))
        measured["1 process, Redis"] = asyncio.run(_in_process("redis", server.url, rounds))
        measured["2 processes, one Redis"] = _two_processes(server.url, rounds)

    rows: list[list[Any]] = []
    chart_labels: list[str] = []
    series: dict[str, list[float]] = {"ours": [], "fastapi-cache2": []}
    for setting, per in measured.items():
        ref_calls = median([c for c, _ in per["fc2"]])
        ref_wall = median([w for _, w in per["fc2"]])
        ours_variants = ["ours_lock", "ours"] if "ours_lock" in per else ["ours"]
        for variant in ours_variants:
            calls = median([c for c, _ in per[variant]])
            wall = median([w for _, w in per[variant]])
            rows.append(
                [
                    setting,
                    LABELS[variant],
                    calls,
                    ref_calls,
                    f"{ref_calls / calls:.0f}× fewer" if calls else "n/a",
                    round(wall),
                    round(ref_wall),
                    f"{wall / ref_wall:.2f}×",
                ]
            )
        chart_labels.append(setting)
        series["ours"].append(median([c for c, _ in per[ours_variants[0]]]))
        series["fastapi-cache2"].append(ref_calls)
    every = {
        setting: {variant: [c for c, _ in runs] for variant, runs in per.items()}
        for setting, per in measured.items()
    }
    return {
        "name": "stampede",
        "title": f"Stampede: {CONCURRENCY} concurrent GETs on a cold key, handler sleeps 100 ms",
        "columns": [
            "setting",
            "ours",
            "ours handler calls",
            "fastapi-cache2 handler calls",
            "calls ref/ours",
            "ours wall (ms)",
            "fastapi-cache2 wall (ms)",
            "wall ours/ref",
        ],
        "rows": rows,
        "notes": (
            f"Median of {rounds} round(s), a fresh key each; calls per round: "
            + json.dumps(every)
            + ". 1 process: httpx ASGITransport, all requests at once. 2 processes: two uvicorn "
            "servers on one Redis, 50 requests to each, written at once on pre-opened keep-alive "
            "connections (raw sockets). Target: one handler run per cold key per process, "
            "one across both processes with distributed_lock=True."
        ),
        "chart": {
            "type": "bar",
            "labels": chart_labels,
            "series": series,
            "unit": "handler calls",
        },
        "data": every,
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
