"""The near cache's own checks: held generations confirmed in the background, and sampled hits.

Tracking (``near_tracking.py``) tells this process of every change of a generation, as long as
Redis and the connections behave as modelled. These two checks hold when they do not:

- **Confirmation.** Every third of the maximum age (``CACHE_NEAR_CACHE_MAX_AGE_SECONDS``), the
  generations the near cache holds are read again on the tracked read connection (``MGET`` in
  batches; one per hash slot on a cluster's node). One found unchanged is confirmed as of the
  read's send time; one found changed or gone is dropped, with every entry that depends on it. An
  entry is answered from memory only while each of its generations was confirmed within the
  maximum age, so whatever fooled tracking (a read connection dropped silently, ``SWAPDB``, a
  proxy that moved to another server, a lost message), no answer from memory rests on a
  generation read longer ago than that. A confirmation costs one command per batch per period,
  whatever the number of entries, where reading each entry again after the maximum age cost one
  round trip per entry: a working set of a hundred thousand keys then stayed in memory 4% of the
  time. It also proves the read connection alive while hits leave it idle: a read that goes
  unanswered closes it, and the near cache is emptied (``reader_lost``).
- **Sampled verification.** A share of hits from memory (``CACHE_NEAR_CACHE_VERIFY_SHARE``, one
  in a hundred by default) reads the entry, its generations and its time to live from Redis in
  the background. Redis holding other bytes under the same generations, and not a later copy (a
  fill replacing an evicted or expired entry expires later), is a change nothing announces (an
  operator's ``SET``, a fault no one modelled): the near cache is emptied (``diverged``, counted
  by ``commons_cache_near_cache_flushes_total``) and it is logged once, its cause unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from redis import exceptions as redis_errors
from redis.crc import key_slot

from commons.cache.backends.redis.near_tracking import FlushReason
from commons.cache.backends.redis.read_channel import encode_command

if TYPE_CHECKING:
    from commons.cache.backends.redis.near import NearCache

__all__ = ["CONFIRM_BATCH", "NearChecks"]

logger = logging.getLogger("commons.cache")

#: Generation keys per confirming ``MGET``.
CONFIRM_BATCH = 512
#: The share of the maximum age between two confirmations: a generation is confirmed again
#: well before its last confirmation is too old.
CONFIRM_PERIODS_PER_MAX_AGE = 3
#: Verifications under way at once; a sampled hit past it is not verified.
MAX_VERIFICATIONS = 8
_FAILURES = (redis_errors.RedisError, OSError, asyncio.TimeoutError)
#: Numbers the process's near caches by, in what they report of their fill.
_NUMBERS = itertools.count(1)

#: What PTTL answers for a key that exists with no expiry.
_NO_EXPIRY = -1


class NearChecks:
    """The confirmation loop and the sampled verification of one near cache."""

    def __init__(self, near: NearCache, max_age_seconds: float, verify_share: float) -> None:
        self._near = near
        self._period = max_age_seconds / CONFIRM_PERIODS_PER_MAX_AGE
        self.verify_share = verify_share
        self._verify_every = round(1 / verify_share) if verify_share > 0 else 0
        self._until_verify = self._verify_every
        #: A cluster node's generations span slots, which one ``MGET`` may not.
        self.per_slot = False
        self._task: asyncio.Task[None] | None = None
        self._verifications: set[asyncio.Task[None]] = set()
        self._divergence_logged = False
        self._closed = False
        #: This near cache's number in the process, for ``CacheEvents.near_cache_held``.
        self._number = next(_NUMBERS)

    # -- confirmation ------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the confirmation loop on the running event loop (once per loop)."""
        task = self._task
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        if task is not None:
            task.cancel()
        self._task = loop.create_task(self._confirm_forever(), name="cache-near-confirmation")

    async def _confirm_forever(self) -> None:
        while True:
            await asyncio.sleep(self._period)
            with contextlib.suppress(*_FAILURES):
                await self.confirm_once()
            self._report_held()

    def _report_held(self) -> None:
        near = self._near
        near.events.near_cache_held(self._number, len(near), near.bytes_held)

    async def confirm_once(self) -> int:
        """Reads every held generation again; how many were found changed or gone.

        Raises:
            redis.exceptions.RedisError: A read failed (the reader closes its connection, which
                empties the near cache, if it went unanswered).
        """
        near = self._near
        reader = near.tracking.reader
        if reader is None or near.tracking.session is None:
            return 0
        dropped = 0
        for batch in self._batches(near.held_generation_keys()):
            ticket = near.begin(batch)
            if ticket is None:
                break
            try:
                values, tracked_in = await reader.mget_tracked(
                    encode_command(b"MGET", batch), len(batch)
                )
            finally:
                near.end(ticket)
            dropped += near.confirm(ticket, tracked_in, values)
        return dropped

    def _batches(self, keys: list[str]) -> Iterator[list[str]]:
        if self.per_slot:
            by_slot: dict[int, list[str]] = {}
            for key in keys:
                by_slot.setdefault(key_slot(key.encode()), []).append(key)
            groups = list(by_slot.values())
        else:
            groups = [keys]
        for group in groups:
            for start in range(0, len(group), CONFIRM_BATCH):
                yield group[start : start + CONFIRM_BATCH]

    # -- sampled verification --------------------------------------------------------------------

    def sampled(self) -> bool:
        """Whether this hit from memory is one to verify (one in ``1 / verify_share``)."""
        if not self._verify_every:
            return False
        self._until_verify -= 1
        if self._until_verify:
            return False
        self._until_verify = self._verify_every
        return len(self._verifications) < MAX_VERIFICATIONS

    def verify(self, key: str, read_keys: list[str]) -> None:
        """Reads ``read_keys`` (the entry's key, then its generations') and the entry's time to
        live from Redis in the background, and compares them with what is held."""
        task = asyncio.get_running_loop().create_task(self._verify(key, read_keys))
        self._verifications.add(task)
        task.add_done_callback(self._verifications.discard)

    async def _verify(self, key: str, read_keys: list[str]) -> None:
        near = self._near
        reader = near.tracking.reader
        if reader is None:
            return
        sent_at = time.monotonic()
        try:
            values, ttl_ms, _ = await reader.mget_with_ttl(
                encode_command(b"MGET", read_keys),
                len(read_keys),
                encode_command(b"PTTL", [key]),
            )
        except _FAILURES:
            return
        if ttl_ms >= 0:
            expires_at = sent_at + ttl_ms / 1000
        elif ttl_ms == _NO_EXPIRY:
            # Every fill sets an expiry: a copy without one (an operator's plain SET) is never a
            # later fill, whatever it holds.
            expires_at = -math.inf
        else:
            # Gone by the time the PTTL (sent first) was read: a value the MGET still found is a
            # fill that landed in between.
            expires_at = math.inf
        if near.diverges(key, values[0], values[1:], expires_at):
            if not self._divergence_logged:
                self._divergence_logged = True
                logger.warning(
                    "near cache emptied: Redis holds other bytes under %s than were read, under "
                    "the same generations; no fill writes that and nothing announced it (cause "
                    "unknown; logged once, counted by commons_cache_near_cache_flushes_total)",
                    key,
                )
            near.flush(FlushReason.DIVERGED)

    async def aclose(self) -> None:
        """Stops the loop and the verifications under way."""
        self._closed = True
        self._near.events.near_cache_held(self._number, 0, 0)
        tasks = [task for task in (self._task, *self._verifications) if task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, RuntimeError, *_FAILURES):
                await task
