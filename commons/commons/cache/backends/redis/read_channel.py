"""The connection a pipelined reader owns, opened exactly as redis-py opens its pooled ones.

redis-py connects, negotiates TLS, logs in (ACL user or password) and selects the database; the
reader (``pipelined_reads.py``) or the near cache's subscribed connection (``near_tracking.py``)
then takes the connection's streams over and speaks RESP2 on it, commands encoded here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection

__all__ = [
    "ReadChannel",
    "channel_opener",
    "connection_opener",
    "encode_arguments",
    "encode_command",
]


@dataclass(frozen=True, slots=True)
class ReadChannel:
    """An open, authenticated connection to the server, owned by the reader from now on."""

    writer: asyncio.StreamWriter

    @property
    def transport(self) -> asyncio.Transport:
        return cast(asyncio.Transport, self.writer.transport)

    def close(self) -> None:
        # Not StreamWriter.wait_closed(): the stream's protocol is no longer the transport's and
        # would never learn that the connection closed.
        self.writer.transport.abort()


def channel_opener(client: Redis) -> Callable[[], Awaitable[ReadChannel]] | None:
    """Opens connections set up exactly as the client's pooled ones, for a :class:`PipelinedReader`.

    redis-py connects, negotiates TLS, logs in (ACL user or password) and selects the database;
    the reader then takes the connection's two streams over. ``None`` for a pool that chooses its
    server per connection (Sentinel's follows the master) or is of another kind: reads there keep
    going through redis-py.
    """
    pool = client.connection_pool
    if type(pool) is not ConnectionPool:
        return None
    return connection_opener(pool.connection_class, pool.connection_kwargs)


def connection_opener(
    connection_class: type[AbstractConnection], connection_kwargs: dict[str, Any]
) -> Callable[[], Awaitable[ReadChannel]] | None:
    """Opens connections of ``connection_class`` with ``connection_kwargs`` (a pool's, or a
    cluster node's) for a :class:`PipelinedReader`.

    ``None`` if this redis-py hides a connection's streams.
    """
    # RESP2 whatever the URL asks: a GET's reply is then a bulk string, nil or an error, and no
    # push message can come between replies.
    options = {**connection_kwargs, "protocol": 2}
    if options.get("password") and not options.get("username"):
        # As redis-py's RESP3 pool logs in (HELLO 3 AUTH default <password>): a server without
        # a password accepts the default user with any password, and refuses the one-argument
        # AUTH that RESP2 would send ("called without any password configured"), which would
        # leave the pool connected and every read refused. A server older than 6 is sent the
        # one-argument form by redis-py after refusing this one.
        options["username"] = "default"
    # redis-py keeps a connection's streams private (they have been there since its asyncio
    # client began); a version without them keeps reads on redis-py's own path.
    unconnected = connection_class(**options)
    if not hasattr(unconnected, "_writer"):
        return None

    async def open_channel() -> ReadChannel:
        connection = connection_class(**options)
        await connection.connect()  # type: ignore[no-untyped-call]  # unannotated in redis-py
        writer = getattr(connection, "_writer", None)
        if not isinstance(writer, asyncio.StreamWriter):
            await connection.disconnect()
            raise redis_errors.ConnectionError("this redis-py version hides its streams")
        # The reader owns the connection from here on: redis-py forgets it, so that it never
        # reads from it, closes it or warns about it when its object is collected.
        setattr(connection, "_reader", None)  # noqa: B010
        setattr(connection, "_writer", None)  # noqa: B010
        return ReadChannel(writer)

    return open_channel


#: hiredis' own encoder (hiredis 2.1 and later), in C: twice as fast as the one below on a
#: fill's ``EVALSHA`` (its value among the arguments), as fast on a read's one key.
_pack_command: Callable[[tuple[str | bytes | int, ...]], bytes] | None = getattr(
    hiredis, "pack_command", None
)


def encode_command(
    name: bytes,
    arguments: Sequence[str | bytes | int],
    *,
    encoded_after: bytes = b"",
    count_after: int = 0,
) -> bytes:
    """``name`` with ``arguments`` (keys, values, counts) in the protocol's encoding, followed
    by ``count_after`` more arguments already encoded (``encoded_after``, from
    :func:`encode_arguments`)."""
    if _pack_command is not None and not count_after:
        # A read's MGET (arguments encoded already after its key) is as fast below.
        try:
            return _pack_command((name, *arguments))
        except TypeError:
            pass  # an argument it does not take (a bool, say): encoded below
    head = b"*%d\r\n$%d\r\n%b\r\n" % (len(arguments) + count_after + 1, len(name), name)
    return head + encode_arguments(arguments) + encoded_after


def encode_arguments(arguments: Sequence[str | bytes | int]) -> bytes:
    """``arguments`` as they follow a command's name (see :func:`encode_command`): a command's
    constant part, encoded once."""
    # One loop, no call per argument: every read from Redis encodes its key here.
    parts: list[bytes] = []
    for argument in arguments:
        if isinstance(argument, str):
            item = argument.encode()
        elif isinstance(argument, bytes):
            item = argument
        else:
            item = b"%d" % argument
        parts.append(b"$%d\r\n%b\r\n" % (len(item), item))
    return b"".join(parts)
