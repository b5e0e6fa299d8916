"""Plumbing of the traffic benchmarks (``mixed``, ``working_set``): server, keyed load, counters.

The server is ``bench/_keyed_app.py`` under uvicorn, one worker, in a subprocess. The load is wrk
with ``bench/_keyed.lua`` choosing each request's key when wrk is installed, else
``bench/_loadgen.py``'s client in keyed mode; 16 keep-alive connections, one request in flight on
each.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench._common import REPO_ROOT, child_env, stop_process, wait_for_port
from bench._keyed_app import NAMESPACE
from bench._loadgen import run_client, run_wrk, wrk_binary

#: Keep-alive connections of the load generator (the issue's setup).
CONNECTIONS = 16
#: wrk's script for keyed traffic.
KEYED_SCRIPT = Path(__file__).resolve().parent / "_keyed.lua"


class KeyedServer:
    """``bench/_keyed_app.py`` served by uvicorn on a free port, for a ``with`` block."""

    def __init__(self, redis_url: str, *, near: bool = True, freeze: bool = True) -> None:
        from commons.testing.redis_server import free_port

        self.port = free_port()
        command = [
            sys.executable,
            "-c",
            "from bench._keyed_app import serve; serve()",
            "--redis-url",
            redis_url,
            "--port",
            str(self.port),
        ]
        if not near:
            command.append("--near-off")
        if freeze:
            command.append("--freeze")
        self.command = command
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> KeyedServer:
        self.process = subprocess.Popen(self.command, cwd=REPO_ROOT, env=child_env())
        wait_for_port("127.0.0.1", self.port, proc=self.process)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            stop_process(self.process)

    def load(
        self,
        variant: str,
        tenants: int,
        items: int,
        *,
        seconds: float,
        fresh_share: float = 0.0,
        sweep: bool = False,
        warmup: float = 0.2,
    ) -> dict[str, float]:
        """Keyed load on ``/{variant}/{tenant}/{item}`` (see ``_loadgen.KeyedPaths``): by wrk
        and ``bench/_keyed.lua`` when wrk is installed (a warm pass by the Python client)."""
        if wrk_binary() is not None and not sweep:
            seed = random.getrandbits(30)
            args = [variant, str(tenants), str(items), str(fresh_share), str(seed), f"w{seed:x}"]
            result = run_wrk(
                self.port, "/", CONNECTIONS, seconds, script=str(KEYED_SCRIPT), script_args=args
            )
            if result["errors"]:
                raise RuntimeError(f"/{variant}: {result['errors']} failed requests under load")
            return result
        extra = ["--tenants", str(tenants), "--items", str(items)]
        extra += ["--fresh-share", str(fresh_share), *(["--sweep"] if sweep else [])]
        result = run_client(
            self.port,
            f"/{variant}/{{tenant}}/{{item}}",
            CONNECTIONS,
            seconds,
            warmup=0 if sweep else warmup,
            extra=extra,
        )
        if result["errors"]:
            raise RuntimeError(f"/{variant}: {result['errors']} failed requests under load")
        return result

    def hits(self) -> tuple[float, float]:
        """Our HITs and near-cache hits so far, from the server's ``/metrics``."""
        import httpx

        return hits_in_metrics(httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text)

    def rss_mib(self) -> float:
        """The server process's resident memory, MiB (Linux; NaN elsewhere)."""
        assert self.process is not None
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return float("nan")
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def load_generator() -> str:
    """What loads the keyed traffic in this run, for the notes."""
    if wrk_binary() is not None:
        return "wrk (1 thread, bench/_keyed.lua choosing each request's key)"
    return "bench/_loadgen.py's keyed client (wrk is not installed)"


def hits_in_metrics(text: str) -> tuple[float, float]:
    """Our HITs and near-cache hits (the keyed app's namespace) in a ``/metrics`` page."""
    from prometheus_client.parser import text_string_to_metric_families

    counted = {"commons_cache_hits": 0.0, "commons_cache_near_hits": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name in counted:
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["namespace"] == NAMESPACE:
                    counted[family.name] += sample.value
    return counted["commons_cache_hits"], counted["commons_cache_near_hits"]


def near_share(before: tuple[float, float], after: tuple[float, float]) -> float:
    """The share of HITs between two :meth:`KeyedServer.hits` readings the near cache answered."""
    hits, near = after[0] - before[0], after[1] - before[1]
    return near / hits if hits else 0.0


def paired(rows: list[dict[str, Any]], key: str) -> list[float]:
    """Each round's figure ``key`` over the floor's beside it (``floor`` in the row)."""
    return [row[key] / row["floor"][key] for row in rows if row["floor"][key]]
