"""Load generators: wrk when it is installed, else a small HTTP/1.1 keep-alive client of our own.

:func:`run_wrk` runs ``wrk`` (a C load generator: Debian's and Homebrew's ``wrk`` package), the
tool the issue's reference numbers were measured with; its own cost per request is small, so the
server under test gets the CPU. Without it, the Python client below stands in:

``python -m bench._loadgen --port N --path /x [--connections 16] [--duration 3] [--warmup 0.5]``
opens ``connections`` keep-alive connections to 127.0.0.1 and keeps exactly one request in flight on
each (a closed loop, as wrk does), for ``warmup`` seconds unrecorded and then ``duration`` seconds
recorded. It prints one JSON line: requests, req/s, p50/p99 latency and errors. Raw asyncio
protocols (on uvloop when installed) keep the client's cost per request to a few microseconds, so
one process saturates one uvicorn worker. Responses must carry ``Content-Length`` (uvicorn's do).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import time
from typing import cast

from bench._common import percentile

#: The headers every load generator sends (the app reads no identity from them; realistic size).
REQUEST_HEADERS = {"Authorization": "Bearer bench", "Accept": "application/json"}
_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk_binary() -> str | None:
    """The ``wrk`` on PATH, if any."""
    return shutil.which("wrk")


def run_wrk(port: int, path: str, connections: int, seconds: int) -> dict[str, float]:
    """``wrk`` with one thread and ``connections`` keep-alive connections for ``seconds``."""
    binary = wrk_binary()
    if binary is None:
        raise RuntimeError("wrk is not installed")
    command = [binary, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in REQUEST_HEADERS.items():
        command += ["-H", f"{name}: {value}"]
    command.append(f"http://127.0.0.1:{port}{path}")
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


class _Connection(asyncio.Protocol):
    def __init__(self, request: bytes, state: _State) -> None:
        self.request = request
        self.state = state
        self.buffer = bytearray()
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if self.state.stopping:
            self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

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
        if not self.state.stopping:
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


async def load(
    port: int, path: str, connections: int, duration: float, warmup: float
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    headers = "".join(f"{name}: {value}\r\n" for name, value in REQUEST_HEADERS.items())
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n".encode()
    start = time.perf_counter()
    state = _State(start + warmup, start + warmup + duration)
    protocols = []
    for _ in range(connections):
        _, protocol = await loop.create_connection(
            lambda: _Connection(request, state), "127.0.0.1", port
        )
        protocols.append(protocol)
    await asyncio.sleep(warmup + duration)
    state.stopping = True
    await asyncio.wait_for(asyncio.gather(*(p.closed for p in protocols)), timeout=10)
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
    args = parser.parse_args()
    coroutine = load(args.port, args.path, args.connections, args.duration, args.warmup)
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
