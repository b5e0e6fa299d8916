"""A service worker for tests: a uvicorn process that can be stopped, killed and started again."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from commons.testing.processes import stop_process
from commons.testing.redis_server import free_port

__all__ = ["ServiceProcess"]

#: Times a first start moves to another port when the one it was given was taken meanwhile.
_PORT_CHANGES = 3


class ServiceProcess:
    """One uvicorn process serving ``app`` (``module:attribute`` in ``app_dir``) on a port of its
    own, with exactly ``env`` as its environment; the port survives a stop or a kill, so
    :meth:`start` serves the same address again. Its ``GET /health`` answers once it serves."""

    def __init__(
        self,
        app: str,
        app_dir: Path,
        env: dict[str, str],
        workdir: Path,
        name: str,
        *,
        workers: int = 1,
        log_level: str = "warning",
    ) -> None:
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{name}.log"
        self._app, self._app_dir = app, app_dir
        self._workdir, self._name, self._starts = workdir, name, 0
        self._options = ["--workers", str(workers), "--log-level", log_level]

    def spawn(self) -> None:
        """Starts the process; :meth:`wait_until_ready` waits for it to serve."""
        self._starts += 1
        # <name>.log for the first start, <name>-<n>.log for the n-th after a stop or a kill.
        suffix = "" if self._starts == 1 else f"-{self._starts}"
        self.log = self._workdir / f"{self._name}{suffix}.log"
        command = [sys.executable, "-m", "uvicorn", self._app, "--app-dir", str(self._app_dir)]
        address = ["--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(  # noqa: S603 - our interpreter, our arguments
                [*command, *address, *self._options],
                env=self.env,
                cwd=self._workdir,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def wait_until_ready(self, timeout: float = 30) -> None:
        """Returns once ``GET /health`` answers 200 (the lifespan's start-up has run)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        port_changes = 0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log.read_text()
                if self._port_taken(log) and port_changes < _PORT_CHANGES:
                    port_changes += 1
                    self._move_to_a_free_port()
                    continue
                raise RuntimeError(f"{self._name} exited at start-up:\n{log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self._name} at {self.url} did not start:\n{self.log.read_text()}")

    def _port_taken(self, log: str) -> bool:
        """Whether a first start found its port taken: between :func:`free_port` and the bind,
        another socket (a test's own client connection, say) may be given it. Only a first start
        may move: a restart serves the address the test already knows."""
        return self._starts == 1 and "address already in use" in log

    def _move_to_a_free_port(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._starts = 0
        self.spawn()

    def start(self) -> ServiceProcess:
        """Starts the process and returns once it serves."""
        self.spawn()
        self.wait_until_ready()
        return self

    def stop(self) -> None:
        """SIGTERM: uvicorn runs the lifespan's shutdown (``close_cache()``), then exits."""
        if self.process is not None:
            stop_process(self.process)

    def kill(self) -> None:
        """SIGKILL: the process ends at once; nothing of its shutdown runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
