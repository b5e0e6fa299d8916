"""One Redis server: hits on one pipelined connection, and the near cache when the service has one.

A read sends the entry's and its scope's generations' ``MGET`` (encoded once per key) on the
:class:`~commons.cache.backends.redis.pipelined_reads.PipelinedReader`'s connection, with the
entry's ``PTTL`` while no expiry of it is remembered (``expiry.py``); a fill is one ``EVALSHA``
on the same connection. With the near cache (``near.py``) a hit it holds sends nothing at all.
A server whose pool chooses its server per connection, or a redis-py that hides a connection's
streams, reads and writes through redis-py instead.
"""

from __future__ import annotations

import time

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from commons.cache.backends.base import StoredRead
from commons.cache.backends.redis.expiry import ExpiryMemo, ToldExpiry
from commons.cache.backends.redis.near import NearCache, ReadTicket
from commons.cache.backends.redis.pipelined_reads import PipelinedReader
from commons.cache.backends.redis.read_channel import (
    channel_opener,
    encode_arguments,
    encode_command,
)
from commons.cache.backends.redis.topology import (
    PIPELINED_READS_MAX_PENDING,
    Fill,
    Topology,
    command_budget,
    fill_script_arguments,
)
from commons.cache.backends.redis.translation import REDIS_FAILURES, translate
from commons.cache.keyspace import Keyspace
from commons.cache.memo import BoundedMemo
from commons.cache.scope import CacheScope

__all__ = ["OneServer"]

#: A scope's fields: namespace, tenant, user, tags.
_ScopeFields = tuple[str, str | None, str | None, tuple[str, ...]]


