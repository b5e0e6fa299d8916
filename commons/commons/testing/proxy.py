"""A loopback TCP proxy between a client and a Redis server, for faults of the network itself.

Killing or pausing the server breaks every connection alike and both ends notice. The faults that
fool a client are one-sided: a NAT or load balancer that drops one idle connection (the server
closes it and forgets what it tracked, the client hears nothing), a path that delays one direction.
The proxy runs in a thread of its own (any event loop, any process may use it) and forwards each
accepted connection to the server; each :class:`ProxiedConnection` can then be:

- :meth:`~ProxiedConnection.sever_silently`: the server's side is closed (the server sees the
  client go), the client's side stays open and hears nothing more; what it sends goes nowhere.
- :meth:`~ProxiedConnection.delay_replies`: every byte from the server reaches the client that
  much later (in order).
- :meth:`~ProxiedConnection.black_hole`: one direction's bytes are dropped, nobody is told (a
  one-way partition); the other direction still flows.
- :meth:`~ProxiedConnection.close`: both sides closed, both ends told (what ends a fault: a NAT
  that finally resets the connection).

Connections are told apart by what the client sent (:attr:`ProxiedConnection.sent`): the near
cache's read connection starts with ``CLIENT TRACKING``, its subscribed one sends ``SUBSCRIBE``.
When several processes share a proxy, a connection's :attr:`ProxiedConnection.client_port` (the
client's own port) tells whose it is (:func:`commons.testing.processes.loopback_tcp_ports`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from commons.testing.redis_server import RedisServer, free_port

__all__ = ["LoopbackProxy", "ProxiedConnection", "start_or_let_go"]

#: How much of what the client sent a connection keeps, to be told apart by.
_SENT_KEPT_BYTES = 4096


@dataclass(eq=False)
class ProxiedConnection:
    """One client connection through the proxy, and the server connection it is forwarded to."""

    _proxy: LoopbackProxy
    _client_writer: asyncio.StreamWriter
    _server_writer: asyncio.StreamWriter
    #: The client's port on its side of the connection.
    client_port: int = 0
    #: The first bytes the client sent (up to 4 KiB).
    sent: bytearray = field(default_factory=bytearray)
    severed: bool = False
    reply_delay: float = 0.0
    #: What :meth:`black_hole` drops: ``"to_server"``, ``"to_client"`` or ``None``.
    dropped: str | None = None

    def sever_silently(self) -> None:
        """Closes the server's side only: the client is told nothing, ever."""
        self._proxy.call(self._sever)

    def delay_replies(self, seconds: float) -> None:
        """From now on, what the server sends reaches the client ``seconds`` later."""
        self.reply_delay = seconds

    def black_hole(self, direction: str) -> None:
        """From now on the bytes going ``direction`` (``"to_server"``: the client's commands,
        ``"to_client"``: the server's replies) are dropped; neither end is told."""
        if direction not in ("to_server", "to_client"):
            raise ValueError(f"unknown direction {direction!r}")
        self.dropped = direction

    @property
    def upstream_port(self) -> int:
        """The server's port (the proxy forwards to it)."""
        return self._proxy.upstream_port

    @property
    def open(self) -> bool:
        """Whether both sides are still open (neither end closed it, no fault closed it)."""
        return not (
            self.severed or self._client_writer.is_closing() or self._server_writer.is_closing()
        )

    @property
    def faulty(self) -> bool:
        """Whether a fault is on: severed, black-holed or delayed."""
        return self.severed or self.dropped is not None or self.reply_delay > 0

    def close(self) -> None:
        """Closes both sides: the client and the server both see the connection end."""
        self._proxy.call(self._close)

    def _close(self) -> None:
        self.severed = True
        self._client_writer.close()
        self._server_writer.close()

    def _sever(self) -> None:
        self.severed = True
        self._server_writer.close()


class LoopbackProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<upstream_port>``.

    Args:
        upstream_port: The server's port.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.connections: list[ProxiedConnection] = []
        #: The reply delay of connections accepted from now on.
        self.reply_delay = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LoopbackProxy:
        self._thread.start()
        self._server = self.call(self._listen)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.call(self._close)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> LoopbackProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, function: Callable[[], Any]) -> Any:
        """Runs ``function`` (or awaits the coroutine it returns) on the proxy's loop."""
        done: Future[Any] = Future()

        def run() -> None:
            try:
                result = function()
            except BaseException as exc:
                done.set_exception(exc)
                return
            if asyncio.iscoroutine(result):
                task = self._loop.create_task(result)
                task.add_done_callback(lambda t: _copy_outcome(t, done))
            else:
                done.set_result(result)

        self._loop.call_soon_threadsafe(run)
        return done.result(timeout=10)

    def delay_replies(self, seconds: float) -> None:
        """Delays the server's bytes by ``seconds`` on every connection, and on new ones."""
        self.reply_delay = seconds
        for connection in list(self.connections):
            connection.delay_replies(seconds)

    def connections_that_sent(self, marker: bytes) -> list[ProxiedConnection]:
        """The connections whose first bytes contain ``marker`` (e.g. ``b"TRACKING"``)."""
        return [c for c in list(self.connections) if marker in c.sent and not c.severed]

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in self.connections:
            connection._client_writer.close()
            connection._server_writer.close()
        # The connections' forwarding tasks end here, not when the loop is collected.
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port
            )
        except OSError:
            client_writer.close()
            return
        peer = client_writer.get_extra_info("peername")
        connection = ProxiedConnection(self, client_writer, server_writer, int(peer[1]))
        connection.reply_delay = self.reply_delay
        self.connections.append(connection)
        await asyncio.gather(
            self._to_server(connection, client_reader, server_writer),
            self._to_client(connection, server_reader, client_writer),
            return_exceptions=True,
        )

    async def _to_server(
        self,
        connection: ProxiedConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        while data := await reader.read(65536):
            if len(connection.sent) < _SENT_KEPT_BYTES:
                connection.sent += data[: _SENT_KEPT_BYTES - len(connection.sent)]
            if connection.severed or connection.dropped == "to_server":
                continue  # the client's bytes go nowhere
            writer.write(data)
            await writer.drain()
        if not connection.severed:
            writer.close()

    async def _to_client(
        self,
        connection: ProxiedConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        # Read as bytes arrive, write each chunk once its delay (if any) has passed since then.
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            while data := await reader.read(65536):
                chunks.put_nowait((time.monotonic(), data))
            chunks.put_nowait((time.monotonic(), b""))

        reading = asyncio.create_task(read())
        try:
            while True:
                arrived, data = await chunks.get()
                if connection.severed:
                    return
                if not data:
                    writer.close()  # the server closed: the client hears it
                    return
                if connection.dropped == "to_client":
                    continue
                wait = arrived + connection.reply_delay - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
        finally:
            reading.cancel()


def _copy_outcome(task: asyncio.Task[Any], done: Future[Any]) -> None:
    if task.cancelled():
        done.cancel()
    elif (exc := task.exception()) is not None:
        done.set_exception(exc)
    else:
        done.set_result(task.result())


def start_or_let_go(server: RedisServer, proxies: dict[int, LoopbackProxy]) -> RedisServer:
    """Starts ``server``; if it fails, stops it and the proxy in front of it (``proxies``, by
    the server's port), so that its owner may try again on other ports."""
    try:
        return server.start()
    except BaseException:
        server.stop()
        proxy = proxies.pop(server.port, None)
        if proxy is not None:
            proxy.stop()
        raise
