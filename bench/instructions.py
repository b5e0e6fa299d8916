"""Instructions per request: what each path of ours costs, counted, not timed (needs valgrind).

CPU time per request moves by up to twice from one chunk of requests to the next on a shared
machine, which hides any change below a tenth. Instructions do not move: the app of the traffic
benchmarks (``bench/_keyed_app.py``) runs in-process under ``valgrind --tool=callgrind``, as in
``request_cost``, with instrumentation off during start-up and warm-up and on only while a fixed
list of requests is answered (16 concurrent callers, keys drawn with a fixed seed): first the
floor's requests, then ours over the same keys, each counted in a dump of its own. The count is
the same to a fraction of a percent from one run to the next; the ratio of the floor's count to
ours is what req/s would be if instructions were all a request cost.

Path: 100,000 warm keys read at random (copied into Redis, then read at random, unrecorded, as
in ``working_set``), near cache off (see :data:`PATHS`). Instructions are not time: a SHA-256 (the
ETag of a cold hit) counts many more under valgrind, which hides the CPU's SHA extensions, than
it costs (about 1.6 µs of 0.9 KB).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench._common import REPO_ROOT, child_env

#: Requests counted per variant, and the reads at random before (unrecorded).
REQUESTS = 2_000
WARM_READS = 60_000
QUICK_REQUESTS, QUICK_WARM_READS = 200, 2_000
TENANTS, ITEMS = 100, 1_000
QUICK_ITEMS = 100
#: Near cache off only: under valgrind the process runs some fifty times slower, and the near
#: cache's time bounds (a subscribed connection silent for a second, generations confirmed within
#: the maximum age) empty it over and over: it answered 1% of the hits in such a run.
PATHS = (("near cache off", False),)


def _switch(on: bool) -> None:
    subprocess.run(
        ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
        check=True,
        capture_output=True,
    )


def _dump(label: str) -> None:
    subprocess.run(
        ["callgrind_control", f"--dump={label}", str(os.getpid())], check=True, capture_output=True
    )


async def _count(near: bool, items: int, requests: int, warm: int) -> None:
    from bench import request_cost
    from bench._keyed_app import create_app
    from commons.testing.redis_server import RedisServer

    random.seed(7)
    request_cost.LARGE_WARM_READS = warm
    with RedisServer() as redis:
        app = create_app(redis.url, near=near, freeze=True)
        async with app.main.router.lifespan_context(app.main):
            await request_cost._warm(app, redis.url, TENANTS, items)
            keys = request_cost._Paths(TENANTS, items, 0.0)
            floor = [keys.pick("floor") for _ in range(requests)]
            for variant in ("floor", "ours"):
                paths = [path.replace("/floor/", f"/{variant}/", 1) for path in floor]
                await request_cost._cpu_seconds(app, paths[: requests // 4])  # warm, unrecorded
                _switch(True)
                await request_cost._cpu_seconds(app, paths, hits=variant == "ours")
                _switch(False)
                _dump(variant)


def count_in_process(near: bool, items: int, requests: int, warm: int) -> None:
    """Entry point of the process valgrind runs."""
    asyncio.run(_count(near, items, requests, warm))


def _totals(directory: Path) -> dict[str, int]:
    """The instructions of each dump (by its label) callgrind wrote into ``directory``."""
    totals: dict[str, int] = {}
    for path in directory.glob("callgrind.out*"):
        text = path.read_text(errors="replace")
        label = re.search(r"^desc: Trigger: dump (\S+)", text, re.MULTILINE)
        total = re.search(r"^totals: (\d+)", text, re.MULTILINE)
        if label is not None and total is not None:
            totals[label[1]] = int(total[1])
    return totals


def _counted(near: bool, items: int, requests: int, warm: int) -> dict[str, int]:
    code = (
        "from bench.instructions import count_in_process; "
        f"count_in_process({near}, {items}, {requests}, {warm})"
    )
    with tempfile.TemporaryDirectory() as directory:
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={directory}/callgrind.out",
                sys.executable,
                "-c",
                code,
            ],
            cwd=REPO_ROOT,
            env=child_env(),
            capture_output=True,
            check=True,
            timeout=840,
        )
        return _totals(Path(directory))


def run(quick: bool = False) -> dict[str, Any]:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise RuntimeError("valgrind (with callgrind_control) is needed: apt-get install valgrind")
    items, requests, warm = (
        (QUICK_ITEMS, QUICK_REQUESTS, QUICK_WARM_READS) if quick else (ITEMS, REQUESTS, WARM_READS)
    )
    measured = {label: _counted(near, items, requests, warm) for label, near in PATHS}
    rows = []
    data: dict[str, dict[str, float]] = {}
    for label, totals in measured.items():
        ours, floor = totals["ours"] / requests, totals["floor"] / requests
        data[label] = {"ours": ours, "floor": floor, "ratio": floor / ours}
        rows.append(
            [
                label,
                f"{TENANTS * items:,}",
                f"{ours / 1e3:,.0f}k",
                f"{floor / 1e3:,.0f}k",
                f"{(ours - floor) / 1e3:+,.0f}k",
                f"{floor / ours:.2f}×",
            ]
        )
    notes = (
        f"In-process under valgrind --tool=callgrind (instrumentation on only while counting): "
        f"{requests:,} requests per variant by 16 concurrent callers over {TENANTS * items:,} "
        f"warm keys drawn with a fixed seed, after {warm:,} reads at random (unrecorded); the "
        "floor's requests first, then ours over the same draw of keys, each a dump of its own. "
        "Instructions are not time (a SHA-256 counts far more under valgrind than it costs); "
        "floor / ours is what req/s would be if they were. The near cache is off (under "
        "valgrind its time bounds empty it over and over)."
    )
    return {
        "name": "instructions",
        "title": "Instructions per request over a large working set (callgrind, vs the floor)",
        "columns": [
            "path",
            "warm keys",
            "ours",
            "floor",
            "ours − floor",
            "floor / ours",
        ],
        "rows": rows,
        "notes": notes,
        "chart": {
            "type": "bar",
            "labels": list(data),
            "series": {
                "instructions above the floor": [d["ours"] - d["floor"] for d in data.values()]
            },
            "unit": "instructions",
        },
        "data": data,
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
