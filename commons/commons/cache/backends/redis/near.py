"""The near cache: Redis hits answered from this process's memory, kept coherent by Redis itself.

A hit from Redis costs a round trip. Redis 6+ can tell a client when a key it read has changed
(server-assisted client-side caching, ``CLIENT TRACKING``), so a process may keep what it read
and answer the same read again locally until Redis says otherwise. This module keeps, per process,
the entries read from Redis and the scope generations read with them; a read whose entry and
generations are all held (and the entry unexpired) is answered with no command sent.

How it stays coherent
---------------------
- Which keys Redis tracks: only the scope generations, by their prefix. Every entry holds the
  generations its read found and is answered only while the near cache still holds those very
  generations, so what makes an entry wrong is a change of a generation: an invalidation, a
  deletion, an expiry, an eviction, a flush. The entry itself needs no message: Redis writes it
  again only through a fill, which stores it only under the generations it read, so whatever
  value it replaces was computed after the same last invalidation; its expiry is known from
  the read; its eviction makes nothing stale. How Redis is asked to announce them, on which
  connection, and when a *session* of it can be trusted: ``near_tracking.py``. Broadcast tracking
  keeps no table of the keys each connection read: Redis' memory does not grow with the keys
  read nor with the processes that read them, nothing stays behind a process that goes away
  (redis/redis#9231), and ``tracking-table-max-keys`` never evicts a generation. The default mode
  did all three, at about 150 bytes per key read and process (``python -m bench tracking``).
  RESP2 redirect works on Redis 6 and 7 and on managed services alike. A change of an entry that
  no fill made (an operator's ``SET``, garbage written over it) is not announced: a share of hits
  from memory is verified against Redis (below), and every read from memory is validated as any
  read.
- The read/fill race: a read registers its keys before it is sent. An invalidation of any of them
  (a message, or a write by this process) arriving before the result is kept marks the read, and
  its result is then not kept: between the read and the keeping, the invalidation wins.
  A flush of any kind in between does the same (an *epoch* counts flushes).
- What cannot be confirmed is not answered (``near_tracking.py``): a lost or silent subscribed
  connection, or a lost read connection, empties the near cache at once; it keeps nothing until
  a new session is confirmed. A replica cut off from Redis therefore answers nothing from it
  after at most :data:`SILENCE_LIMIT_SECONDS`; a refused ``CLIENT TRACKING`` turns it off while
  Redis refuses.
- Writes, deletions, invalidations and flushes made by this process drop the keys they touch
  before they return (the store calls :meth:`NearCache.drop`), so a process reads its own writes
  although Redis' message for them arrives later.
- Expiry: an entry is kept with its expiry (from the read's remaining time to live) and never
  answered past it, since Redis may expire a key that nobody reads only much later. Generations
  carry no expiry of their own: a fill extends its scope's generations to outlive the entry, so
  the entry's expiry bounds both, and a generation that goes away early (deleted, evicted) is
  announced by Redis like any other key.
- What the near cache answers is exactly what Redis held: the layer validates it as any read
  (format marker, fingerprint, generation), so garbage or another route version's entry is held
  perhaps, but never served.

The bound that needs no model
-----------------------------
Everything above relies on Redis telling this process, and on this process noticing when it
cannot be told. Faults outside that model can fool both: a read connection dropped silently by a
NAT or a load balancer (Redis forgets what it tracked, this side never hears), a ``SWAPDB`` (which
sends no message), a proxy that moves to another server. So every held generation is read again
in the background every third of ``max_age_seconds`` (``CACHE_NEAR_CACHE_MAX_AGE_SECONDS``), and
an entry is answered only while each of its generations was found unchanged by a read sent
within that age (``near_checks.py``); otherwise the next hit reads Redis. Whatever the fault, an
answer from memory rests on generations read at most that long ago. A change of the entry's own
bytes that no fill made is caught by the sampled verification of ``near_checks.py``.

Why broadcast mode on the generations only, not on the whole prefix (cashews' choice): every
replica would then hear of every entry written under the prefix, including entries it never
read, which costs every replica the whole service's write traffic. Generations change once per
scope per invalidation, creation or re-arming (once per entry lifetime), not once per fill.

Bounds: at most ``max_entries`` keys (entries and generations) and ``max_bytes`` of their sizes;
the least recently used entries go first. An entry larger than a sixty-fourth of the byte budget
is not kept.

One server's reads use one near cache; on a cluster each primary has its own
(``cluster_reads.py``), and an entry held by one may depend on generations held by others (its
scope's, each tag's: see :meth:`NearCache.get`). Behind Sentinel nothing is kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import NamedTuple

from commons.cache.backends.base import StoredRead
from commons.cache.backends.redis.near_checks import NearChecks
from commons.cache.backends.redis.near_storage import (
    NearStorage,
)
from commons.cache.backends.redis.near_tracking import (
    HEARTBEAT_SECONDS,
    SILENCE_LIMIT_SECONDS,
    FlushReason,
    TrackingSession,
)
from commons.cache.events import CacheEvents

__all__ = [
    "HEARTBEAT_SECONDS",
    "SILENCE_LIMIT_SECONDS",
    "FlushReason",
    "NearCache",
    "ReadTicket",
]

#: The default of CACHE_NEAR_CACHE_MAX_AGE_SECONDS.
DEFAULT_MAX_AGE_SECONDS = 5.0
#: The default of CACHE_NEAR_CACHE_VERIFY_SHARE.
DEFAULT_VERIFY_SHARE = 0.01


class ReadTicket(NamedTuple):
    """A read under way: what was current when it began (see :meth:`NearCache.begin`)."""

    epoch: int
    touches: int
    session: int
    keys: tuple[str, ...]
    #: When the read was registered, before it was sent (``time.monotonic()``).
    sent_at: float


class NearCache(NearStorage):
    """Entries and generations read from Redis, kept while Redis tracks them for this process.

    Args:
        max_entries: Keys held at most (entries and generations).
        max_bytes: Bytes held at most (keys, values and overhead).
        events: Receives hits, invalidation messages and flushes.
        max_age_seconds: The longest an entry is answered after a read of its generations that
            found them unchanged was sent (see "The bound that needs no model").
        verify_share: The share of hits from memory read again from Redis in the background
            and compared (``0``: none).
    """

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        events: CacheEvents | None = None,
        max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
        verify_share: float = DEFAULT_VERIFY_SHARE,
    ) -> None:
        super().__init__(max_entries, max_bytes)
        self._max_age = max_age_seconds
        self.events = events or CacheEvents()
        #: Bumped by every flush and every new session: reads begun before are not kept.
        self._epoch = 0
        #: Bumped by every invalidation of a key some read is waiting for.
        self._touches = 0
        self._touched: dict[str, int] = {}
        self._inflight: dict[str, int] = {}
        #: The connection Redis announces changes on (attached to a reader's server).
        self.tracking = TrackingSession(self)
        #: Confirms the held generations in the background, and checks sampled hits.
        self.checks = NearChecks(self, max_age_seconds, verify_share)

    def for_node(self, share: int) -> NearCache:
        """A near cache of its own for one of ``share`` servers (a cluster's primaries): the same
        events, ``1/share`` of this one's bounds."""
        node = NearCache(
            max_entries=max(self._max_entries // share, 1),
            max_bytes=max(self._max_bytes // share, 1),
            events=self.events,
            max_age_seconds=self._max_age,
            verify_share=self.checks.verify_share,
        )
        node.checks.per_slot = True
        return node

    # -- the hit path ----------------------------------------------------------------------------

    def get(
        self,
        key: str,
        namespace: str,
        generations_from: tuple[NearCache, ...] = (),
        expected: bytes | None = None,
    ) -> StoredRead | None:
        """The read of ``key`` as Redis would answer it now, if held; ``None`` otherwise.

        ``generations_from``: on a cluster, for each of the entry's generations in order, the
        near cache holding it (perhaps another server's, see ``cluster_reads.py``); each one's
        session must be confirmed too. Empty: this near cache holds them all. ``expected``: held
        only as that very bytes object (else ``None``, and not counted as a hit).
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = time.monotonic()
        tracking = self.tracking
        if now - tracking.heard_at > SILENCE_LIMIT_SECONDS:
            tracking.lose(FlushReason.SILENCE)
            return None
        value, expires_at, generation, generation_keys, generation_values = entry
        if expected is not None and value is not expected:
            return None
        if expires_at <= now:
            self._drop_entry(key)
            return None
        if generations_from and len(generations_from) != len(generation_keys):
            return None  # kept under other tags than this read carries
        held, confirmed, owner = self._generations, self._confirmed, None
        confirmed_after = now - self._max_age
        for index, generation_key in enumerate(generation_keys):
            if generations_from and (source := generations_from[index]) is not owner:
                # The first of a group: its near cache's session must be confirmed too.
                if not source.tracking.confirmed(now):
                    return None
                held, confirmed, owner = source._generations, source._confirmed, source
            if held.get(generation_key) != generation_values[index]:
                # Dropped (changed, announced, evicted) since the entry was kept.
                self._drop_entry(key)
                return None
            if confirmed.get(generation_key, 0.0) <= confirmed_after:
                # Not confirmed lately (a confirmation failed, or the loop was held): the next
                # read from Redis confirms it again.
                return None
        self._entries.move_to_end(key)
        self.events.near_cache_hit(namespace)
        return StoredRead(math.ceil(expires_at - now), value, generation, from_memory=True)

    # -- filling -----------------------------------------------------------------------------------

    def begin(self, keys: list[str]) -> ReadTicket | None:
        """Registers a read of ``keys`` about to be sent; ``None`` when nothing could be kept."""
        session = self.tracking.session
        if session is None:
            return None
        inflight = self._inflight
        for key in keys:
            inflight[key] = inflight.get(key, 0) + 1
        return ReadTicket(self._epoch, self._touches, session, tuple(keys), time.monotonic())

    def end(self, ticket: ReadTicket) -> None:
        """The read of ``ticket`` is over (kept or not)."""
        inflight = self._inflight
        for key in ticket.keys:
            left = inflight[key] - 1
            if left:
                inflight[key] = left
            else:
                del inflight[key]
                self._touched.pop(key, None)

    def keep(
        self,
        ticket: ReadTicket,
        tracked_in: int | None,
        read: StoredRead,
        expires_at: float,
    ) -> bool:
        """Keeps what the read of ``ticket`` found, if it is still known to be current; whether
        it did.

        ``ticket`` covers the entry's key, then its generations' keys; ``tracked_in`` is the
        session the read's connection was tracked into when its reply came; ``read`` must hold a
        value and a generation, ``expires_at`` is the value's expiry.
        """
        if read.value is None or read.generation is None:
            return False
        entry_ticket = ticket._replace(keys=ticket.keys[:1])
        generations_ticket = ticket._replace(keys=ticket.keys[1:])
        values = read.generation.split(b".")
        generations = self.hold_generations(generations_ticket, tracked_in, values)
        return generations is not None and self.keep_entry(
            entry_ticket, tracked_in, read, expires_at, generations_ticket.keys, generations
        )

    def hold_generations(
        self, ticket: ReadTicket, tracked_in: int | None, values: Sequence[bytes]
    ) -> tuple[bytes, ...] | None:
        """Holds the generations the read of ``ticket`` (their keys) found, ``values`` in the
        same order; ``None`` (nothing held) if they are not known to be current."""
        if len(values) != len(ticket.keys) or not self._admits(ticket, tracked_in):
            return None
        sent_at = ticket.sent_at
        return tuple(
            self._held_generation(key, value, sent_at)
            for key, value in zip(ticket.keys, values, strict=True)
        )

    def keep_entry(
        self,
        ticket: ReadTicket,
        tracked_in: int | None,
        read: StoredRead,
        expires_at: float,
        generation_keys: tuple[str, ...],
        generation_values: tuple[bytes, ...],
    ) -> bool:
        """Keeps the entry the read of ``ticket`` (its one key) found, valid while the near caches
        holding its generations (this one, or other servers') hold ``generation_values`` under
        ``generation_keys`` (as :meth:`hold_generations` returned them, group after group);
        whether it did."""
        value, generation = read.value, read.generation
        if value is None or generation is None or not self._admits(ticket, tracked_in):
            return False
        if not self._store_entry(
            ticket.keys[0], value, expires_at, generation, generation_keys, generation_values
        ):
            return False
        self.tracking.tracking_works()
        return True

    def _current(self, ticket: ReadTicket, tracked_in: int | None) -> bool:
        """Whether the read of ``ticket`` was tracked into the live session, with no flush since
        it began."""
        return (
            ticket.epoch == self._epoch
            and tracked_in is not None
            and tracked_in == self.tracking.session
            and tracked_in == ticket.session
        )

    def _admits(self, ticket: ReadTicket, tracked_in: int | None) -> bool:
        if not self._current(ticket, tracked_in):
            return False
        if ticket.touches != self._touches:
            touched = self._touched
            for key in ticket.keys:
                if touched.get(key, 0) > ticket.touches:
                    return False
        return True

    # -- confirming (near_checks.py) ------------------------------------------------------------

    def confirm(
        self, ticket: ReadTicket, tracked_in: int | None, values: list[bytes | None]
    ) -> int:
        """Confirms the held generations that a read of ``ticket`` (their keys) found unchanged,
        and drops those it found changed or gone (whose message is on its way, or lost); how
        many were dropped. A key announced while the read was under way is left as it is."""
        if not self._current(ticket, tracked_in):
            return 0
        dropped, touched, confirmed = 0, self._touched, self._confirmed
        for key, value in zip(ticket.keys, values, strict=True):
            held = self._generations.get(key)
            if held is None or touched.get(key, 0) > ticket.touches:
                continue
            if value == held:
                if ticket.sent_at > confirmed[key]:
                    confirmed[key] = ticket.sent_at
            else:
                self._drop_generation(key)
                dropped += 1
        return dropped

    # -- dropping ----------------------------------------------------------------------------------

    def drop(self, keys: list[str]) -> None:
        """Forgets ``keys`` (changed by this process, or announced by Redis), and makes every
        read of them under way keep nothing."""
        inflight = self._inflight
        for key in keys:
            if key in inflight:
                self._touches += 1
                self._touched[key] = self._touches
            self._drop_entry(key)
            self._drop_generation(key)

    def flush(self, reason: str | None) -> None:
        """Forgets everything; reads under way keep nothing. ``reason`` is reported (``None``:
        not an event worth reporting, nothing was held)."""
        self._epoch += 1
        self._forget_all()
        if reason is not None:
            self.events.near_cache_flushed(reason)

    # -- the tracking session (near_tracking.py) --------------------------------------------------

    def start(self) -> None:
        """Starts keeping the subscribed connection open and the held generations confirmed (in
        the background), once per loop."""
        self.tracking.start()
        self.checks.start()

    @property
    def live(self) -> bool:
        """Whether a session is confirmed: reads may be kept and answered."""
        return self.tracking.session is not None

    def tracking_command(self) -> tuple[int, tuple[bytes, ...]] | None:
        """The session and commands that track a read connection (``ReadTracking``)."""
        return self.tracking.tracking_command()

    def tracked_connection_lost(self, session: int) -> None:
        """A read connection tracked into ``session`` closed: what it read is no longer tracked."""
        self.tracking.tracked_connection_lost(session)

    def tracking_refused(self, message: str) -> None:
        """Redis refused to track: the near cache is off while it refuses."""
        self.tracking.tracking_refused(message)

    async def aclose(self) -> None:
        """Closes the subscribed connection and forgets everything. Safe to call twice."""
        await self.checks.aclose()
        await self.tracking.aclose()
