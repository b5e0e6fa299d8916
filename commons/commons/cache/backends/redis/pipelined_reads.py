"""Pipelined reads: a process's reads share one Redis connection and travel in batches.

A hit is one read (an ``MGET`` of the entry and its scope's generations), and redis-py's asyncio
client spends most of a hit's time around it: checking a connection out of the pool and back in,
packing the command, arming a read with its own timeout, waking the caller. Measured on 2 cores:
about 100 us of CPU per GET. Here the reads that requests issue in the same event-loop iteration
are written with one send on one connection, and the replies are parsed by hiredis as the event
loop hands the bytes over (the reader is the transport's protocol) and handed out in order: 5 to
15 us per GET (more for larger values), and fewer system calls the busier the process is.

Why replies cannot go to the wrong request: Redis answers a connection's commands in the order it
received them, so the n-th reply belongs to the n-th GET still waiting. Whatever could break that
pairing (an unexpected reply, a protocol error, a timeout, a closed socket) closes the connection
and fails every GET still waiting on it; the next GET opens a new connection. A GET that finds
its connection dropped (a restarted server) is sent once more, at once, on a new one, as redis-py
retries its own commands; a timeout is not retried. A GET whose caller
was cancelled keeps its place in the queue and its reply is dropped. An error reply (``NOPERM``,
``LOADING``, ...) belongs to its GET and leaves the connection as it is.

What a read sees: a GET is sent after everything its request awaited before it, so it observes
every write and invalidation that had returned by then, whichever connection made them.

Bounds: every GET waits at most ``timeout`` for its reply, opening a connection (connect,
handshake, log-in) takes at most ``open_timeout``, a GET queued on a connection that broke before
it was sent fails at once (and is sent once more on a new one), and at most ``max_pending`` GETs
wait at once; past that a GET is refused at once (:class:`redis.exceptions.MaxConnectionsError`,
a miss for the layer), as the pool refuses a command past ``REDIS_MAX_CONNECTIONS``.

Errors are raised as redis-py's exceptions, so the store translates them in its one place.

Tracking (for the near cache, ``near.py``): given a :class:`ReadTracking`, the reader sends its
``CLIENT TRACKING`` command first on every connection it opens (and again on the open one when
:meth:`PipelinedReader.retrack` is called); the connection records the session it is tracked into
once the command's ``OK`` is parsed, which in Redis' reply order is before the reply of any read
sent after it. :meth:`PipelinedReader.mget_tracked` reports that session with the values, and a
tracked connection that closes reports it lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol

import hiredis
from redis import exceptions as redis_errors

from commons.cache.backends.redis.read_channel import (
    ReadChannel,
    channel_opener,
    connection_opener,
    encode_command,
)

__all__ = [
    "PipelinedReader",
    "ReadChannel",
    "ReadTracking",
    "channel_opener",
    "connection_opener",
    "encode_command",
]

#: Error replies a read or a fill's script can meet, by their first word, as redis-py names them
#: (the refusals keep their own text in ``cache_status()``: ``translation.py``); others are
#: plain ``ResponseError``.
_ERROR_REPLIES: dict[str, type[redis_errors.RedisError]] = {
    "NOPERM": redis_errors.NoPermissionError,
    "NOAUTH": redis_errors.AuthenticationError,
    "LOADING": redis_errors.BusyLoadingError,
    "NOSCRIPT": redis_errors.NoScriptError,
    "OOM": redis_errors.OutOfMemoryError,
    "READONLY": redis_errors.ReadOnlyError,
    "MASTERDOWN": redis_errors.MasterDownError,
}


class ReadTracking(Protocol):
    """Where read connections get their tracking command and report its fate (``near.py``)."""

    def tracking_command(self) -> tuple[int, tuple[bytes, ...]] | None:
        """The session to track a connection into and the commands that do it (the last one's
        ``OK`` confirms it), or ``None``."""

    def tracked_connection_lost(self, session: int) -> None:
        """A connection tracked into ``session`` closed."""

    def tracking_refused(self, message: str) -> None:
        """Redis answered the tracking command with an error."""


def _seen(reply: asyncio.Future[Reply]) -> None:
    if not reply.cancelled():
        reply.exception()


#: What a GET, an MGET or a PTTL is answered with.
Reply = bytes | int | None | list[bytes | None]
#: Replies handed out as they are parsed (beside nil and a list of values).
_PLAIN_REPLIES = (bytes, int)


def _is_bulk_list(reply: object) -> bool:
    if type(reply) is not list:
        return False
    for item in reply:  # noqa: SIM110 - a loop: no generator on every hit
        if item is not None and type(item) is not bytes:
            return False
    return True


def _error_reply(reply: hiredis.ReplyError) -> redis_errors.RedisError:
    message = str(reply)
    kind = _ERROR_REPLIES.get(message.split(" ", 1)[0], redis_errors.ResponseError)
    return kind(message)


class _Connection(asyncio.Protocol):
    """One connection and the GETs waiting on it, oldest first.

    It becomes the transport's protocol: replies are parsed as the event loop hands the bytes
    over, with no reader task to wake and no stream buffer to copy them through.
    """

    def __init__(
        self,
        channel: ReadChannel,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        tracking: ReadTracking | None = None,
    ) -> None:
        self.channel = channel
        self.loop = loop
        self.timeout = timeout
        self.broken = False
        self.tracking = tracking
        #: The tracking session this connection's reads are tracked into (see the module doc).
        self.session: int | None = None
        #: Waiting commands: their future and the loop time their reply is due by.
        self.waiting: deque[tuple[asyncio.Future[Reply], float]] = deque()
        self._parser = hiredis.Reader()
        self._unsent: list[bytes] = []
        self._deadline_timer: asyncio.TimerHandle | None = None
        transport = channel.transport
        transport.set_protocol(self)
        if transport.is_closing():
            # Lost while it was being opened: the stream's protocol heard it, this one never will.
            self.fail(redis_errors.ConnectionError("the connection to Redis was lost"))
        # The stream protocol it replaces may have paused reading; nothing is buffered there,
        # since nothing was sent since the handshake.
        with contextlib.suppress(Exception):
            transport.resume_reading()

    def send(self, command: bytes) -> asyncio.Future[Reply]:
        """Queues one encoded command; its future gets the reply (or the connection's failure)."""
        if self.broken:
            # Dropped before this command could be sent (right after opening, say): nothing
            # would ever answer it, nor time it out.
            raise redis_errors.ConnectionError("the connection to Redis was lost")
        future: asyncio.Future[Reply] = self.loop.create_future()
        due = self.loop.time() + self.timeout
        self.waiting.append((future, due))
        if not self._unsent:
            # The first command of this loop iteration: the others join it in one send.
            self.loop.call_soon(self._send)
        self._unsent.append(command)
        if self._deadline_timer is None:
            self._deadline_timer = self.loop.call_at(due, self._check_deadline)
        return future

    def track(self, session: int, commands: tuple[bytes, ...]) -> None:
        """Sends the tracking ``commands``; reads sent after them are tracked into ``session``."""
        *before, last = commands
        for command in before:
            # What they answer is the last one's to say (a refusal refuses that one too).
            self.send(command).add_done_callback(_seen)
        self.send(last).add_done_callback(partial(self._tracked, session))

    def _tracked(self, session: int, reply: asyncio.Future[Reply]) -> None:
        # Called back in the order replies were parsed (futures schedule their callbacks, and a
        # read's waiter, in the order their results are set): before any later read resumes.
        if reply.cancelled():
            return
        error = reply.exception()
        if error is None and reply.result() == b"OK":
            self.session = session
        elif isinstance(error, redis_errors.ResponseError) and self.tracking is not None:
            self.tracking.tracking_refused(str(error).split(" ", 1)[0])

    def _send(self) -> None:
        if self.broken:
            return
        unsent = self._unsent
        try:
            # One command (a quiet moment): written as it is, not copied by a join.
            self.channel.transport.write(unsent[0] if len(unsent) == 1 else b"".join(unsent))
        except Exception as exc:  # a closed transport, a TLS error
            self.fail(redis_errors.ConnectionError(f"sending to Redis failed: {exc}"))
        finally:
            self._unsent.clear()

    def _check_deadline(self) -> None:
        self._deadline_timer = None
        if self.broken or not self.waiting:
            return
        due = self.waiting[0][1]
        if due <= self.loop.time():
            self.fail(redis_errors.TimeoutError("Redis did not answer in time"))
        else:
            self._deadline_timer = self.loop.call_at(due, self._check_deadline)

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        parser, waiting = self._parser, self.waiting
        try:
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                if not waiting:
                    raise redis_errors.InvalidResponse("a reply no GET was waiting for")
                future = waiting.popleft()[0]
                if future.done():  # its caller gave up; the reply is dropped
                    continue
                if reply is None or type(reply) in _PLAIN_REPLIES or _is_bulk_list(reply):
                    future.set_result(reply)
                elif isinstance(reply, hiredis.ReplyError):
                    future.set_exception(_error_reply(reply))
                else:
                    raise redis_errors.InvalidResponse(
                        f"a read was answered with {type(reply).__name__}"
                    )
        except hiredis.ProtocolError as exc:
            self.fail(redis_errors.InvalidResponse(f"unreadable reply from Redis: {exc}"))
        except redis_errors.RedisError as exc:
            self.fail(exc)

    def eof_received(self) -> bool | None:
        self.fail(redis_errors.ConnectionError("Redis closed the connection"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc is not None else ""
        self.fail(redis_errors.ConnectionError(f"the connection to Redis was lost{reason}"))

    # -- failure -------------------------------------------------------------------------------

    def fail(self, error: redis_errors.RedisError) -> None:
        """Closes the connection; every GET still waiting on it fails with ``error``."""
        if self.broken:
            return
        self.broken = True
        if self.session is not None and self.tracking is not None:
            self.tracking.tracked_connection_lost(self.session)
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        while self.waiting:
            future = self.waiting.popleft()[0]
            if not future.done():
                future.set_exception(error)
                # Marked as seen: a caller that already gave up must not leave a warning behind.
                future.exception()
        self._unsent.clear()
        with contextlib.suppress(Exception):
            self.channel.close()


async def _exchange(connection: _Connection, command: bytes, before: bytes) -> tuple[Reply, Reply]:
    """The replies to ``command`` and to ``before``, sent before it in the same write; if one
    fails, the other's reply is dropped unseen."""
    before_reply = connection.send(before)
    reply = connection.send(command)
    try:
        first = await before_reply
        return await reply, first
    finally:
        if not reply.done():
            reply.cancel()  # its caller gave up, or the first failed: dropped when it comes
        elif not reply.cancelled():
            reply.exception()  # seen, whatever became of the first


class PipelinedReader:
    """GETs on one connection of their own, pipelined; reconnects after any failure.

    Args:
        open_channel: Opens a new connection, authenticated and on the right database.
        timeout: Seconds a GET waits for its reply before the connection is given up.
        max_pending: GETs that may wait at once; more are refused as busy.
        open_timeout: Seconds opening a connection may take; ``3 * timeout`` by default.
    """

    def __init__(
        self,
        open_channel: Callable[[], Awaitable[ReadChannel]],
        *,
        timeout: float,
        max_pending: int,
        open_timeout: float | None = None,
        tracking: ReadTracking | None = None,
    ) -> None:
        self._open_channel = open_channel
        self._tracking = tracking
        self._timeout = timeout
        self._open_timeout = 3 * timeout if open_timeout is None else open_timeout
        self._max_pending = max_pending
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._closed = False

    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or ``None`` (see :meth:`mget`)."""
        reply = (await self._call(encode_command(b"GET", [key])))[0]
        if reply is not None and type(reply) is not bytes:
            raise redis_errors.InvalidResponse("a GET was not answered with a value")
        return reply

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        """The values under ``keys`` (``None`` where absent), read in one atomic command.

        Raises:
            redis.exceptions.RedisError: The reply did not come (the connection is then closed),
                or Redis answered with an error.
        """
        return await self.mget_encoded(encode_command(b"MGET", keys), len(keys))

    async def mget_encoded(self, command: bytes, count: int) -> list[bytes | None]:
        """:meth:`mget` of a command already encoded (:func:`encode_command`) for ``count`` keys:
        a caller that reads the same keys again and again encodes them once."""
        reply = (await self._call(command))[0]
        if not isinstance(reply, list) or len(reply) != count:
            raise redis_errors.InvalidResponse("an MGET was not answered with its values")
        return reply

    async def mget_tracked(
        self, command: bytes, count: int
    ) -> tuple[list[bytes | None], int | None]:
        """:meth:`mget_encoded`, and the tracking session its connection was in at the reply."""
        reply, _, connection = await self._call(command)
        if not isinstance(reply, list) or len(reply) != count:
            raise redis_errors.InvalidResponse("an MGET was not answered with its values")
        return reply, connection.session

    async def mget_with_ttl(
        self, command: bytes, count: int, ttl_command: bytes
    ) -> tuple[list[bytes | None], int, int | None]:
        """:meth:`mget_tracked`, and in the same round trip the remaining time to live of the
        first key in milliseconds (``ttl_command``: its ``PTTL``, :func:`encode_command`), as
        Redis counts it (negative: no such key, or no expiry).

        The ``PTTL`` is sent first: a write landing between the two commands then makes the
        time to live belong to the older value, which expires sooner, so it errs short.
        """
        reply, ttl_ms, connection = await self._call(command, ttl_command)
        if type(ttl_ms) is not int:
            raise redis_errors.InvalidResponse("a PTTL was not answered with an integer")
        if not isinstance(reply, list) or len(reply) != count:
            raise redis_errors.InvalidResponse("an MGET was not answered with its values")
        return reply, ttl_ms, connection.session

    async def run_script(self, command: bytes) -> int:
        """The integer a script answers (``command``: its ``EVALSHA``, :func:`encode_command`).

        A write rides this connection too: it is one more command in the same order, and a fill
        then costs a miss no trip through redis-py's pool and transaction code. Sent again on a
        new connection when the open one was found dropped, as a read is: a fill may run twice,
        which stores the same bytes or, after an invalidation between the two, is refused.

        Raises:
            redis.exceptions.NoScriptError: The server does not know the script.
            redis.exceptions.RedisError: As :meth:`mget`.
        """
        reply = (await self._call(command))[0]
        if type(reply) is not int:
            raise redis_errors.InvalidResponse("a script was not answered with an integer")
        return reply

    def retrack(self) -> None:
        """Sends the tracking command again on the open connection (a new session began)."""
        connection = self._connection
        command = self._tracking.tracking_command() if self._tracking is not None else None
        if command is None or connection is None or connection.broken:
            return
        with contextlib.suppress(RuntimeError):
            if connection.loop is not asyncio.get_running_loop():
                return
            connection.track(*command)

    async def _call(
        self, command: bytes, before: bytes | None = None
    ) -> tuple[Reply, Reply, _Connection]:
        """The reply to ``command``, the reply to ``before`` (sent just before it, in the same
        write; ``None`` if not given), and the connection they came on."""
        connection = self._usable_connection(asyncio.get_running_loop())
        if connection is None:
            connection = await self._connect()
        if len(connection.waiting) >= self._max_pending:
            raise redis_errors.MaxConnectionsError("too many reads are waiting for Redis")
        try:
            if before is None:  # a hit's path: no coroutine of its own
                return await connection.send(command), None, connection
            return *(await _exchange(connection, command, before)), connection
        except redis_errors.BusyLoadingError:
            raise
        except redis_errors.ConnectionError:
            # The connection was dropped (a restarted server): once more, at once, on a new one,
            # as redis-py retries its own commands. A timeout is not retried.
            connection = await self._connect()
            if before is None:
                return await connection.send(command), None, connection
            return *(await _exchange(connection, command, before)), connection

    def _usable_connection(self, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        """The open connection, if there is one and ``loop`` can drive it."""
        connection = self._connection
        if connection is None or connection.broken or connection.loop is not loop:
            return None
        return connection

    async def _connect(self) -> _Connection:
        if self._closed:
            raise redis_errors.ConnectionError("the cache is closed")
        loop = asyncio.get_running_loop()
        current = self._usable_connection(loop)
        if current is not None:
            return current  # another GET reconnected meanwhile
        if self._connecting is None or self._connecting.get_loop() is not loop:
            # A task of its own: a caller cancelled meanwhile does not abort the others' wait.
            self._connecting = loop.create_task(self._open(loop))
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, task: asyncio.Task[_Connection]) -> None:
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled():
            task.exception()  # seen, even when every caller gave up waiting

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        previous = self._connection
        if previous is not None and not previous.broken:
            # Opened on another event loop, which can no longer drive it.
            previous.fail(redis_errors.ConnectionError("the event loop changed"))
        try:
            async with asyncio.timeout(self._open_timeout):
                channel = await self._open_channel()
        except TimeoutError as exc:
            raise redis_errors.TimeoutError("opening a connection to Redis timed out") from exc
        if self._closed:
            channel.close()
            raise redis_errors.ConnectionError("the cache is closed")
        connection = _Connection(channel, loop, self._timeout, self._tracking)
        if self._tracking is not None and not connection.broken:
            command = self._tracking.tracking_command()
            if command is not None:
                # First on the connection: every read sent on it is tracked.
                connection.track(*command)
        self._connection = connection
        return connection

    async def aclose(self) -> None:
        """Closes the connection; GETs still waiting fail, later ones are refused."""
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.fail(redis_errors.ConnectionError("the cache is closing"))
