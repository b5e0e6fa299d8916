"""Kept invalidations on local disk, so that they outlive the process that kept them.

An invalidation that cannot reach Redis is kept in memory (``pending.py``) until Redis answers.
A process that stops or crashes during the outage would take it along, and once Redis is back
(with its data) every replica would serve the old value for the rest of its TTL. With
``CACHE_INVALIDATION_JOURNAL`` set to a directory, each kept item is also appended to a file
there, as one JSON line, and flushed to disk (``fsync``) before the request that made it returns.
``init_cache()`` reads the journal back and applies it to Redis before reading anything from it.

One file per process: ``<prefix>@<pid>-<random>.jsonl`` (the prefix percent-encoded, so no other
prefix's files match), held under an exclusive ``flock`` for the life of the layer. The kernel
releases the lock when the process ends, however it ends (``kill -9`` included), so a file nobody
holds is an orphan: a starting process takes over every orphan it can lock, copies its lines into
its own file (flushed) and only then removes it. Several workers of one service can share the
directory; a file is created under another name and locked before it is renamed into view, so no one
takes over a live process's file. Two processes racing for one orphan may both apply it: an
invalidation applied twice removes nothing more.

The file holds what is kept: it is appended to while Redis is away and rewritten (a new file,
flushed, renamed over the old one) with what is still kept after every replay, so it is empty
again once every kept invalidation has reached Redis. Appends that arrive together share one
write and one ``fsync`` (group commit), in a worker thread: the event loop never waits on the
disk. A line cut short by a crash was never flushed, so its request never returned: it is
skipped. A disk that refuses a write is logged (once, until a write succeeds again) and does not
fail the request: the invalidation is still kept in memory, as without a journal. The file then
no longer holds all that is kept, and says so in its name (``....incomplete.jsonl``, a rename,
which needs no room on the disk): a process that takes it over keeps a flush of the whole prefix
besides its lines, as a process that starts during an outage without a journal does, since
nobody can name what is missing. A later rewrite of everything kept makes it whole again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO
from urllib.parse import quote

from commons.cache.pending import PendingItem as JournalItem
from commons.cache.scope import CacheScope, InvalidationTarget

__all__ = ["InvalidationJournal", "JournalItem", "decode_item", "encode_item"]

logger = logging.getLogger("commons.cache")

_SUFFIX = ".jsonl"
#: Before the suffix: the file lacks an item its process kept (a write failed).
_INCOMPLETE = ".incomplete"


def encode_item(item: JournalItem) -> bytes:
    """One journal line (JSON, newline-terminated) for ``item``."""
    record: dict[str, object]
    if item is None:
        record = {"flush": True}
    elif isinstance(item, InvalidationTarget):
        record = {"target": [item.namespace, item.tenant_id, item.user_id]}
    else:
        key, scope = item
        where = None if scope is None else [scope.namespace, scope.tenant_id, scope.user_id]
        record = {"key": key, "scope": where}
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def decode_item(line: bytes) -> JournalItem | Exception:
    """The item of one journal line, or the error that makes it unreadable."""
    try:
        record = json.loads(line)
        if record.get("flush") is True:
            return None
        if "target" in record:
            namespace, tenant_id, user_id = record["target"]
            return InvalidationTarget(str(namespace), _text(tenant_id), _text(user_id))
        where = record["scope"]
        scope = (
            None if where is None else CacheScope(str(where[0]), _text(where[1]), _text(where[2]))
        )
        return (str(record["key"]), scope)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return exc


def _text(value: object) -> str | None:
    return None if value is None else str(value)


class InvalidationJournal:
    """This process's journal file in ``directory``, and the orphans it takes over."""

    def __init__(self, directory: Path, prefix: str) -> None:
        self._directory = directory
        # Files are named after the service's prefix: a directory shared by two services never
        # hands one service's invalidations to the other.
        self._name = quote(prefix, safe="")
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._buffer: list[bytes] = []
        self._flushed: asyncio.Future[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._failing = False
        #: A write failed since the file last held everything kept (see the module docstring).
        self._incomplete = False

    @property
    def path(self) -> Path | None:
        """This process's file, once opened."""
        return self._path

    async def open(self) -> list[JournalItem]:
        """Creates and locks this process's file; takes over every orphan. Returns their items.

        Raises:
            OSError: The directory cannot be written.
        """
        return await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> list[JournalItem]:
        hidden = self._directory / f".{self._name}@{os.getpid()}-{secrets.token_hex(6)}.new"
        handle = hidden.open("ab")
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        self._path = hidden.with_name(hidden.name[1:].removesuffix(".new") + _SUFFIX)
        hidden.rename(self._path)
        _sync_directory(self._directory)
        self._file = handle
        items: list[JournalItem] = []
        taken: list[Path] = []
        for orphan in sorted(self._directory.glob(f"{self._name}@*{_SUFFIX}")):
            lines = self._lines_of_orphan(orphan) if orphan != self._path else None
            if lines is not None:
                taken.append(orphan)
                items.extend(_decoded(orphan, lines))
                if orphan.name.endswith(_INCOMPLETE + _SUFFIX):
                    logger.warning(
                        "invalidation journal %s lacks what its process could not write: the "
                        "whole prefix is flushed before Redis is read",
                        orphan,
                    )
                    items.append(None)
        if items:
            self._write_sync([encode_item(item) for item in items])
        # Only once their items are on disk here.
        for orphan in taken:
            orphan.unlink(missing_ok=True)
        for unfinished in self._directory.glob(f".{self._name}@*.new"):
            # A rewrite or a start-up cut short: the file it was to replace still holds it all.
            if self._lines_of_orphan(unfinished) is not None:
                unfinished.unlink(missing_ok=True)
        return items

    @staticmethod
    def _lines_of_orphan(path: Path) -> list[bytes] | None:
        """The lines of ``path`` if no live process holds it, else None."""
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            return None  # taken over by another process meanwhile
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # its process is alive
            if not _still_named(path, handle):
                # Replaced by its live owner's rewrite, or removed by another taker meanwhile.
                return None
            return handle.read().splitlines()

    async def append(self, item: JournalItem) -> None:
        """Returns once ``item`` is on disk (or writing it failed, which is logged)."""
        if self._file is None:
            return
        loop = asyncio.get_running_loop()
        if self._flushed is None:
            self._flushed = loop.create_future()
        self._buffer.append(encode_item(item))
        waiter = self._flushed
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush(), name="cache-journal")
        await asyncio.shield(waiter)

    async def _flush(self) -> None:
        """Writes what was appended, batch after batch, one write and one fsync each."""
        try:
            while self._buffer:
                lines, self._buffer = self._buffer, []
                done, self._flushed = self._flushed, None
                try:
                    async with self._lock:
                        await self._guarded(self._write_sync, lines)
                finally:
                    # Its requests return whatever happened (a failure is logged).
                    if done is not None and not done.done():
                        done.set_result(None)
        finally:
            self._flusher = None

    async def rewrite(self, snapshot: Callable[[], Iterable[JournalItem]]) -> None:
        """Replaces the file's content with ``snapshot()``, taken once earlier appends are
        written (what is still kept after a replay)."""
        if self._file is None:
            return
        async with self._lock:
            lines = [encode_item(item) for item in snapshot()]
            await self._guarded(self._replace_sync, lines)

    async def _guarded(self, write: Callable[[list[bytes]], None], lines: list[bytes]) -> None:
        try:
            await asyncio.to_thread(write, lines)
        except OSError as exc:
            self._mark_incomplete()
            if not self._failing:
                self._failing = True
                logger.error("invalidation journal %s not written: %s", self._path, exc)
            return
        if self._failing:
            self._failing = False
            logger.warning("invalidation journal %s written again", self._path)

    def _write_sync(self, lines: list[bytes]) -> None:
        assert self._file is not None
        self._file.write(b"".join(lines))
        self._file.flush()
        os.fsync(self._file.fileno())

    def _replace_sync(self, lines: list[bytes]) -> None:
        assert self._file is not None
        assert self._path is not None
        if not lines and self._file.tell() == 0 and not self._incomplete:
            return
        hidden = self._path.with_name(f".{self._path.stem}.new")
        handle = hidden.open("wb")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            handle.write(b"".join(lines))
            handle.flush()
            os.fsync(handle.fileno())
            hidden.rename(self._path)
        except BaseException:
            handle.close()
            raise
        with contextlib.suppress(OSError):  # what it held is rewritten whole above
            self._file.close()
        self._file = handle
        if self._incomplete:
            # Everything kept is on disk again: the file is whole under its first name.
            whole = self._path.with_name(self._path.name.replace(_INCOMPLETE + _SUFFIX, _SUFFIX))
            self._path.rename(whole)
            self._path, self._incomplete = whole, False
        _sync_directory(self._directory)

    def _mark_incomplete(self) -> None:
        """Renames the file to say it lacks an item kept (see the module docstring)."""
        path = self._path
        if self._incomplete or path is None:
            return
        marked = path.with_name(path.name.removesuffix(_SUFFIX) + _INCOMPLETE + _SUFFIX)
        try:
            path.rename(marked)
            _sync_directory(self._directory)
        except OSError as exc:
            logger.error(
                "invalidation journal %s could not be marked incomplete (%s): an invalidation "
                "kept now is lost if this process stops before Redis answers",
                path,
                exc,
            )
            return
        self._path, self._incomplete = marked, True

    async def aclose(self) -> None:
        """Writes what is appended, then lets go of the file: removed when nothing is kept, else
        left for the next process to take over."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        handle, self._file = self._file, None
        if handle is None:
            return
        empty = handle.tell() == 0
        if empty and not self._incomplete and self._path is not None:
            self._path.unlink(missing_ok=True)
        try:
            handle.close()
        except OSError as exc:
            # Lines a failed write left buffered: the file lacks them (the shutdown goes on).
            self._mark_incomplete()
            logger.error("invalidation journal %s not written at close: %s", self._path, exc)


def _decoded(path: Path, lines: list[bytes]) -> list[JournalItem]:
    items: list[JournalItem] = []
    for line in lines:
        item = decode_item(line)
        if isinstance(item, Exception):
            # A line cut short by a crash was never flushed: its request never returned.
            logger.warning("invalidation journal %s: line skipped (%s)", path, item)
            continue
        items.append(item)
    return items


def _still_named(path: Path, handle: IO[bytes]) -> bool:
    """Whether ``path`` still names the file open as ``handle``."""
    try:
        return path.stat().st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def _sync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
