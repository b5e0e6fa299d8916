"""Request cost: the CPU time each path of ours takes per request, beside the floor's, in-process.

The traffic benchmarks (``mixed``, ``working_set``) measure req/s through uvicorn and wrk on the
same cores as Redis: the figure users see, but it moves by a tenth from one run to the next on a
shared machine, and it does not say which path costs what. Here the app of those benchmarks
(``bench/_keyed_app.py``) is called in-process through ASGI by 16 concurrent callers on one event
loop, and the process's CPU time (``time.process_time()``) is counted per request, for each path
in chunks of requests that alternate with chunks on the floor (pre-serialised bytes, same paths,
same tenant dependency). CPU time is what a request takes from a core, whatever else the machine
is doing; the ratio to the floor beside it cancels the machine's speed.

Paths, each process with a Redis of its own:

- a near-cache hit over 2,000 warm keys; a miss (every request a fresh key: the read, the
  handler, the fill); the same handler uncached (what caching must beat);
- the same process over 100,000 warm keys, the near cache holding what its bound allows
  (entries copied into Redis as in ``working_set``, then random reads, unrecorded); then a
  near-cache hit over 2,000 of those keys, once they have been read for a while (unrecorded):
  a working set that narrows again, as after a batch job or a crawler read every key;
- with ``CACHE_NEAR_CACHE=false``: a hit from Redis over 2,000 keys (every memo of the hit path
  holds them) and over 100,000 keys (the memos hold a fraction: a key is built, an entry parsed
  and its answer prepared on most hits);
- in the same process, over the same two working sets, the floor's bytes after one redis-py
  ``GET`` of the key ours stores the item under (``redis_get``): the least any answer that asks
  Redis pays, with nothing of ours in it.

Reported per path: CPU µs per request, ours and the floor's; ours above the floor; the ratio of the
floor's to ours (as req/s would be if this process were the only bottleneck); Redis' own CPU per
request (``/proc``, Linux); the near cache's share of the hits.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._asgi import AsgiClient
from bench._common import REPO_ROOT, child_env, fmt_ratio_range, spread
from bench._traffic import hits_in_metrics
from bench.working_set import _copy_entries

#: Concurrent callers on the loop (the traffic benchmarks' connections).
CALLERS = 16
SMALL = (20, 100)
LARGE = (100, 1_000)
QUICK_LARGE = (100, 100)
#: Random reads after copying a large working set, before measuring (unrecorded).
LARGE_WARM_READS = 150_000
#: Keys of the hot set read after the large working set, and its reads before measuring.
HOT_KEYS = 2_000
HOT_WARM_READS = 30_000
#: Paths measured in each process: (label, variant, working set, share of fresh keys).
NEAR_ON_PATHS = (
    ("near-cache hit", "ours", "small", 0.0),
    ("miss (a fresh key each)", "ours", "small", 1.0),
    ("the same handler, uncached", "nocache", "small", 0.0),
    ("hit, near cache on", "ours", "large", 0.0),
    ("near-cache hit, 2,000 hot keys after the large set", "ours", "hot_after_large", 0.0),
)
NEAR_OFF_PATHS = (
    ("Redis hit (memos hold the keys)", "ours", "small", 0.0),
    ("Redis hit (memos hold few)", "ours", "large", 0.0),
    ("one redis-py GET, no cache", "redis_get", "small", 0.0),
    ("one redis-py GET, no cache, large set", "redis_get", "large", 0.0),
)


async def _call(app: Any, path: str) -> None:
    """One request through the app, which must answer it (a warm-up's, not measured)."""
    client = AsgiClient(app)
    await client.get(path)
    client.check(path, hit=False)


class _Paths:
    """The keys of a working set: ``/variant/t<tenant>/<item>``, warm or never asked before."""

    def __init__(self, tenants: int, items: int, fresh_share: float) -> None:
        self.tenants, self.items, self.fresh_share = tenants, items, fresh_share
        self._fresh = 0

    def pick(self, variant: str) -> str:
        tenant = random.randrange(self.tenants)
        if self.fresh_share and random.random() < self.fresh_share:
            self._fresh += 1
            return f"/{variant}/t{tenant}/fresh-{os.getpid()}-{self._fresh}"
        return f"/{variant}/t{tenant}/{random.randrange(self.items)}"


async def _cpu_seconds(app: Any, paths: list[str], *, hits: bool = False) -> float:
    """The process's CPU time to answer ``paths``, by :data:`CALLERS` concurrent callers; with
    ``hits``, every answer must be a HIT of ours."""

    async def caller(first: int) -> None:
        client = AsgiClient(app)
        for index in range(first, len(paths), CALLERS):
            await client.get(paths[index])
            client.check(paths[index], hit=hits)
            await asyncio.sleep(0)  # as a server's loop would, between requests

    started = time.process_time()
    await asyncio.gather(*(caller(first) for first in range(CALLERS)))
    return time.process_time() - started


def _cpu_of(pid: int) -> float:
    """Seconds of CPU process ``pid`` has used (Linux; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _near_counts(app: Any) -> tuple[float, float]:
    """Our HITs and near-cache hits so far (the app's ``/metrics``)."""
    client = AsgiClient(app)
    await client.get("/metrics")
    return hits_in_metrics(client.body.decode())


async def _measure_paths(
    near: bool, large: tuple[int, int], chunk: int, chunks: int
) -> dict[str, dict[str, float]]:
    from bench._keyed_app import create_app
    from commons.testing.redis_server import RedisServer

    sizes = {
        "small": SMALL,
        "large": large,
        # The first tenants' keys of the large set (read after it: see NEAR_ON_PATHS).
        "hot_after_large": (HOT_KEYS // large[1], large[1]),
    }
    measured: dict[str, dict[str, float]] = {}
    warmed: set[str] = set()
    with RedisServer() as redis:
        assert redis.process is not None
        redis_pid = redis.process.pid
        app = create_app(redis.url, near=near, freeze=True)
        async with app.main.router.lifespan_context(app.main):
            for label, variant, size, fresh_share in NEAR_ON_PATHS if near else NEAR_OFF_PATHS:
                tenants, items = sizes[size]
                if size == "hot_after_large":
                    hot = _Paths(tenants, items, 0.0)
                    await _cpu_seconds(app, [hot.pick("ours") for _ in range(HOT_WARM_READS)])
                elif size not in warmed:
                    await _warm(app, redis.url, tenants, items)
                    warmed.add(size)
                keys = _Paths(tenants, items, fresh_share)
                floor_keys = _Paths(tenants, items, 0.0)
                ours_cpu = floor_cpu = redis_cpu = 0.0
                ratios: list[float] = []
                before = await _near_counts(app)
                for _ in range(chunks):
                    floor = await _cpu_seconds(
                        app, [floor_keys.pick("floor") for _ in range(chunk)]
                    )
                    redis_before = _cpu_of(redis_pid)
                    asked = [keys.pick(variant) for _ in range(chunk)]
                    ours = await _cpu_seconds(
                        app, asked, hits=variant == "ours" and not fresh_share
                    )
                    redis_cpu += _cpu_of(redis_pid) - redis_before
                    floor_cpu, ours_cpu = floor_cpu + floor, ours_cpu + ours
                    ratios.append(floor / ours if ours else float("nan"))
                after = await _near_counts(app)
                hits = after[0] - before[0]
                requests = chunk * chunks
                measured[label] = {
                    "keys": tenants * items,
                    "ours_us": ours_cpu / requests * 1e6,
                    "floor_us": floor_cpu / requests * 1e6,
                    **spread(ratios),
                    "redis_us": redis_cpu / requests * 1e6,
                    "near_share": (after[1] - before[1]) / hits if hits else float("nan"),
                }
    return measured


async def _warm(app: Any, redis_url: str, tenants: int, items: int) -> None:
    """Every key of the working set stored and read once from Redis; past 10k keys, copied and
    then read at random (the near cache then holds what a service reading them for a while
    holds)."""
    if tenants * items <= 10_000:
        for _ in range(2):  # a fill, then a read from Redis (which the near cache keeps)
            for tenant in range(tenants):
                for item in range(items):
                    await _call(app, f"/ours/t{tenant}/{item}")
        return
    for tenant in range(tenants):
        await _call(app, f"/ours/t{tenant}/0")
    await asyncio.to_thread(_copy_entries, redis_url, tenants, items)
    keys = _Paths(tenants, items, 0.0)
    await _cpu_seconds(app, [keys.pick("ours") for _ in range(LARGE_WARM_READS)])


def measure_in_process(near: bool, quick: bool) -> None:
    """Entry point of one measuring process: prints its figures as JSON."""
    large, chunk, chunks = (QUICK_LARGE, 500, 2) if quick else (LARGE, 2_000, 8)
    print(json.dumps(asyncio.run(_measure_paths(near, large, chunk, chunks))))


def _measured_by_child(near: bool, quick: bool) -> dict[str, dict[str, float]]:
    code = f"from bench.request_cost import measure_in_process; measure_in_process({near}, {quick})"
    output = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    figures: dict[str, dict[str, float]] = json.loads(output.strip().splitlines()[-1])
    return figures


def run(quick: bool = False) -> dict[str, Any]:
    measured = {**_measured_by_child(True, quick), **_measured_by_child(False, quick)}
    return summarize(measured, quick=quick)


def summarize(measured: dict[str, dict[str, float]], *, quick: bool) -> dict[str, Any]:
    """The result (table, notes, chart, data) of what :func:`run` measured."""
    rows = [
        [
            label,
            f"{figure['keys']:,.0f}",
            f"{figure['ours_us']:.0f} / {figure['floor_us']:.0f}",
            f"{figure['ours_us'] - figure['floor_us']:+.0f}",
            fmt_ratio_range(figure),
            f"{figure['redis_us']:.0f}",
            "—" if figure["near_share"] != figure["near_share"] else f"{figure['near_share']:.0%}",
        ]
        for label, figure in measured.items()
    ]
    chunks = "2 chunks of 500" if quick else "8 chunks of 2,000"
    notes = (
        "In-process: bench/_keyed_app.py called through ASGI by 16 concurrent callers on one "
        "event loop (no HTTP server, no load generator); CPU time of the process per request "
        f"(time.process_time), {chunks} requests per path, each chunk after a chunk on the "
        "floor (pre-serialised bytes, same paths and tenant dependency); ratio: the floor's CPU "
        "over ours, median of the chunks (low-high). Redis: redis-server's own CPU per request "
        "(/proc). Near cache on for the first five paths, CACHE_NEAR_CACHE=false for the "
        "others; the large working set is copied into Redis and read at random first, as in "
        f"working_set; the hot keys after it are its first tenants' ({HOT_WARM_READS:,} reads "
        "of them first, unrecorded). One redis-py GET: the floor's bytes after one GET of the "
        "key ours stores the item under (no cache: the least an answer that asks Redis pays). "
        "Near share: "
        "commons_cache_near_hits over commons_cache_hits."
    )
    labels = list(measured)
    return {
        "name": "request_cost",
        "title": "Request cost: CPU per request of each path, in-process (vs the floor)",
        "columns": [
            "path",
            "warm keys",
            "CPU µs ours / floor",
            "µs above floor",
            "floor / ours",
            "Redis CPU µs",
            "near share",
        ],
        "rows": rows,
        "notes": notes,
        "chart": {
            "type": "bar",
            "labels": labels,
            "series": {
                "µs above the floor": [f["ours_us"] - f["floor_us"] for f in measured.values()]
            },
            "unit": "µs",
        },
        "data": measured,
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
