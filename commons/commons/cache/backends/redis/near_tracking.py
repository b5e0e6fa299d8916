"""The near cache's tracking session: Redis tells this process which generations changed.

The near cache (``near.py``) holds what reads found; this module keeps the connection Redis sends
its invalidation messages to, and knows whether they can be trusted right now.

- Which keys Redis tracks: only the scope generations, by their prefix (see ``near.py`` for why
  that is enough). The pipelined read connection runs ``CLIENT TRACKING ON REDIRECT <id> BCAST
  PREFIX {prefix}:#gen:``, where ``<id>`` is a second connection of ours, ``SUBSCRIBE``\\d to
  ``__redis__:invalidate``. Redis then sends that connection the name of every generation key of
  the prefix that changes, is deleted, expires or is evicted (of every process: a new scope's, a
  re-armed one's, which costs a message each), and a null message when the database is flushed.
  A message drops the keys it names (everything for a null one).
- A *session* is one life of the subscribed connection. The tracking command is the first
  command of every read connection and is sent again on the open one when a session begins;
  Redis answers a connection's commands in order, so a read whose reply comes after the
  command's ``OK`` was tracked, and only such reads are kept (the connection records the session
  it is tracked into when the ``OK`` is parsed).
- What cannot be confirmed is not answered: losing the subscribed connection (closed, killed,
  ``CLIENT KILL``, full output buffer), no reply on it to a ping sent within the last
  :data:`SILENCE_LIMIT_SECONDS` (it is pinged every :data:`HEARTBEAT_SECONDS`; lateness counts
  from when the ping was sent, so a link whose delay grows slowly is caught as one that went
  quiet; every hit checks it itself, so a busy event loop cannot serve past it), or losing the
  read connection (Redis forgets what a closed connection tracked) empties the near cache at
  once; it keeps nothing until a new session is confirmed.
- A refused ``CLIENT TRACKING`` (an ACL, a server behind one address that changed under it)
  turns the near cache off while Redis refuses: it asks again after 1 s, then after twice as
  long each time, up to a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import hiredis
from redis import exceptions as redis_errors

from commons.cache.backends.redis.read_channel import ReadChannel, encode_command
from commons.cache.events import CacheEvents

__all__ = [
    "HEARTBEAT_SECONDS",
    "SILENCE_LIMIT_SECONDS",
    "FlushReason",
    "HeldKeys",
    "Retrackable",
    "TrackingSession",
]

logger = logging.getLogger("commons.cache")

#: The channel Redis publishes invalidations on for RESP2 clients that redirect to it.
INVALIDATE_CHANNEL = b"__redis__:invalidate"
#: How often the subscribed connection is pinged.
HEARTBEAT_SECONDS = 0.3
#: Nothing heard on the subscribed connection for this long: the near cache is emptied.
SILENCE_LIMIT_SECONDS = 1.0
#: Waits between attempts to subscribe again, doubling up to the last.
RECONNECT_FIRST_SECONDS = 0.05
RECONNECT_MAX_SECONDS = 1.0
#: After Redis refused to track, waits before asking again, doubling up to the last.
REFUSED_RETRY_FIRST_SECONDS = 1.0
REFUSED_RETRY_MAX_SECONDS = 60.0

#: Sent before the tracking command (see :meth:`TrackingSession.tracking_command`); always ``OK``.
_TRACKING_OFF = encode_command(b"CLIENT", ["TRACKING", "OFF"])


class FlushReason:
    """Why the near cache was emptied (the ``reason`` of ``CacheEvents.near_cache_flushed``)."""

    #: The subscribed connection was closed or killed.
    TRACKING_LOST = "tracking_lost"
    #: Nothing was heard on the subscribed connection for SILENCE_LIMIT_SECONDS.
    SILENCE = "silence"
    #: The read connection was closed: Redis no longer tracks what it read.
    READER_LOST = "reader_lost"
    #: The sampled verification found Redis holding other bytes than were read (near_checks.py).
    DIVERGED = "diverged"
    #: Redis announced a flush of its database (FLUSHALL, FLUSHDB).
    SERVER_FLUSH = "server_flush"
    #: This process flushed the cache (``clear``).
    CLEAR = "clear"
    #: A read found that the server no longer serves a slot it was asked for (a cluster's
    #: failover or slot migration): what it holds is no longer known to be tracked.
    MOVED = "moved"


class Retrackable(Protocol):
    """The read side: asked to run the tracking command again when a session begins, and read
    on by the near cache's own checks (``near_checks.py``)."""

    def retrack(self) -> None: ...

    async def mget_tracked(
        self, command: bytes, count: int
    ) -> tuple[list[bytes | None], int | None]: ...

    async def mget_with_ttl(
        self, command: bytes, count: int, ttl_command: bytes
    ) -> tuple[list[bytes | None], int, int | None]: ...


