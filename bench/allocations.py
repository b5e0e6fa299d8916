"""Allocations per HIT: what a cached hit allocates and keeps alive, beside the floor route's.

The latency tail of a hit follows what it allocates: every allocation is work, and what survives
long enough to be seen by the cyclic collector makes collections run, the full ones included. This
module counts, in one process and without any timing, what one request costs the allocator on
``bench/_apps.py``'s routes: ``/ours/{size}`` (every request a HIT) and ``/floor/{size}`` (the same
bytes returned as a ``Response`` by a plain FastAPI route), on the memory backend and on Redis
(a private ``redis-server``; its hits are near-cache hits).

Requests are direct ASGI calls (no HTTP client in the figures). Per request, after a warm-up:

- allocations and bytes allocated: calls to Python's allocators (objects, buffers, internal
  tables) and the bytes asked for, counted by a hook in front of them (``_alloc_counter.c``,
  compiled at run time; a tracer such as memray would distort what it measures: its profile hook
  makes CPython create a frame object per call and run every instruction unspecialised), over a
  window of requests; the median of a few windows. Objects CPython takes from its free lists
  (small tuples, lists, dicts, floats) cost no allocator call and are not counted;
- blocks kept: ``sys.getallocatedblocks()`` after the requests and a full collection, minus
  before, per request (what a hit leaves behind; memos filled during the warm-up do not count);
- per key: what a cached key keeps alive once it has been missed and hit (its stored entry, and
  what the hit path remembers of it), in KiB and in objects the cyclic collector tracks (a full
  collection walks every one of them);
- collections: the cyclic collector's runs per 1,000 requests (``gc.callbacks``), by generation,
  at the default thresholds. A collection runs when container objects outlive their request
  (cycles, or objects kept), so transient objects freed by reference counting never trigger one.

Run it with ``python -m bench allocations`` (``--quick`` for fewer requests).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench._asgi import AsgiClient
from bench._common import fmt_ratio, median

SIZES = ("small", "large")
BACKENDS = ("memory", "redis")
#: ``nocache`` (the handler builds and FastAPI serialises the answer) shows what a route that
#: allocates per request does to the collector, beside ours and the floor.
VARIANTS = ("ours", "floor", "nocache")
#: Requests before anything is counted: fills every memo, confirms the near cache's session.
WARM_UP = 200


class AllocationCounter:
    """Python's allocators counted by ``_alloc_counter.c``, compiled here with the C compiler
    Python was built with (``sysconfig``'s ``CC``)."""

    def __init__(self, directory: Path) -> None:
        import ctypes
        import sysconfig

        library = directory / "alloc_counter.so"
        compiler = (sysconfig.get_config_var("CC") or "cc").split()
        include = sysconfig.get_paths()["include"]
        source = Path(__file__).with_name("_alloc_counter.c")
        command = [*compiler, "-shared", "-fPIC", "-O2", f"-I{include}", str(source)]
        subprocess.run([*command, "-o", str(library)], check=True, capture_output=True)
        self._library = ctypes.PyDLL(str(library))
        self._calls = ctypes.c_ulonglong.in_dll(self._library, "alloc_calls")
        self._bytes = ctypes.c_ulonglong.in_dll(self._library, "alloc_bytes")
        self._library.install()

    def read(self) -> tuple[int, int]:
        """Allocator calls and bytes asked for since the counter was installed."""
        return self._calls.value, self._bytes.value


async def _allocations(
    counter: AllocationCounter, client: AsgiClient, path: str, requests: int
) -> tuple[float, float]:
    """Allocations and bytes allocated per request, over ``requests`` requests."""
    calls, size = counter.read()
    for _ in range(requests):
        await client.get(path)
    calls_after, size_after = counter.read()
    return (calls_after - calls) / requests, (size_after - size) / requests


@contextmanager
def _collections_counted() -> Iterator[list[int]]:
    """Counts the cyclic collector's runs by generation while the block runs."""
    counts = [0, 0, 0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            counts[info["generation"]] += 1

    gc.collect()
    gc.callbacks.append(callback)
    try:
        yield counts
    finally:
        gc.callbacks.remove(callback)


async def _kept_and_collections(
    client: AsgiClient, path: str, requests: int
) -> tuple[float, list[float]]:
    """Blocks left alive per request, and collections per 1,000 requests by generation."""
    gc.collect()
    before = sys.getallocatedblocks()
    with _collections_counted() as counts:
        for _ in range(requests):
            await client.get(path)
    gc.collect()
    kept = (sys.getallocatedblocks() - before) / requests
    return kept, [1000 * count / requests for count in counts]


async def _kept_per_key(client: AsgiClient, path: str, keys: int) -> dict[str, float]:
    """What each cached key keeps alive (its entry and what the hit path remembers of it): blocks,
    GC-tracked objects (what a full collection walks) and KiB, over ``keys`` new keys."""
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    objects, blocks = len(gc.get_objects()), sys.getallocatedblocks()
    for index in range(keys):
        query = b"key=%d" % index
        for _ in range(3):  # a miss (stored), then hits (on Redis, the second fills the near cache)
            await client.get(path, query)
        if index % 50 == 0:
            await asyncio.sleep(0.01)  # the near cache's session stays confirmed
    gc.collect()
    kept_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "blocks": (sys.getallocatedblocks() - blocks) / keys,
        "tracked_objects": (len(gc.get_objects()) - objects) / keys,
        "kib": kept_bytes / keys / 1024,
    }


async def _measure_app(
    counter: AllocationCounter, backend: str, redis_url: str | None, requests: int, windows: int
) -> dict:
    from bench._apps import create_app

    app = create_app(backend, redis_url)
    client = AsgiClient(app)
    figures: dict[str, dict[str, Any]] = {}
    async with app.router.lifespan_context(app):
        for size in SIZES:
            for variant in VARIANTS:
                path = f"/{variant}/{size}"
                for index in range(WARM_UP):
                    await client.get(path)
                    if index % 50 == 0:
                        await asyncio.sleep(0.05)  # lets the near cache confirm its session
                client.check(path, hit=variant == "ours")
                per_window = [
                    await _allocations(counter, client, path, requests) for _ in range(windows)
                ]
                client.check(path, hit=variant == "ours")
                kept, collections = await _kept_and_collections(client, path, 10 * requests)
                figures[f"{size}/{variant}"] = {
                    "allocations": median([window[0] for window in per_window]),
                    "bytes": median([window[1] for window in per_window]),
                    "kept_blocks": kept,
                    "collections_per_1000": collections,
                }
            figures[f"{size}/ours"]["per_key"] = await _kept_per_key(client, f"/ours/{size}", 500)
    return figures


def _row(backend: str, size: str, figures: dict[str, dict[str, Any]]) -> list[Any]:
    ours, floor, nocache = (figures[f"{size}/{variant}"] for variant in VARIANTS)
    return [
        f"{backend}, {size}",
        round(ours["allocations"]),
        round(floor["allocations"]),
        fmt_ratio(ours["allocations"] / floor["allocations"]),
        round(ours["allocations"] - floor["allocations"]),
        round(ours["bytes"] / 1024, 1),
        round(floor["bytes"] / 1024, 1),
        fmt_ratio(ours["bytes"] / floor["bytes"]),
        round(ours["kept_blocks"], 2),
        round(ours["per_key"]["kib"], 1),
        round(ours["per_key"]["tracked_objects"], 1),
        "/".join(f"{count:.1f}" for count in ours["collections_per_1000"]),
        "/".join(f"{count:.1f}" for count in floor["collections_per_1000"]),
        "/".join(f"{count:.1f}" for count in nocache["collections_per_1000"]),
    ]


def run(quick: bool = False) -> dict[str, Any]:
    from commons.testing.redis_server import RedisServer

    requests, windows = (50, 1) if quick else (200, 5)
    measured: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-alloc-") as tmp, RedisServer() as server:
        counter = AllocationCounter(Path(tmp))
        for backend in BACKENDS:
            url = server.url if backend == "redis" else None
            measured[backend] = asyncio.run(_measure_app(counter, backend, url, requests, windows))
    rows = [_row(backend, size, measured[backend]) for backend in BACKENDS for size in SIZES]
    labels = [f"{backend}, {size}" for backend in BACKENDS for size in SIZES]
    return {
        "name": "allocations",
        "title": "Allocations per HIT, in-process: ours beside the floor (deterministic counts)",
        "columns": [
            "backend, size",
            "allocations ours",
            "allocations floor",
            "ours/floor",
            "ours − floor",
            "KiB allocated ours",
            "KiB allocated floor",
            "ours/floor",
            "blocks kept per HIT (ours)",
            "KiB kept per key (ours)",
            "GC-tracked objects per key (ours)",
            "GCs per 1k (gen 0/1/2) ours",
            "GCs per 1k (gen 0/1/2) floor",
            "GCs per 1k (gen 0/1/2) no cache",
        ],
        "rows": rows,
        "notes": (
            "Direct ASGI calls to bench/_apps.py's routes, after a warm-up of "
            f"{WARM_UP} requests; every request of ours is a HIT (on Redis, a near-cache hit). "
            "Allocations and bytes: calls to Python's allocators (its mem and object domains: "
            "every object, buffer and internal table) and the bytes asked for, counted by a "
            f"hook in front of them (bench/_alloc_counter.c) over {requests} requests, the "
            f"median of {windows} windows. "
            "Blocks kept: sys.getallocatedblocks() after a full collection, per request. "
            "Per key: what 500 new keys (a miss, then two hits each) keep alive, per key: its "
            "entry and what the hit path remembers of it (tracemalloc), and the objects a full "
            "collection walks (gc.get_objects()). "
            "GCs: the cyclic collector's runs per 1,000 requests at default thresholds. "
            "The floor returns the same pre-serialised bytes from a plain FastAPI route; no cache "
            "builds the answer in the handler and FastAPI validates and serialises it."
        ),
        "chart": {
            "type": "bar",
            "labels": labels,
            "series": {
                "ours": [measured[b][f"{s}/ours"]["allocations"] for b in BACKENDS for s in SIZES],
                "floor": [
                    measured[b][f"{s}/floor"]["allocations"] for b in BACKENDS for s in SIZES
                ],
            },
            "unit": "allocations per request",
        },
        "data": measured,
    }


def main() -> None:
    result = run("--quick" in sys.argv)
    from bench.report import markdown_table

    print(markdown_table(result["columns"], result["rows"]))
    if os.environ.get("BENCH_JSON"):
        print(json.dumps(result["data"], indent=2))


if __name__ == "__main__":
    main()
