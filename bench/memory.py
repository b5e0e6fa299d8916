"""Memory: 300,000 distinct keys written with a short TTL through the in-memory backends.

Ours is :class:`commons.cache.backends.memory.MemoryStore` with the default bound
(``CACHE_MEMORY_MAX_ENTRIES``); the reference is fastapi-cache2's ``InMemoryBackend``. Each runs in
a fresh subprocess (a clean baseline): resident memory is read with psutil after the imports and
again after the writes, once every entry has expired and one more write has happened (a live
service keeps writing). Entries retained = what the backend still holds at that point.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import time
from typing import Any

from bench._common import REPO_ROOT, child_env, fmt_ratio

TTL_SECONDS = 1
BODY = b'{"data":"' + b"x" * 1000 + b'","n":'


def _key(i: int) -> str:
    return f"bench:reports:tenant_{i % 100}:/reports/{i}:d41d8cd98f00b204e9800998ecf8427e"


async def _write_ours(count: int) -> dict[str, Any]:
    from commons.cache.backends.memory import MemoryStore
    from commons.cache.scope import CacheScope
    from commons.cache.settings import CacheSettings

    bound = CacheSettings().CACHE_MEMORY_MAX_ENTRIES
    store = MemoryStore(bound)
    scopes = [CacheScope("reports", str(t)) for t in range(100)]
    rss = _settle()
    started = time.perf_counter()
    for i in range(count):
        await store.set(_key(i), BODY + str(i).encode() + b"}", TTL_SECONDS, scopes[i % 100])
    write_seconds = time.perf_counter() - started
    await asyncio.sleep(TTL_SECONDS + 1.1)
    await store.set(_key(count), BODY + b"0}", TTL_SECONDS, scopes[0])
    return {
        "baseline": rss,
        "after": _settle(),
        "entries": len(store),
        "write_seconds": write_seconds,
        "bound": bound,
    }


async def _write_reference(count: int) -> dict[str, Any]:
    from fastapi_cache.backends.inmemory import InMemoryBackend

    backend = InMemoryBackend()
    rss = _settle()
    started = time.perf_counter()
    for i in range(count):
        await backend.set(_key(i), BODY + str(i).encode() + b"}", expire=TTL_SECONDS)
    write_seconds = time.perf_counter() - started
    await asyncio.sleep(TTL_SECONDS + 1.1)
    await backend.set(_key(count), BODY + b"0}", expire=TTL_SECONDS)
    return {
        "baseline": rss,
        "after": _settle(),
        "entries": len(InMemoryBackend._store),
        "write_seconds": write_seconds,
    }


def _settle() -> int:
    import psutil

    gc.collect()
    return int(psutil.Process().memory_info().rss)


def _child_main(which: str, count: int) -> None:
    writer = _write_ours if which == "ours" else _write_reference
    print(json.dumps(asyncio.run(writer(count))))


def _measure(which: str, count: int) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from bench.memory import _child_main; "
            "_child_main(sys.argv[1], int(sys.argv[2]))",
            which,
            str(count),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=child_env(),
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {which} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict[str, Any]:
    count = 30_000 if quick else 300_000
    ours = _measure("ours", count)
    ref = _measure("ref", count)
    mib = 1024 * 1024
    ours_growth = (ours["after"] - ours["baseline"]) / mib
    ref_growth = (ref["after"] - ref["baseline"]) / mib
    rows = [
        [
            "RSS growth (MiB)",
            round(ours_growth, 1),
            round(ref_growth, 1),
            fmt_ratio(ref_growth / ours_growth) if ours_growth > 0 else "n/a",
        ],
        [
            "entries retained after expiry",
            ours["entries"],
            ref["entries"],
            fmt_ratio(ref["entries"] / ours["entries"]) if ours["entries"] else "n/a",
        ],
        [
            "write time (s)",
            round(ours["write_seconds"], 2),
            round(ref["write_seconds"], 2),
            fmt_ratio(ref["write_seconds"] / ours["write_seconds"]),
        ],
    ]
    return {
        "name": "memory",
        "title": f"In-memory backend: {count:,} distinct ~1 KB entries, TTL {TTL_SECONDS} s",
        "columns": ["measure", "ours (MemoryStore)", "fastapi-cache2 InMemoryBackend", "ref/ours"],
        "rows": rows,
        "notes": (
            f"Each side in its own fresh process; RSS (psutil) after imports vs after the writes, "
            f"read {TTL_SECONDS + 1.1:.1f} s after the last write, when every entry has expired, "
            f"and one more write. Ours is bounded by CACHE_MEMORY_MAX_ENTRIES={ours['bound']:,} "
            "(LRU) and reclaims expired entries on every write; fastapi-cache2 keeps every entry "
            "until that exact key is read again, in one dict shared by all its instances."
        ),
        "chart": {
            "type": "bar",
            "labels": ["RSS growth (MiB)"],
            "series": {"ours": [ours_growth], "fastapi-cache2": [ref_growth]},
            "unit": "MiB",
        },
        "data": {"ours": ours, "fastapi-cache2": ref, "count": count},
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
