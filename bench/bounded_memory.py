"""Byte bounds vs resident memory: a full near cache and a full memory backend, 1 KB entries.

``CACHE_NEAR_CACHE_MAX_BYTES`` and ``CACHE_MEMORY_MAX_BYTES`` count what an entry costs in the
process (key, value and the objects holding them). Here each is filled past its byte bound with
1 KB entries (entry bounds out of the way), each in a fresh subprocess, and the growth of the
process's resident memory (RSS) while it filled is compared with the bound (issue 21's target:
at most 1.5x). The near cache is filled the way a service fills it: entries written to a Redis of
its own by one process, then each read once through a
:class:`~commons.cache.backends.redis.RedisStore` in another, whose reads it keeps: its growth is
what the reads kept. (Written by the measuring process itself, the entries it then kept reused the
memory the writes had freed, and its growth came out at three fifths of what they cost.)
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


def _near_store(url: str) -> tuple[Any, Any, list[Any]]:
    """A tracked store on ``url`` with a near cache of the bound, and the 100 scopes."""
    from redis.asyncio import Redis

    from commons.cache.backends.redis import RedisStore
    from commons.cache.backends.redis.near import NearCache
    from commons.cache.scope import CacheScope

    near = NearCache(max_entries=10**8, max_bytes=BOUND_BYTES)
    store = RedisStore(Redis.from_url(url), "bench", near_cache=near)
    return store, near, [CacheScope("mem", f"t{t}") for t in range(100)]


async def _write_entries(url: str, count: int) -> dict[str, float]:
    """The entries the near cache's process then reads, written by a process of their own: the
    reader's memory then holds nothing freed by the writes for the kept entries to reuse (which
    made its growth look smaller than what the entries cost)."""
    store, _, scopes = _near_store(url)
    try:
        generations = [await store.generation(scope) for scope in scopes]
        for start in range(0, count, 20):
            await asyncio.gather(
                *(
                    store.write(_key(i), BODY + b"%d" % i, 3600, scopes[i % 100], g)
                    for i in range(start, min(start + 20, count))
                    for g in [generations[i % 100]]
                )
            )
        return {"written": count}
    finally:
        await store.aclose()


async def _near(url: str, count: int) -> dict[str, float]:
    store, near, scopes = _near_store(url)
    try:
        await store.ping()
        while not near.live:
            await store.read(_key(0), scopes[0])
            await asyncio.sleep(0.05)
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


def _child(which: str, count: int, url: str = "") -> None:
    measures = {
        "near": lambda: _near(url, count),
        "write": lambda: _write_entries(url, count),
        "memory": lambda: _memory(count),
    }
    print(json.dumps(asyncio.run(measures[which]())), flush=True)


def _in_child(which: str, count: int, url: str = "") -> dict[str, float]:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from bench.bounded_memory import _child; _child({which!r}, {count}, {url!r})",
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


def _measure(which: str, count: int) -> dict[str, float]:
    """One store's figures, each in fresh processes (the near cache's: one writes the entries
    to a Redis of its own, another reads them)."""
    if which != "near":
        return _in_child(which, count)
    from commons.testing.redis_server import RedisServer

    with RedisServer() as server:
        _in_child("write", count, server.url)
        return _in_child("near", count, server.url)


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
        "(the near cache's: of a process that only read entries another one wrote, during the "
        "reads that it kept). Target (issue 21): "
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