class OneServer(Topology):
    """One server (``redis://``, ``rediss://``, ``unix://``), read on a pipelined connection."""

    def __init__(
        self,
        client: Redis,
        names: Keyspace,
        expiries: ExpiryMemo,
        near_cache: NearCache | None,
        *,
        contact_pending: bool = False,
    ) -> None:
        """
        Args:
            near_cache: Attached to this server's pipelined reader, if there is one.
            contact_pending: Reads take redis-py's routed path until :meth:`contact_made`
                (``REDIS_CLUSTER=auto``: the server may turn out to be a cluster node).
        """
        budget = command_budget(client.connection_pool.connection_kwargs)
        super().__init__(client, names, expiries, budget)
        self.server = client
        self._contact_pending = contact_pending
        #: By scope (its fields: a plain tuple hashes without a call, and the collector stops
        #: tracking it): its generations' keys as the end of an encoded ``MGET``, and their count.
        self._generation_arguments = BoundedMemo[_ScopeFields, tuple[bytes, int]](
            4096, 4 * 1024 * 1024
        )
        self._near: NearCache | None = None
        #: The pipelined reader (``None``: reads go through redis-py).
        self.reads: PipelinedReader | None = None
        if (opener := channel_opener(client)) is None:
            return
        self.reads = PipelinedReader(
            opener, timeout=budget, max_pending=PIPELINED_READS_MAX_PENDING, tracking=near_cache
        )
        if near_cache is not None:
            near_cache.tracking.attach(
                opener,
                self.reads,
                timeout=budget,
                tracked_prefixes=names.generation_prefixes(),
            )
            self._near = near_cache

    @property
    def near_cache(self) -> NearCache | None:
        return self._near

    def contact_made(self) -> None:
        """The first contact found no cluster: reads take the pipelined connection from now on."""
        self._contact_pending = False

    async def read(self, key: str, scope: CacheScope) -> StoredRead:
        """The entry and its scope's generations, in one round trip (``MGET``); with the near
        cache, none when it holds them."""
        reads = self.reads
        if reads is None or self._contact_pending:
            return await super().read(key, scope)
        ticket: ReadTicket | None = None
        near = self._near
        if near is not None:
            held = self._held(near, key, scope, None)
            if held is not None:
                return held
            near.start()
            if near.admits(key):
                ticket = near.begin(self.read_keys(key, scope))
        # A hit's path: the seam is spelled out rather than entered as a context manager, which
        # would cost a hit a generator and two awaits.
        try:
            replies, tracked_in, told = await self._read_replies(reads, key, scope, ticket)
            read, expires_at = await self.stored_read(key, replies, told)
            if (
                ticket is not None
                and near is not None
                and expires_at is not None
                and near.keep(ticket, tracked_in, read, expires_at)
            ):
                return read._replace(kept=True)
            return read
        except REDIS_FAILURES as exc:
            raise translate(exc) from exc
        finally:
            if ticket is not None and near is not None:
                near.end(ticket)

    def held(self, key: str, scope: CacheScope, expected: bytes) -> StoredRead | None:
        near = self._near
        if near is None or self.reads is None or self._contact_pending:
            return None
        return self._held(near, key, scope, expected)

    def _held(
        self, near: NearCache, key: str, scope: CacheScope, expected: bytes | None
    ) -> StoredRead | None:
        """The near cache's read of ``key``; a sampled share of them also checked in Redis."""
        held = near.get(key, scope.namespace, expected=expected)
        if held is not None and near.checks.sampled():
            near.checks.verify(key, self.read_keys(key, scope))
        return held

    async def write(self, fill: Fill) -> bool:
        """The fill's script on the pipelined connection (one command, no pool checkout, no
        transaction); loaded first if the server lost it (a restart, ``SCRIPT FLUSH``)."""
        reads = self.reads
        if reads is None or self._contact_pending:
            return await super().write(fill)
        keys, args = fill_script_arguments(self.keys, fill)
        script = self.scripts.fill
        command = encode_command(b"EVALSHA", [script.sha, len(keys), *keys, *args])
        try:
            return bool(await reads.run_script(command))
        except redis_errors.NoScriptError:
            await self.client.script_load(script.script)
            return bool(await reads.run_script(command))

    def _read_command(self, key: str, scope: CacheScope) -> tuple[bytes, int]:
        """The encoded ``MGET`` of :meth:`read_keys` and its key count; the generations' part is
        encoded once per scope (a few, where keys may be millions)."""
        fields = (scope.namespace, scope.tenant_id, scope.user_id, scope.tags)
        known = self._generation_arguments.get(fields)
        if known is None:
            generation_keys = self.keys.generation_keys(scope)
            known = (encode_arguments(generation_keys), len(generation_keys))
            self._generation_arguments.put(fields, known, 2 * len(known[0]) + 64)
        arguments, generations = known
        command = encode_command(b"MGET", [key], encoded_after=arguments, count_after=generations)
        return command, generations + 1

    async def _read_replies(
        self,
        reads: PipelinedReader,
        key: str,
        scope: CacheScope,
        ticket: ReadTicket | None,
    ) -> tuple[list[bytes | None], int | None, ToldExpiry | None]:
        """The entry's and its generations' values, the tracking session of the read (with a
        near cache, else ``None``), and, when no expiry of the entry is remembered, its time to
        live asked in the same round trip (past the expiry memo's bound every hit would
        otherwise cost a second one)."""
        command, count = self._read_command(key, scope)
        if not self.expiries.knows(key):
            sent_at = time.monotonic()
            values, ttl_ms, session = await reads.mget_with_ttl(
                command, count, encode_command(b"PTTL", [key])
            )
            return values, session, ToldExpiry(sent_at, ttl_ms)
        if ticket is not None:
            return *(await reads.mget_tracked(command, count)), None
        return await reads.mget_encoded(command, count), None, None

    def drop_near(self, keys: list[str]) -> None:
        if self._near is not None:
            self._near.drop(keys)

    def flush_near(self, reason: str) -> None:
        if self._near is not None:
            self._near.flush(reason)

    def start(self) -> None:
        if self._near is not None and not self._contact_pending:
            self._near.start()

    async def aclose(self) -> None:
        # The near cache belongs to the store, which closes it (it outlives a switch to a cluster).
        if self.reads is not None:
            await self.reads.aclose()
        await super().aclose()
