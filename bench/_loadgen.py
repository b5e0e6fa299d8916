"""Load generators: wrk when it is installed, else a small HTTP/1.1 keep-alive client of our own.

:func:`run_wrk` runs ``wrk`` (a C load generator: Debian's and Homebrew's ``wrk`` package), the
tool the issue's reference numbers were measured with; its own cost per request is small, so the
server under test gets the CPU. Without it, the Python client below stands in:

``python -m bench._loadgen --port N --path /x [--connections 16] [--duration 3] [--warmup 0.5]``
(keyed traffic: ``--path '/ours/{tenant}/{item}' --tenants T --items I [--fresh-share 0.02]
[--sweep]``, see :class:`KeyedPaths`) opens ``connections`` keep-alive connections to 127.0.0.1
and keeps exactly one request in flight on each (a closed loop, as wrk does), for ``warmup``
seconds unrecorded and then ``duration`` seconds recorded. It prints one JSON line: requests,
req/s, p50/p99 latency and errors. Raw asyncio protocols (on uvloop when installed) keep the
client's cost per request to a few microseconds, so one process saturates one uvicorn worker.
Responses must carry ``Content-Length`` (uvicorn's do).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import cast

from bench._common import percentile

#: The headers every load generator sends (the app reads no identity from them; realistic size).
REQUEST_HEADERS = {"Authorization": "Bearer bench", "Accept": "application/json"}
_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk_binary() -> str | None:
    """The ``wrk`` on PATH, if any."""
    return shutil.which("wrk")


def run_wrk(
    port: int,
    path: str,
    connections: int,
    seconds: float,
    *,
    script: str | None = None,
    script_args: Sequence[str] = (),
) -> dict[str, float]:
    """``wrk`` with one thread and ``connections`` keep-alive connections for ``seconds``
    (``script``: a Lua script choosing each request, given ``script_args``)."""
    binary = wrk_binary()
    if binary is None:
        raise RuntimeError("wrk is not installed")
    command = [binary, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    for name, value in REQUEST_HEADERS.items():
        command += ["-H", f"{name}: {value}"]
    if script is not None:
        command += ["-s", script]
    command.append(f"http://127.0.0.1:{port}{path}")
    if script_args:
        command += ["--", *script_args]
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 30, check=True
    ).stdout
    requests = re.search(r"(\d+) requests in", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s|m)\b", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s|m)\b", out)
    if not (requests and rate and p50 and p99):
        raise RuntimeError(f"unreadable wrk output: {out[-800:]}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests": int(requests.group(1)),
        "rps": float(rate.group(1)),
        "p50_ms": float(p50.group(1)) * _WRK_UNITS[p50.group(2)],
        "p99_ms": float(p99.group(1)) * _WRK_UNITS[p99.group(2)],
        "errors": errors + (int(non_2xx.group(1)) if non_2xx else 0),
    }


def run_client(
    port: int,
    path: str,
    connections: int,
    seconds: float,
    *,
    warmup: float = 0.2,
    extra: Sequence[str] = (),
) -> dict[str, float]:
    """The Python client below in a process of its own (``extra``: more of its arguments)."""
    from bench._common import REPO_ROOT, child_env

    command = [sys.executable, "-m", "bench._loadgen", "--port", str(port), "--path", path]
    command += ["--connections", str(connections), "--duration", str(seconds)]
    command += ["--warmup", str(warmup), *extra]
    proc = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed on {path}: {proc.stderr[-1500:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["requests"]:
        raise RuntimeError(f"no successful request on {path}")
    return result


class _Connection(asyncio.Protocol):
    def __init__(self, requests: Callable[[], bytes | None], state: _State) -> None:
        self.requests = requests
        self.state = state
        self.buffer = bytearray()
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        #: This side hung up (the run is over): not an error.
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        request = None if self.state.stopping else self.requests()
        if request is None:
            self.closing = True
            self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            marker = head.find(b"content-length:")
            if marker < 0:
                self.state.errors += 1
                assert self.transport is not None
                self.transport.close()
                return
            line_end = head.find(b"\r\n", marker)
            length = int(head[marker + 15 : line_end if line_end > 0 else None])
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            status_ok = head.startswith(b"http/1.1 200")
            del self.buffer[:total]
            self.state.record(self.sent_at, time.perf_counter(), status_ok)
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.state.stopping and not self.closing:
            self.state.errors += 1  # the server hung up mid-run
        if not self.closed.done():
            self.closed.set_result(None)


class _State:
    def __init__(self, record_from: float, record_until: float) -> None:
        self.record_from = record_from
        self.record_until = record_until
        self.latencies: list[float] = []
        self.errors = 0
        self.stopping = False

    def record(self, sent: float, done: float, ok: bool) -> None:
        if self.record_from <= sent and done <= self.record_until:
            if ok:
                self.latencies.append(done - sent)
            else:
                self.errors += 1
        if done > self.record_until:
            self.stopping = True


def _request(port: int, path: str) -> bytes:
    headers = "".join(f"{name}: {value}\r\n" for name, value in REQUEST_HEADERS.items())
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n".encode()


class KeyedPaths:
    """The paths of keyed traffic: ``template`` (with ``{tenant}`` and ``{item}``) over
    ``tenants`` x ``items`` warm keys, each request a warm key chosen uniformly at random, or
    with probability ``fresh_share`` a key never asked for before (a miss and a fill).

    ``sweep``: every warm key once, in order, then nothing more (a warm pass).
    """

    def __init__(
        self,
        template: str,
        tenants: int,
        items: int,
        *,
        fresh_share: float = 0.0,
        sweep: bool = False,
        seed: int | None = None,
    ) -> None:
        self.template = template
        self.tenants = tenants
        self.items = items
        self.fresh_share = fresh_share
        self.sweep = sweep
        self.swept = 0
        self.random = random.Random(seed)
        # Fresh keys of one run never collide with another run's (or a warm key's).
        self.fresh_tag = f"f{self.random.getrandbits(40):x}"
        self.fresh = 0

    def next_path(self) -> str | None:
        if self.sweep:
            index = self.swept
            if index >= self.tenants * self.items:
                return None
            self.swept += 1
            return self.template.format(tenant=f"t{index // self.items}", item=index % self.items)
        rand = self.random
        tenant = f"t{rand.randrange(self.tenants)}"
        if self.fresh_share and rand.random() < self.fresh_share:
            self.fresh += 1
            return self.template.format(tenant=tenant, item=f"{self.fresh_tag}-{self.fresh}")
        return self.template.format(tenant=tenant, item=rand.randrange(self.items))


async def load(
    port: int,
    path: str,
    connections: int,
    duration: float,
    warmup: float,
    keyed: KeyedPaths | None = None,
) -> dict[str, float]:
    """``connections`` closed loops on ``path`` (or on ``keyed``'s paths) for ``duration``."""
    loop = asyncio.get_running_loop()
    if keyed is None:
        request = _request(port, path)

        def requests() -> bytes | None:
            return request
    else:

        def requests() -> bytes | None:
            next_path = keyed.next_path()
            return None if next_path is None else _request(port, next_path)

    start = time.perf_counter()
    state = _State(start + warmup, start + warmup + duration)
    protocols = []
    for _ in range(connections):
        _, protocol = await loop.create_connection(
            lambda: _Connection(requests, state), "127.0.0.1", port
        )
        protocols.append(protocol)
    finished = asyncio.gather(*(p.closed for p in protocols))
    with contextlib.suppress(TimeoutError):
        # A sweep ends when its keys are all asked for; anything else when the time is up.
        await asyncio.wait_for(asyncio.shield(finished), timeout=warmup + duration)
    state.stopping = True
    await asyncio.wait_for(finished, timeout=10)
    latencies = state.latencies
    return {
        "requests": len(latencies),
        "rps": len(latencies) / duration,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "errors": state.errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--tenants", type=int, help="keyed: --path holds {tenant} and {item}")
    parser.add_argument("--items", type=int, default=1, help="keyed: items per tenant")
    parser.add_argument("--fresh-share", type=float, default=0.0, help="keyed: share of misses")
    parser.add_argument("--sweep", action="store_true", help="keyed: every key once, in order")
    args = parser.parse_args()
    keyed = None
    if args.tenants:
        keyed = KeyedPaths(
            args.path, args.tenants, args.items, fresh_share=args.fresh_share, sweep=args.sweep
        )
    coroutine = load(args.port, args.path, args.connections, args.duration, args.warmup, keyed)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coroutine)
    else:
        result = uvloop.run(coroutine)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()


# -- bursts: N requests sent at the same instant over pre-opened connections ------------------


async def open_connections(
    port: int, count: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` keep-alive connections to 127.0.0.1:port, opened before the burst."""
    return list(
        await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(count)))
    )


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    status = int(head.split(b" ", 2)[1])
    marker = head.find(b"content-length:")
    length = int(head[marker + 15 : head.find(b"\r\n", marker)]) if marker >= 0 else 0
    return status, await reader.readexactly(length)


async def burst(
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], port: int, path: str
) -> list[tuple[int, bytes]]:
    """One GET of ``path`` on every connection, all written before any answer is read."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    for _, writer in connections:
        writer.write(request)
    return list(await asyncio.gather(*(_read_response(reader) for reader, _ in connections)))
