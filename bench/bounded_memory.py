"""Byte bounds vs resident memory: a full near cache and a full memory backend, 1 KB entries.

``CACHE_NEAR_CACHE_MAX_BYTES`` and ``CACHE_MEMORY_MAX_BYTES`` count what an entry costs in the
process (key, value and the objects holding them). Here each is filled past its byte bound with
1 KB entries (entry bounds out of the way), each in a fresh subprocess, and the growth of the
process's resident memory (RSS) while it filled is compared with the bound (issue 21's target:
at most 1.5x). The near cache is filled the way a service fills it: entries written to a Redis of
its own, then each read once through a :class:`~commons.cache.backends.redis.RedisStore`, whose
reads it keeps; its baseline is taken after the writes, so the growth is what the reads kept.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench._common import REPO_ROOT, child_env

BOUND_BYTES = 32 * 1024 * 1024
BODY = b'{"data":"' + b"x" * 1000 + b'"}'
#: Entries written: enough to fill either bound with room to spare.
ENTRIES = 40_000
TARGET = 1.5


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def _key(i: int) -> str:
    return f"bench:mem:tenant_t{i % 100}:/items/{i}:d41d8cd98f00b204e9800998ecf8427e"


async def _near(count: int) -> dict[str, float]:
    from redis.asyncio import Redis

    from commons.cache.backends.redis import RedisStore
    from commons.cache.backends.redis.near import NearCache
    from commons.cache.scope import CacheScope
    from commons.testing.redis_server import RedisServer

    with RedisServer() as server:
        near = NearCache(max_entries=10**8, max_bytes=BOUND_BYTES)
        store = RedisStore(Redis.from_url(server.url), "bench", near_cache=near)
        scopes = [CacheScope("mem", f"t{t}") for t in range(100)]
        try:
            await store.ping()
            while not near.live:
                await store.read(_key(0), scopes[0])
                await asyncio.sleep(0.05)
            generations = [await store.generation(scope) for scope in scopes]
            for start in range(0, count, 20):
                await asyncio.gather(
                    *(
                        store.write(_key(i), BODY + b"%d" % i, 3600, scopes[i % 100], g)
                        for i in range(start, min(start + 20, count))
                        for g in [generations[i % 100]]
                    )
                )
            gc.collect()
            before = _rss_bytes()
            for i in range(count):
                await store.read(_key(i), scopes[i % 100])
            gc.collect()
            after = _rss_bytes()
            return {"rss_growth": after - before, "held": near.bytes_held, "entries": len(near)}
        finally:
            await store.aclose()


async def _memory(count: int) -> dict[str, float]:
    from commons.cache.backends.memory import MemoryStore
    from commons.cache.scope import CacheScope

    store = MemoryStore(10**8, max_bytes=BOUND_BYTES)
    scopes = [CacheScope("mem", f"t{t}") for t in range(100)]
    gc.collect()
    before = _rss_bytes()
    for i in range(count):
        await store.set(_key(i), BODY + b"%d" % i, 3600, scopes[i % 100])
    gc.collect()
    after = _rss_bytes()
    return {"rss_growth": after - before, "held": store.bytes_held, "entries": len(store)}


def _child(which: str, count: int) -> None:
    measure = _near if which == "near" else _memory
    print(json.dumps(asyncio.run(measure(count))), flush=True)


def _measure(which: str, count: int) -> dict[str, float]:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from bench.bounded_memory import _child; _child({which!r}, {count})",
        ],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{which}: {proc.stderr[-1500:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run(quick: bool = False) -> dict[str, Any]:
    count = 4_000 if quick else ENTRIES
    measured = {which: _measure(which, count) for which in ("near", "memory")}
    rows = []
    missed = []
    labels = {"near": "near cache", "memory": "memory backend"}
    for which, figure in measured.items():
        ratio = figure["rss_growth"] / BOUND_BYTES
        counted = figure["rss_growth"] / figure["held"] if figure["held"] else float("nan")
        full = figure["held"] >= 0.9 * BOUND_BYTES
        rows.append(
            [
                labels[which],
                f"{figure['entries']:,}",
                f"{figure['held'] / 2**20:.1f}",
                f"{figure['rss_growth'] / 2**20:.1f}",
                f"{ratio:.2f}×",
                f"{counted:.2f}×",
                "yes" if full and ratio <= TARGET else "no",
            ]
        )
        if not full or ratio > TARGET:
            missed.append(f"{labels[which]} {ratio:.2f}×{'' if full else ' (not full)'}")
    notes = (
        f"Byte bound {BOUND_BYTES // 2**20} MiB, entry bound out of the way, {count:,} entries of "
        "about 1 KB (keys of 70 bytes) put; RSS growth of a fresh process while it filled "
        "(the near cache's after the writes, during the reads that it kept). Target (issue 21): "
        f"RSS of a full bound ≤ {TARGET}× the bound: "
        + ("met." if not missed else "MISSED: " + "; ".join(missed) + ".")
    )
    return {
        "name": "bounded_memory",
        "title": "Byte bounds vs resident memory (1 KB entries)",
        "columns": [
            "store",
            "entries held",
            "counted MiB",
            "RSS growth MiB",
            "RSS / bound",
            "RSS / counted",
            "≤ 1.5× bound",
        ],
        "rows": rows,
        "notes": notes,
        "data": measured,
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