class HeldKeys(Protocol):
    """What the tracking session empties or thins out (the near cache's held keys)."""

    events: CacheEvents

    def drop(self, keys: list[str]) -> None: ...

    def flush(self, reason: str | None) -> None: ...


class TrackingSession:
    """The subscribed connection of one near cache, its sessions and their health."""

    def __init__(self, held: HeldKeys) -> None:
        self._held = held
        #: The live session (``None``: none is confirmed, nothing may be kept or answered).
        self.session: int | None = None
        self._sessions = 0
        #: When the subscribed connection was last known current (``time.monotonic()``).
        self.heard_at = 0.0
        self._subscriber: _Subscriber | None = None
        self._open_channel: Callable[[], Awaitable[ReadChannel]] | None = None
        self._timeout = 1.0
        self._reader: Retrackable | None = None
        self._tracked_prefixes: tuple[str, ...] = ()
        self._task: asyncio.Task[None] | None = None
        #: Why Redis refuses to track, while it does; asked again from ``_refused_until`` on.
        self._refused: str | None = None
        self._refused_until = 0.0
        self._refused_retry = REFUSED_RETRY_FIRST_SECONDS
        self._closed = False

    def attach(
        self,
        open_channel: Callable[[], Awaitable[ReadChannel]],
        reader: Retrackable,
        *,
        timeout: float,
        tracked_prefixes: tuple[str, ...],
    ) -> None:
        """Connects the near cache to the server its reader reads from.

        ``tracked_prefixes``: the prefixes of the keys whose changes Redis announces (the
        generation keys', see "Which keys Redis tracks").
        """
        self._open_channel = open_channel
        self._reader = reader
        self._timeout = timeout
        self._tracked_prefixes = tracked_prefixes

    @property
    def reader(self) -> Retrackable | None:
        """The tracked read connection's reader (``None``: not attached)."""
        return self._reader

    def start(self) -> None:
        """Starts keeping the subscribed connection open (in the background), once per loop."""
        task = self._task
        if self._closed or self._open_channel is None:
            return
        if self._refused is not None:
            if time.monotonic() < self._refused_until:
                return
            self._refused = None  # time to ask again
        loop = asyncio.get_running_loop()
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        if task is not None:
            # Started on another event loop, which can no longer drive it.
            task.cancel()
            self.lose(FlushReason.TRACKING_LOST)
        self._task = loop.create_task(self._subscribe_forever(), name="cache-near-tracking")

    @property
    def live(self) -> bool:
        """Whether a session is confirmed: reads may be kept and answered."""
        return self.session is not None

    def confirmed(self, now: float | None = None) -> bool:
        """Whether a session is live and its connection was heard from within the silence limit
        (checked here too: a busy event loop may run a hit before the heartbeat's check);
        ``now`` is ``time.monotonic()`` if the caller has it."""
        if self.session is None:
            return False
        if (time.monotonic() if now is None else now) - self.heard_at > SILENCE_LIMIT_SECONDS:
            self.lose(FlushReason.SILENCE)
            return False
        return True

    def tracking_works(self) -> None:
        """A read was kept: the next refusal is reported, and asked again after the first wait."""
        self._refused_retry = REFUSED_RETRY_FIRST_SECONDS

    # -- the read connection's side (pipelined_reads.ReadTracking) --------------------------------

    def tracking_command(self) -> tuple[int, tuple[bytes, ...]] | None:
        """The session to track a read connection into and the commands that do it: broadcast
        tracking of the generation keys' prefixes, redirected to the subscribed connection.

        Tracking is switched off first: Redis refuses a prefix a connection already tracks, and
        a new session (a new subscribed connection) tracks the open read connection again.
        """
        subscriber, session = self._subscriber, self.session
        if subscriber is None or session is None or not self._tracked_prefixes:
            return None
        arguments = ["TRACKING", "ON", "REDIRECT", str(subscriber.client_id), "BCAST"]
        for prefix in self._tracked_prefixes:
            arguments += ["PREFIX", prefix]
        return session, (_TRACKING_OFF, encode_command(b"CLIENT", arguments))

    def tracked_connection_lost(self, session: int) -> None:
        """A read connection tracked into ``session`` closed: what it read is no longer tracked."""
        if session == self.session:
            self._held.flush(FlushReason.READER_LOST)

    def tracking_refused(self, message: str) -> None:
        """Redis refused to track (too old a version, an ACL, a failover behind one address that
        redirects to a connection the new server never had): the near cache is off while it
        refuses, asked again after 1 s, then after twice as long each time, up to a minute."""
        if self._refused is None:
            if self._refused_retry == REFUSED_RETRY_FIRST_SECONDS:
                logger.warning(
                    "near cache off while Redis refuses client tracking (%s); asked again "
                    "from time to time",
                    message,
                )
            self._refused_until = time.monotonic() + self._refused_retry
            self._refused_retry = min(2 * self._refused_retry, REFUSED_RETRY_MAX_SECONDS)
        self._refused = message
        self.lose(None)
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    # -- the subscribed connection ---------------------------------------------------------------

    async def _subscribe_forever(self) -> None:
        delay = RECONNECT_FIRST_SECONDS
        while not self._closed and self._refused is None:
            try:
                subscriber = await self._subscribe()
            except redis_errors.ResponseError as exc:
                self.tracking_refused(_first_words(exc))
                return
            except (redis_errors.RedisError, OSError, TimeoutError) as exc:
                logger.debug("near cache: subscribing for invalidations failed: %s", exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, RECONNECT_MAX_SECONDS)
                continue
            delay = RECONNECT_FIRST_SECONDS
            await subscriber.closed

    async def _subscribe(self) -> _Subscriber:
        assert self._open_channel is not None
        loop = asyncio.get_running_loop()
        subscriber: _Subscriber | None = None
        try:
            async with asyncio.timeout(3 * self._timeout):
                channel = await self._open_channel()
                subscriber = _Subscriber(channel, loop, self)
                await asyncio.shield(subscriber.ready)
        except TimeoutError as exc:
            if subscriber is not None:
                subscriber.close()
            raise redis_errors.TimeoutError("subscribing for invalidations timed out") from exc
        except BaseException:
            if subscriber is not None:
                subscriber.close()
            raise
        if self._closed:
            subscriber.close()
            raise redis_errors.ConnectionError("the cache is closed")
        self._begin_session(subscriber)
        return subscriber

    def _begin_session(self, subscriber: _Subscriber) -> None:
        self._held.flush(None)
        self._sessions += 1
        self._subscriber = subscriber
        self.session = self._sessions
        self.heard_at = time.monotonic()
        subscriber.schedule_heartbeat()
        logger.debug("near cache: tracking on (redirect to client %d)", subscriber.client_id)
        if self._reader is not None:
            self._reader.retrack()

    def heard(self, subscriber: _Subscriber, probe_sent_at: float) -> None:
        """A heartbeat's reply: the connection was current when that probe was sent (how late a
        reply is counts, not only how often replies come)."""
        if subscriber is self._subscriber:
            self.heard_at = max(self.heard_at, probe_sent_at)

    def silent_too_long(self, subscriber: _Subscriber) -> bool:
        """Whether ``subscriber`` has been silent past the limit (it is then given up)."""
        if subscriber is not self._subscriber:
            return False
        if time.monotonic() - self.heard_at > SILENCE_LIMIT_SECONDS:
            self.lose(FlushReason.SILENCE)
            return True
        return False

    def invalidated(self, subscriber: _Subscriber, keys: list[bytes] | None) -> None:
        """Redis' message: ``keys`` changed (``None``: the database was flushed)."""
        if subscriber is not self._subscriber:
            return
        self._held.events.near_cache_invalidation(0 if keys is None else len(keys))
        if keys is None:
            self._held.flush(FlushReason.SERVER_FLUSH)
        else:
            self._held.drop([key.decode(errors="surrogateescape") for key in keys])

    def subscriber_lost(self, subscriber: _Subscriber) -> None:
        if subscriber is self._subscriber:
            self.lose(FlushReason.TRACKING_LOST)

    def lose(self, reason: str | None) -> None:
        """Ends the session: empties the near cache and closes the subscribed connection."""
        subscriber, self._subscriber = self._subscriber, None
        was_live = self.session is not None
        self.session = None
        self._held.flush(reason if was_live else None)
        if subscriber is not None:
            if reason is not None:
                logger.debug("near cache emptied: %s", reason)
            subscriber.close()

    async def aclose(self) -> None:
        """Closes the subscribed connection and forgets everything. Safe to call twice."""
        self._closed = True
        self.lose(None)
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await task


