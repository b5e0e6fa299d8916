"""The one seam where redis-py's and the OS's errors become the cache's own.

Every redis-py and OS error is translated here, and only here, into the cache's own errors
(:mod:`commons.cache.errors`); the layer above decides what a failure means. Messages never quote a
command's arguments (keys name tenants, values are cached bodies).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis import exceptions as redis_errors

from commons.cache.errors import (
    BackendBusyError,
    BackendError,
    BackendMovingError,
    BackendRejectedError,
    BackendUnavailableError,
)

__all__ = ["REDIS_FAILURES", "errors_translated", "translate"]

#: Refusals by their error code (NOPERM: see :func:`_permission_text`). redis-py's own message of
#: a failed pipeline command quotes the command's arguments (keys with tenant ids, cached bodies),
#: which must not reach logs or status.
_REFUSALS: tuple[tuple[type[redis_errors.ResponseError], str], ...] = (
    (redis_errors.OutOfMemoryError, "OOM, used memory is above maxmemory"),
    (redis_errors.ReadOnlyError, "READONLY, the server is a read-only replica"),
    (redis_errors.ExecAbortError, "EXECABORT, a transaction was refused"),
)

#: Error replies that are no refusal of the command but an outage: the server cannot serve any
#: command of the slot right now (the cluster lost a shard, a primary is down).
_UNAVAILABLE_REPLIES: tuple[tuple[type[redis_errors.ResponseError], str], ...] = (
    (redis_errors.MasterDownError, "MASTERDOWN, the link with the primary is down"),
    (redis_errors.ClusterDownError, "CLUSTERDOWN, the cluster cannot serve the slot"),
)

#: Replies of a slot that is moving to another node: ``ASK`` and ``MOVED`` (``MovedError`` is an
#: ``AskError``), and ``TRYAGAIN`` (a command whose keys are on both nodes for the moment).
_MOVING_REPLIES = (redis_errors.AskError, redis_errors.TryAgainError)
#: What redis-py's cluster client raises when a command's redirects do not settle. In redis-py
#: 8.1 that happens during every slot migration under load: on ``ASK`` it sends ``ASKING`` on one
#: pooled connection of the importing node and the command on another, which the node then sends
#: back (``MOVED``) to the migrating one, and so on.
_REDIRECTS_EXHAUSTED = "TTL exhausted"

#: The end of a NOPERM message that names the command refused (never its arguments).
_NOPERM_COMMAND = re.compile(r"to run the '([a-z0-9|_-]+)' command( or its subcommand)?$")
#: The reply to ``SELECT`` of a database the server does not have (no argument quoted).
_NO_SUCH_DATABASE = "DB index is out of range"
#: Redis 6.2 wraps a refusal met inside a script in a generic error ("Error running script ...:
#: -OOM command not allowed ..."); later releases answer with the refusal's own code.
_SCRIPT_REFUSAL = re.compile(r"Error running script.*?-(OOM|READONLY) ")
#: What a script running a command its user may not is answered: Redis 6.2 and 7 name no
#: command, Valkey does ("ACL failure in script: ... to run the 'pexpire' command").
_SCRIPT_NOPERM = re.compile(
    r"The user executing the script can't run this command|ACL failure in script"
)
_SCRIPT_NOPERM_COMMAND = re.compile(r"to run the '([a-z0-9|_-]+)' command")
#: In what a TLS handshake that refused the server's certificate raises (its CA, its names).
_CERTIFICATE_REFUSED = "CERTIFICATE_VERIFY_FAILED"


#: Errors of redis-py's own making, translated only when raised inside redis-py (see
#: :func:`_raised_in_client`): its cluster client can hold a slot map that disagrees with its
#: nodes for a moment (a node failing, a map being read again) and then fails with one of these
#: (``'NoneType' object has no attribute ...``) where a ``RedisError`` was meant; and a command
#: written on a connection that redis-py (or the server) closed meanwhile fails in the transport
#: below it: ``RuntimeError: ... the handler is closed`` under uvloop, ``TypeError`` or
#: ``AttributeError`` in asyncio's own transports on CPython 3.12+.
_CLIENT_FAULTS = (AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError)
_CLIENT_DIR = os.path.dirname(redis_errors.__file__) + os.sep
#: Where the frames below redis-py come from: asyncio (its streams and transports).
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__) + os.sep


def _in_event_loop(filename: str) -> bool:
    """Whether a frame is the event loop's: asyncio's, or uvloop's (whose frames are named after
    its Cython sources, ``uvloop/handles/...``, or after its installed files)."""
    return filename.startswith(_ASYNCIO_DIR) or "uvloop" in filename.split(os.sep)


#: Messages of redis-py's cluster client that name nodes only (never a command's arguments), and
#: the wording of the first one shortened.
_CLUSTER_MESSAGES = (
    "Redis Cluster cannot be connected",
    "All slots are not covered",
    "Cluster mode is not enabled",
)
_NO_NODE_ANSWERED = (
    "Redis Cluster cannot be connected. Please provide at least one reachable node: ",
    "no node answered: ",
)


def _permission_text(exc: BaseException) -> str:
    """What a NOPERM refusal was about: the command, or the keys (never the keys' names)."""
    message = str(exc)
    if (named := _NOPERM_COMMAND.search(message)) is not None:
        return f"NOPERM, the user may not run {named.group(1).upper()}"
    if message.endswith("one of the keys used as arguments"):
        return "NOPERM, the user may not access the cache's keys (its ACL needs ~{prefix}:*)"
    return "NOPERM, the user lacks a permission"


def _refusal_in(exc: BaseException) -> redis_errors.NoPermissionError | None:
    """The permission refusal behind ``exc`` (the cluster client wraps the one it met)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or isinstance(seen, redis_errors.NoPermissionError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _translate_cluster_error(exc: redis_errors.RedisClusterException) -> BackendError:
    """redis-py's cluster client's own exceptions, which do not derive from ``RedisError``: no
    node answers, a slot has no node, a node refused the client's discovery commands."""
    if (refusal := _refusal_in(exc)) is not None:
        return BackendRejectedError(f"Redis refused the command: {_permission_text(refusal)}")
    if isinstance(exc, redis_errors.SlotNotCoveredError):
        return BackendUnavailableError("Redis Cluster unavailable: a slot has no node")
    if isinstance(exc, redis_errors.CrossSlotTransactionError | redis_errors.InvalidPipelineStack):
        return BackendRejectedError(
            f"the cluster client refused the command ({type(exc).__name__})"
        )
    message = str(exc)
    shown = message if message.startswith(_CLUSTER_MESSAGES) else type(exc).__name__
    return BackendUnavailableError(
        f"Redis Cluster unavailable: {shown.replace(*_NO_NODE_ANSWERED)}"
    )


def _is_moving(exc: BaseException) -> bool:
    """Whether ``exc`` says a cluster slot is moving (a resharding), which is no outage."""
    if isinstance(exc, _MOVING_REPLIES):
        return True
    return type(exc) is redis_errors.ClusterError and str(exc).startswith(_REDIRECTS_EXHAUSTED)


def _raised_in_client(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside redis-py: its innermost frame is in the package, or only
    frames of the event loop and its transports (:func:`_in_event_loop`) follow redis-py's."""
    innermost = None
    trace = exc.__traceback__
    while trace is not None:
        filename = trace.tb_frame.f_code.co_filename
        if not _in_event_loop(filename):
            innermost = filename
        trace = trace.tb_next
    return innermost is not None and innermost.startswith(_CLIENT_DIR)


def translate(exc: BaseException) -> BackendError:
    if isinstance(exc, _CLIENT_FAULTS):
        if not _raised_in_client(exc):
            raise exc  # a mistake of ours: never disguised as an outage
        return BackendUnavailableError(f"the Redis client failed: {type(exc).__name__}")
    if _is_moving(exc):
        return BackendMovingError(f"a Redis Cluster slot is moving ({type(exc).__name__})")
    if isinstance(exc, redis_errors.ResponseError):
        for unavailable, text in _UNAVAILABLE_REPLIES:
            if isinstance(exc, unavailable):
                return BackendUnavailableError(f"Redis cannot serve the command: {text}")
        if isinstance(exc, redis_errors.NoPermissionError):
            return BackendRejectedError(f"Redis refused the command: {_permission_text(exc)}")
        for refusal, text in _REFUSALS:
            if isinstance(exc, refusal):
                return BackendRejectedError(f"Redis refused the command: {text}")
        if str(exc) == _NO_SUCH_DATABASE:
            return BackendRejectedError(
                "Redis refused SELECT: REDIS_URL names a database this server does not have "
                "(its config's databases, 16 by default, numbered from 0)"
            )
        if _SCRIPT_NOPERM.search(str(exc)) is not None:
            named = _SCRIPT_NOPERM_COMMAND.search(str(exc))
            command = f" ({named.group(1).upper()})" if named is not None else ""
            return BackendRejectedError(
                f"Redis refused a command inside a cache script{command} (NOPERM): the user "
                "lacks a permission of the ACL line in docs/operations.md"
            )
        if (wrapped := _SCRIPT_REFUSAL.search(str(exc))) is not None:
            text = next(text for _, text in _REFUSALS if text.startswith(wrapped.group(1)))
            return BackendRejectedError(f"Redis refused the command: {text}")
        return BackendRejectedError(f"Redis refused the command ({type(exc).__name__})")
    if isinstance(exc, redis_errors.RedisClusterException):
        return _translate_cluster_error(exc)
    if isinstance(exc, (redis_errors.TimeoutError, asyncio.TimeoutError, TimeoutError)):
        return BackendUnavailableError("Redis did not answer in time")
    if isinstance(exc, redis_errors.MaxConnectionsError) or (
        # BlockingConnectionPool's wait for a free connection ran out, or (redis-py before 7)
        # the pool is full: this process is busy.
        isinstance(exc, redis_errors.ConnectionError) and str(exc) in _POOL_FULL_MESSAGES
    ):
        return BackendBusyError("every pooled connection to Redis is in use")
    if isinstance(exc, redis_errors.AuthenticationError):
        # Its text is Redis' own ("invalid username-password pair"), never the password.
        return BackendUnavailableError(
            "Redis unavailable: it refused the user or password of REDIS_URL "
            f"(AuthenticationError: {exc})"
        )
    if _CERTIFICATE_REFUSED in str(exc):
        # Not an outage that passes: a setting to change (counted as one all the same, so the
        # process serves from memory rather than try a handshake on every request).
        return BackendUnavailableError(
            "Redis unavailable: its TLS certificate was refused: REDIS_TLS_CA_FILE does not hold "
            "the CA that signed it, or it does not name the host of REDIS_URL "
            f"(REDIS_TLS_CHECK_HOSTNAME=false skips that check): {exc}"
        )
    return BackendUnavailableError(f"Redis unavailable: {type(exc).__name__}: {exc}")


_POOL_FULL_MESSAGES = ("No connection available.", "Too many connections")

#: Everything a client of any topology raises when Redis fails. The cluster client's own
#: exceptions (no node reachable, a slot without a node) do not derive from ``RedisError``.
REDIS_FAILURES = (
    redis_errors.RedisError,
    redis_errors.RedisClusterException,
    OSError,
    asyncio.TimeoutError,
    *_CLIENT_FAULTS,
)


@asynccontextmanager
async def errors_translated() -> AsyncIterator[None]:
    """The one seam where lower-layer errors become :class:`BackendError`."""
    try:
        yield
    except REDIS_FAILURES as exc:
        raise translate(exc) from exc