def _first_words(exc: BaseException) -> str:
    """An error reply's code and first words (never a key)."""
    return " ".join(str(exc).split()[:8])


class _Subscriber(asyncio.Protocol):
    """The connection Redis sends invalidations to: ``CLIENT ID``, then ``SUBSCRIBE``, then
    messages and heartbeat replies, parsed as the event loop hands the bytes over."""

    def __init__(
        self, channel: ReadChannel, loop: asyncio.AbstractEventLoop, tracking: TrackingSession
    ) -> None:
        self.channel = channel
        self.loop = loop
        self.tracking = tracking
        self.client_id = -1
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._parser = hiredis.Reader()
        self._heartbeat: asyncio.TimerHandle | None = None
        #: When each PING whose reply is still to come was sent, oldest first.
        self._probes: deque[float] = deque()
        transport = channel.transport
        transport.set_protocol(self)
        with contextlib.suppress(Exception):
            transport.resume_reading()
        if transport.is_closing():
            self._closed_by_peer()
            return
        transport.write(
            encode_command(b"CLIENT", ["ID"])
            + encode_command(b"SUBSCRIBE", [INVALIDATE_CHANNEL.decode()])
        )

    def schedule_heartbeat(self) -> None:
        self._heartbeat = self.loop.call_later(HEARTBEAT_SECONDS, self._beat)

    def _beat(self) -> None:
        self._heartbeat = None
        if self.closed.done() or self.tracking.silent_too_long(self):
            return
        try:
            self.channel.transport.write(encode_command(b"PING", []))
            self._probes.append(time.monotonic())
        except Exception:  # a transport closed meanwhile
            self._closed_by_peer()
            return
        self.schedule_heartbeat()

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        try:
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                self._handle(reply)
        except hiredis.ProtocolError:
            self._closed_by_peer()

    def _handle(self, reply: object) -> None:
        if isinstance(reply, hiredis.ReplyError):
            if not self.ready.done():
                # A refusal (an ACL, an unknown command) turns the near cache off; anything else
                # (LOADING, ...) is tried again like a lost connection.
                refused = str(reply).startswith(("NOPERM", "ERR"))
                kind = redis_errors.ResponseError if refused else redis_errors.ConnectionError
                self.ready.set_exception(kind(str(reply)))
            self._closed_by_peer()
            return
        if isinstance(reply, int) and not self.ready.done():
            self.client_id = reply
            return
        if not isinstance(reply, list) or len(reply) < 2:
            return
        kind = reply[0]
        if kind == b"pong" and self._probes:
            self.tracking.heard(self, self._probes.popleft())
        elif kind == b"subscribe" and not self.ready.done() and self.client_id >= 0:
            self.ready.set_result(None)
        elif kind == b"message" and len(reply) == 3 and reply[1] == INVALIDATE_CHANNEL:
            keys = reply[2]
            self.tracking.invalidated(self, keys if isinstance(keys, list) else None)

    def eof_received(self) -> bool | None:
        self._closed_by_peer()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed_by_peer()

    def _closed_by_peer(self) -> None:
        self.tracking.subscriber_lost(self)
        self.close()

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if not self.closed.done():
            self.closed.set_result(None)
        if not self.ready.done():
            self.ready.set_exception(redis_errors.ConnectionError("the connection was lost"))
            self.ready.exception()  # seen, even when nobody waits for it any more
        with contextlib.suppress(Exception):
            self.channel.close()
