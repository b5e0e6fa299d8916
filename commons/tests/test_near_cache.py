"""The near cache: Redis hits answered from process memory, and never once Redis could disagree.

Every test runs against real redis-server processes; "no command sent" is read from the server's
own ``INFO commandstats``, invalidations are made by other clients (another replica process, a
plain client as ``redis-cli`` would be), faults are real (``CLIENT KILL``, ``SIGSTOP``, eviction
under ``maxmemory``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from commons.cache import CacheSettings, cache, close_cache, init_cache
from commons.cache.backends import factory
from commons.cache.backends.memory import MemoryStore
from commons.cache.backends.redis import RedisStore
from commons.cache.backends.redis.near import FlushReason, NearCache
from commons.cache.backends.redis.near_storage import GENERATION_OVERHEAD_BYTES
from commons.cache.backends.redis.one_server import OneServer
from commons.cache.errors import BackendError
from commons.cache.layer import CacheLayer
from commons.cache.scope import CacheScope, InvalidationTarget, ScopedKey
from commons.testing.events import NEAR_CACHE_BACKGROUND_COMMANDS
from commons.testing.events import RecordedEvents as Recorder
from commons.testing.proxy import LoopbackProxy
from commons.testing.redis_server import RedisServer, find_redis_server, redis_server_version
from commons.testing.waiting import eventually

PREFIX = "near-test"
SCOPE = CacheScope("reports", "t1")
KEY = f"{PREFIX}:reports:tenant_t1:/r"
#: Commands the near cache's own connections send whatever the reads do.
BACKGROUND_COMMANDS = NEAR_CACHE_BACKGROUND_COMMANDS


async def command_calls(client: Redis) -> dict[str, int]:
    """Calls per command since the server started, but for the near cache's background ones."""
    stats = await client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}
    return {name: count for name, count in calls.items() if name not in BACKGROUND_COMMANDS}


def near_of(store: RedisStore) -> NearCache:
    near = store.near_cache
    assert near is not None
    return near


@pytest.fixture
async def outside(own_redis: RedisServer) -> AsyncIterator[Redis]:
    """A plain client of the test's server: another process's writes, an operator's commands."""
    client = Redis.from_url(own_redis.url)
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def tracked_store(
    server: RedisServer, recorder: Recorder, **near_options: Any
) -> AsyncIterator[RedisStore]:
    """A store with a near cache (``near_options``) on ``server``, its tracking confirmed."""
    client = Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    near = NearCache(**{"max_entries": 1000, "max_bytes": 1 << 20, **near_options}, events=recorder)
    redis_store = RedisStore(client, PREFIX, near_cache=near)
    await redis_store.ping()
    try:
        await eventually(lambda: _true(near.live), "tracking on")
        yield redis_store
    finally:
        await redis_store.aclose()


@pytest.fixture
async def store(own_redis: RedisServer, recorder: Recorder) -> AsyncIterator[RedisStore]:
    """A store with a near cache on the test's server, its tracking confirmed.

    Its maximum age is long: confirmations are MGETs too, and none is due while a test counts the
    reads' commands."""
    async with tracked_store(own_redis, recorder, max_age_seconds=300) as redis_store:
        yield redis_store


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


async def _true(value: bool) -> bool:
    return value


async def filled(store: RedisStore, recorder: Recorder, value: bytes = b"v1") -> bytes:
    """Writes ``value`` under KEY and reads it until the near cache answers; its generation."""
    generation = await store.generation(SCOPE)
    assert await store.write(KEY, value, 60, SCOPE, generation)

    async def near_hit() -> bool:
        hits = recorder.near_hits
        await store.read(KEY, SCOPE)
        return recorder.near_hits > hits

    await eventually(near_hit, "a near hit")
    return generation


async def test_a_near_hit_sends_redis_no_command(
    store: RedisStore, recorder: Recorder, outside: Redis
) -> None:
    generation = await filled(store, recorder)
    before = await command_calls(outside)
    reads = [await store.read(KEY, SCOPE) for _ in range(5)]
    after = await command_calls(outside)
    assert {(read.value, read.generation) for read in reads} == {(b"v1", generation)}
    assert all(0 < read.remaining <= 60 for read in reads)
    assert after == before


async def test_other_fills_of_the_scope_leave_its_held_generations_alone(
    store: RedisStore, recorder: Recorder, own_redis: RedisServer
) -> None:
    """Another replica's misses in the same scope store entries under the same generations; if
    each fill re-armed them, Redis would announce each to every replica, whose near caches would
    then read Redis on every hit of the scope after every miss."""
    other = RedisStore(Redis.from_url(own_redis.url), PREFIX)
    try:
        generation = await filled(store, recorder)
        messages = recorder.messages
        for n in range(5):
            assert await other.write(f"{KEY}/{n}", b"x", 60, SCOPE, generation)
        await asyncio.sleep(0.1)  # a message, if any, has arrived

        hits = recorder.near_hits
        assert (await store.read(KEY, SCOPE)).value == b"v1"
        assert recorder.near_hits == hits + 1
        assert recorder.messages == messages
    finally:
        await other.aclose()


async def test_a_generation_deleted_from_outside_is_dropped(
    store: RedisStore, recorder: Recorder, outside: Redis
) -> None:
    """DEL of a generation key (as from redis-cli): Redis' message drops it, the next read asks
    Redis and reports the generation gone."""
    generation = await filled(store, recorder)
    await outside.delete(store.generation_keys(SCOPE)[-1])

    async def gone() -> bool:
        return (await store.read(KEY, SCOPE)).generation is None

    await eventually(gone, "the deleted generation no longer reported")
    assert recorder.messages >= 1
    assert generation is not None


async def test_an_entry_expiring_in_redis_is_not_answered_past_its_expiry(
    store: RedisStore, recorder: Recorder, outside: Redis
) -> None:
    generation = await store.generation(SCOPE)
    assert await store.write(KEY, b"v1", 1, SCOPE, generation)
    assert (await store.read(KEY, SCOPE)).value == b"v1"
    assert (await store.read(KEY, SCOPE)).from_memory

    answers = []
    while True:
        ttl_ms = await outside.pttl(KEY)
        read = await store.read(KEY, SCOPE)
        answers.append((read.from_memory, ttl_ms, read.value))
        if ttl_ms < 0:
            break
        await asyncio.sleep(0.02)

    # Nothing is answered once Redis had expired the entry before the read began.
    assert len(answers) > 10
    assert answers[-1] == (False, -2, None)


async def test_a_flush_of_the_database_empties_it(
    store: RedisStore, recorder: Recorder, outside: Redis
) -> None:
    await filled(store, recorder)
    await outside.flushdb()
    await eventually(lambda: _true(FlushReason.SERVER_FLUSH in recorder.flushes), "flushed")
    assert (await store.read(KEY, SCOPE)).value is None


async def test_this_process_reads_its_own_writes_at_once(
    store: RedisStore, recorder: Recorder
) -> None:
    generation = await filled(store, recorder)
    assert await store.write(KEY, b"v2", 60, SCOPE, generation)
    assert (await store.read(KEY, SCOPE)).value == b"v2"
    await store.invalidate(InvalidationTarget("reports", "t1"))
    assert (await store.read(KEY, SCOPE)).generation is None


async def test_an_invalidation_between_the_read_and_the_keeping_wins(
    store: RedisStore, recorder: Recorder, outside: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read/fill race, provoked: the read's reply is in, then another client deletes the
    generation and its message is processed, then the read's result would be kept."""
    generation = await store.generation(SCOPE)
    assert await store.write(KEY, b"v1", 60, SCOPE, generation)
    topology = store.topology
    assert isinstance(topology, OneServer)
    reads = topology.reads
    assert reads is not None
    original = reads.mget_tracked

    async def raced(command: bytes, count: int) -> tuple[list[bytes | None], int | None]:
        replies = await original(command, count)
        messages = recorder.messages
        await outside.delete(store.generation_keys(SCOPE)[-1])
        await eventually(lambda: _true(recorder.messages > messages), "the message")
        return replies

    monkeypatch.setattr(reads, "mget_tracked", raced)
    raced_read = await store.read(KEY, SCOPE)
    assert raced_read.generation == generation  # what Redis held when it was read
    monkeypatch.undo()
    after = await store.read(KEY, SCOPE)
    assert after.generation is None
    assert recorder.near_hits == 0


@pytest.mark.parametrize("connection", ["tracking", "reader"])
async def test_killing_a_tracking_connection_empties_it_until_tracking_is_back(
    store: RedisStore, recorder: Recorder, outside: Redis, connection: str
) -> None:
    """CLIENT KILL of the subscribed connection or of the read connection, and in the same
    breath a change Redis can no longer announce: the near cache is emptied before it answers
    again, and answers again once tracking is back."""
    await filled(store, recorder)
    clients = await outside.client_list()
    flag = "P" if connection == "tracking" else "t"
    victim = next(c for c in clients if flag in c["flags"])
    pipe = outside.pipeline(transaction=False)
    pipe.execute_command("CLIENT", "KILL", "ID", victim["id"])
    pipe.delete(store.generation_keys(SCOPE)[-1])
    await pipe.execute()
    reason = FlushReason.TRACKING_LOST if connection == "tracking" else FlushReason.READER_LOST
    await eventually(lambda: _true(reason in recorder.flushes), f"flushed: {reason}")
    assert (await store.read(KEY, SCOPE)).generation is None
    await filled(store, recorder)


async def test_a_silent_redis_empties_it_and_it_answers_nothing(
    store: RedisStore, recorder: Recorder, own_redis: RedisServer
) -> None:
    """SIGSTOP of the server (a link that goes silent): within the heartbeat's limit the near
    cache is emptied, and a read is then Redis' to answer (here: a timeout), never the near
    cache's; once Redis answers again, so does the near cache."""
    await filled(store, recorder)
    own_redis.pause()
    try:
        await eventually(lambda: _true(FlushReason.SILENCE in recorder.flushes), "silence")
        hits = recorder.near_hits
        with pytest.raises(BackendError):
            await store.read(KEY, SCOPE)
        assert recorder.near_hits == hits
    finally:
        own_redis.resume()
    await filled(store, recorder)


# -- the bound that needs no model: faults tracking cannot see ---------------------------------

MAX_AGE = 1.0


@pytest.fixture
def max_age() -> float:
    """The near cache's maximum age in ``proxied_store`` (a test overrides it to see past it)."""
    return MAX_AGE


@pytest.fixture
async def proxied_store(
    own_redis: RedisServer, recorder: Recorder, max_age: float
) -> AsyncIterator[tuple[RedisStore, LoopbackProxy]]:
    """A store with a near cache (maximum age ``max_age``) reaching the test's server through a
    loopback proxy, its tracking confirmed."""
    with LoopbackProxy(own_redis.port) as proxy:
        client = Redis.from_url(proxy.url, socket_timeout=0.3, socket_connect_timeout=0.3)
        near = NearCache(
            max_entries=1000, max_bytes=1 << 20, events=recorder, max_age_seconds=max_age
        )
        redis_store = RedisStore(client, PREFIX, near_cache=near)
        await redis_store.ping()
        try:
            await eventually(lambda: _true(near.live), "tracking on")
            yield redis_store, proxy
        finally:
            await redis_store.aclose()


async def tracking_clients(outside: Redis, count: int) -> bool:
    """Whether Redis counts ``count`` connections with tracking on."""
    return int((await outside.info("clients"))["tracking_clients"]) == count


async def another_process_updates(store: RedisStore, outside: Redis) -> None:
    """What another replica's update does in Redis: its invalidation retires the scope's
    generation, then a fill stores the new value, v2."""
    await outside.delete(store.generation_keys(SCOPE)[-1])
    await outside.set(KEY, b"v2", keepttl=True)


async def answers_after(store: RedisStore, changed_at: float, seconds: float) -> list[tuple]:
    """Reads KEY for ``seconds``: (seconds since ``changed_at``, value, from memory) of each
    answer; a read that fails (a connection being replaced) answers nothing."""
    answers: list[tuple] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            read = await store.read(KEY, SCOPE)
        except BackendError:
            continue
        answers.append((time.monotonic() - changed_at, read.value, read.from_memory))
        await asyncio.sleep(0.02)
    return answers


async def test_a_read_connection_dropped_silently_is_answered_from_no_longer_than_the_maximum_age(
    proxied_store: tuple[RedisStore, LoopbackProxy], recorder: Recorder, outside: Redis
) -> None:
    """A NAT or load balancer drops the idle read connection: Redis forgets what it tracked and
    tells nobody, the subscribed connection stays healthy. Another process's write then reaches
    no one; the old value is answered from memory at most MAX_AGE after it was read."""
    store, proxy = proxied_store
    await filled(store, recorder)
    (reader,) = proxy.connections_that_sent(b"TRACKING")
    reader.sever_silently()
    # The update must come after Redis dropped the connection (else it is still announced).
    await eventually(lambda: tracking_clients(outside, 0), "Redis forgot the read connection")
    await another_process_updates(store, outside)
    changed_at = time.monotonic()

    answers = await answers_after(store, changed_at, MAX_AGE + 2.0)

    assert any(value == b"v1" for _, value, _ in answers), "the fault fooled tracking"
    assert [at for at, value, _ in answers if value == b"v1"][-1] < MAX_AGE
    assert answers[-1][1] == b"v2"


@pytest.fixture
async def verifying_store(own_redis: RedisServer, recorder: Recorder) -> AsyncIterator[RedisStore]:
    """A store whose near cache verifies every hit from memory against Redis."""
    async with tracked_store(own_redis, recorder, verify_share=1.0) as redis_store:
        yield redis_store


async def test_an_entry_rewritten_outside_a_fill_is_found_by_the_sampled_verification(
    verifying_store: RedisStore,
    recorder: Recorder,
    outside: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only generations are tracked: an entry written over by something else than a fill under
    the same generations (an operator's SET) is not announced. A verified hit finds Redis
    holding other bytes: the near cache is emptied, counted and logged once, then the new
    bytes are answered."""
    store = verifying_store
    await filled(store, recorder)
    await outside.set(KEY, b"v2", keepttl=True)
    changed_at = time.monotonic()

    answers = await answers_after(store, changed_at, 0.5)

    old = [at for at, value, _ in answers if value == b"v1"]
    assert old
    assert old[-1] < 0.2, old
    assert answers[-1][1] == b"v2"
    assert FlushReason.DIVERGED in recorder.flushes
    assert "cause unknown" in caplog.text
    await outside.set(KEY, b"v3", keepttl=True)
    await answers_after(store, time.monotonic(), 0.3)
    assert caplog.text.count("cause unknown") == 1


async def test_an_operators_set_that_drops_the_expiry_is_found_by_the_sampled_verification(
    verifying_store: RedisStore, recorder: Recorder, outside: Redis
) -> None:
    """A plain ``SET`` (no ``KEEPTTL``) leaves the key with no expiry, which no fill ever
    writes: it is no later fill, whatever its expiry compares to. Held as one, it was answered
    from memory until the held copy expired (minutes), every hit verified."""
    store = verifying_store
    await filled(store, recorder)
    await outside.set(KEY, b"v2")
    changed_at = time.monotonic()

    answers = await answers_after(store, changed_at, 0.5)

    assert [at for at, value, _ in answers if value == b"v1"][-1] < 0.2
    assert answers[-1][1] == b"v2"
    assert FlushReason.DIVERGED in recorder.flushes


async def test_a_later_fill_of_an_evicted_entry_is_no_divergence(
    verifying_store: RedisStore, recorder: Recorder, outside: Redis
) -> None:
    """Redis may drop an entry (allkeys-lru) and another process fill it again under the same
    generations: its bytes differ, but it was computed after the same last invalidation, and it
    expires later. The near cache goes on answering what it holds; nothing is emptied."""
    store = verifying_store
    generation = await filled(store, recorder)
    await outside.delete(KEY)
    await asyncio.sleep(0.05)
    assert await store.write(KEY, b"v2", 60, SCOPE, generation)
    assert (await store.read(KEY, SCOPE)).value == b"v2"  # this process reads its own write
    await outside.delete(KEY)
    await outside.set(KEY, (await store.read(KEY, SCOPE)).value or b"", ex=61)

    answers = await answers_after(store, time.monotonic(), 0.3)

    assert answers
    assert all(from_memory for _, _, from_memory in answers)
    assert FlushReason.DIVERGED not in recorder.flushes


async def test_swapdb_which_redis_announces_to_no_one_is_answered_no_longer_than_the_maximum_age(
    proxied_store: tuple[RedisStore, LoopbackProxy],
    recorder: Recorder,
    outside: Redis,
    own_redis: RedisServer,
) -> None:
    store, _ = proxied_store
    await filled(store, recorder)
    other_database = Redis.from_url(own_redis.url.removesuffix("/0") + "/1")
    try:
        await other_database.set(KEY, b"v2", ex=60)
        await outside.swapdb(0, 1)
    finally:
        await other_database.aclose()
    changed_at = time.monotonic()

    answers = await answers_after(store, changed_at, MAX_AGE + 1.0)

    # Redis 7.0 announces nothing of a SWAPDB to a tracking client (later releases may).
    assert all(at < MAX_AGE for at, value, _ in answers if value == b"v1")
    assert answers[-1][1] == b"v2"


async def test_past_the_maximum_age_hits_stay_in_memory_their_generations_confirmed(
    proxied_store: tuple[RedisStore, LoopbackProxy], recorder: Recorder, outside: Redis
) -> None:
    """The held generations are read again in the background every third of the maximum age:
    one command for all of them, however many entries depend on them, and no hit waits for it."""
    store, _ = proxied_store
    await filled(store, recorder)
    before, calls_before = await outside.info("stats"), await command_calls(outside)

    reads = []
    deadline = time.monotonic() + 3 * MAX_AGE
    while time.monotonic() < deadline:
        reads.append(await store.read(KEY, SCOPE))
        await asyncio.sleep(0.05)

    after, calls_after = await outside.info("stats"), await command_calls(outside)
    assert all(read.from_memory for read in reads), [read.from_memory for read in reads]
    assert {read.value for read in reads} == {b"v1"}
    confirmations = calls_after.get("mget", 0) - calls_before.get("mget", 0)
    assert 3 <= confirmations <= 3 * 3 + 1, confirmations
    # Each read the scope's two generations only, never the entry's key.
    keys_read = after["keyspace_hits"] + after["keyspace_misses"]
    keys_read -= before["keyspace_hits"] + before["keyspace_misses"]
    assert keys_read == 2 * confirmations


async def test_a_confirmation_that_goes_unanswered_empties_the_near_cache(
    proxied_store: tuple[RedisStore, LoopbackProxy], recorder: Recorder
) -> None:
    """Hits from memory leave the read connection idle; the confirmation proves it alive. One
    black-holed: its reads go unanswered, the connection is given up, nothing is answered from
    what it tracked."""
    store, proxy = proxied_store
    await filled(store, recorder)
    (reader,) = proxy.connections_that_sent(b"TRACKING")
    reader.black_hole("to_client")
    started = time.monotonic()

    async def emptied() -> bool:
        return FlushReason.READER_LOST in recorder.flushes

    await eventually(emptied, "the near cache emptied")
    assert time.monotonic() - started < MAX_AGE / 3 + 0.3 + 0.5


async def test_a_late_reply_does_not_lengthen_a_held_entrys_life_past_redis_expiry(
    proxied_store: tuple[RedisStore, LoopbackProxy], outside: Redis
) -> None:
    """Redis counts the time to live it reports from when it ran PTTL; a reply that arrives
    200 ms later must not keep the entry in memory 200 ms past Redis' own expiry."""
    store, proxy = proxied_store
    # Redis' own expiry cycle would announce the key's end and hide the fault: it expires keys
    # only when they are read, and the held entry's expiry is all that ends it.
    await outside.execute_command("DEBUG", "SET-ACTIVE-EXPIRE", "0")
    await store.generation(SCOPE)
    proxy.delay_replies(0.2)  # within the client's 0.3 s socket timeout
    await outside.set(KEY, b"v1", px=1500)
    expired_at = time.monotonic() + 1.5  # Redis' expiry is no later than this

    answers = await answers_after(store, expired_at, 2.5)

    held = [at for at, value, from_memory in answers if value == b"v1" and from_memory]
    assert held, answers
    assert held[-1] < 0


@pytest.mark.parametrize("max_age", [60.0])
async def test_a_subscribed_connection_whose_delay_grows_slowly_is_caught_as_silent(
    proxied_store: tuple[RedisStore, LoopbackProxy], recorder: Recorder, outside: Redis
) -> None:
    """Replies keep coming every few hundred milliseconds, each later than the last: how late
    they are counts, not how often they come, so invalidations are never answered past the
    silence limit after them."""
    store, proxy = proxied_store
    await filled(store, recorder)
    (subscriber,) = proxy.connections_that_sent(b"SUBSCRIBE")
    for step in range(1, 11):  # 0.15 s more every 0.25 s: gaps stay far below the limit
        subscriber.delay_replies(0.15 * step)
        await asyncio.sleep(0.25)
    await store.read(KEY, SCOPE)  # held again, on whichever session is current
    await another_process_updates(store, outside)
    changed_at = time.monotonic()

    answers = await answers_after(store, changed_at, 2.5)

    assert all(at < 1.3 for at, value, _ in answers if value == b"v1"), answers
    assert answers[-1][1] == b"v2"


#: The ACL rule that refuses CLIENT TRACKING: Redis 6 removes no subcommand from a user, so
#: there the whole CLIENT command goes (the subscribed connection's CLIENT ID is refused first).
TRACKING_REFUSED = (
    "-client|tracking" if redis_server_version(find_redis_server()) >= (7,) else "-client"
)


@pytest.fixture
async def refused_tracking(
    own_redis: RedisServer, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[RedisStore, NearCache]]:
    """A store whose user may not run CLIENT TRACKING (as a Redis older than 6 would answer),
    KEY written, read until the near cache has said it is off."""
    own_redis.command("ACL", "SETUSER", "svc", "on", ">pw", "~*", "&*", "+@all", TRACKING_REFUSED)
    near = NearCache(max_entries=100, max_bytes=1 << 20, events=recorder)
    store = RedisStore(
        Redis.from_url(f"redis://svc:pw@127.0.0.1:{own_redis.port}/0"), PREFIX, near_cache=near
    )
    try:
        await store.ping()
        generation = await store.generation(SCOPE)
        await store.write(KEY, b"v1", 60, SCOPE, generation)

        async def refused() -> bool:
            assert (await store.read(KEY, SCOPE)).value == b"v1"
            return "near cache off" in caplog.text

        await eventually(refused, "the warning that it is off")
        yield store, near
    finally:
        await store.aclose()


async def test_tracking_refused_is_asked_again_and_the_near_cache_comes_back(
    refused_tracking: tuple[RedisStore, NearCache],
    own_redis: RedisServer,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis refuses CLIENT TRACKING, then grants it (an operator's fix, a failover behind one
    address): the near cache is off only while Redis refuses."""
    store, _ = refused_tracking
    own_redis.command("ACL", "SETUSER", "svc", TRACKING_REFUSED.replace("-", "+", 1))

    async def near_hit() -> bool:
        assert (await store.read(KEY, SCOPE)).value == b"v1"
        return recorder.near_hits > 0

    await eventually(near_hit, "a near hit once Redis tracks again", patience=8.0)
    warnings = caplog.get_records("setup") + caplog.get_records("call")
    assert sum("near cache off" in record.getMessage() for record in warnings) == 1


@pytest.fixture
def evicting_redis() -> Iterator[RedisServer]:
    server = RedisServer(extra_args=["--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lru"])
    with server:
        yield server


async def test_an_evicted_generation_is_dropped(evicting_redis: RedisServer) -> None:
    recorder = Recorder()
    near = NearCache(max_entries=1000, max_bytes=1 << 20, events=recorder)
    store = RedisStore(Redis.from_url(evicting_redis.url), PREFIX, near_cache=near)
    outside = Redis.from_url(evicting_redis.url)
    try:
        await store.ping()
        await eventually(lambda: _true(near.live), "tracking on")
        generation = await filled(store, recorder)
        generation_key = store.generation_keys(SCOPE)[-1]
        filler = b"x" * 100_000
        for index in range(2000):
            await outside.set(f"filler:{index}", filler)
            if not await outside.exists(generation_key):
                break
        assert not await outside.exists(generation_key), "the generation was never evicted"

        async def dropped() -> bool:
            read = await store.read(KEY, SCOPE)
            return read.generation != generation or read.value is None

        await eventually(dropped, "the evicted generation no longer reported")
    finally:
        await store.aclose()
        await outside.aclose()


async def test_garbage_under_an_entry_key_is_never_served_from_it(
    store: RedisStore, recorder: Recorder, outside: Redis, make_settings: Callable[..., Any]
) -> None:
    """Bytes of another format (or another route version's entry) held by the near cache are
    validated by the layer as any read: a miss, counted, every time."""
    settings = make_settings(None, CACHE_PREFIX=PREFIX)
    layer = CacheLayer(
        settings, redis=store, memory=factory.memory_store(settings), events=recorder
    )
    await layer.start()
    try:
        await store.generation(SCOPE)
        await outside.set(KEY, b'{"not": "ours"}', ex=60)
        for _ in range(5):
            lookup = await layer.lookup(KEY, b"fingerprint")
            assert lookup is not None
            assert lookup.value is None
        await eventually(
            lambda: _is_miss(layer, recorder), "the garbage held by the near cache, still a miss"
        )
    finally:
        await layer.aclose()
    assert set(recorder.rejected) == {"format"}


async def _is_miss(layer: CacheLayer, recorder: Recorder) -> bool:
    hits, rejected = recorder.near_hits, len(recorder.rejected)
    lookup = await layer.lookup(KEY, b"fingerprint")
    assert lookup is not None
    assert lookup.value is None
    assert len(recorder.rejected) == rejected + 1
    return recorder.near_hits > hits


@pytest.mark.parametrize("near_cache", [True, False])
async def test_cache_near_cache_false_reads_redis_on_every_hit(
    own_redis: RedisServer,
    outside: Redis,
    make_identity_app: Callable[[], FastAPI],
    make_settings: Callable[..., CacheSettings],
    near_cache: bool,
) -> None:
    app = make_identity_app()

    @app.get("/r")
    @cache(namespace="reports")
    async def report() -> dict[str, int]:
        return {"n": 1}

    await init_cache(make_settings(own_redis.url, CACHE_NEAR_CACHE=near_cache))
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:

            async def mgets_of_one_hit() -> int:
                before = (await command_calls(outside)).get("mget", 0)
                response = await http.get("/r", headers={"X-Test-Tenant": "t1"})
                assert response.json() == {"n": 1}
                return (await command_calls(outside)).get("mget", 0) - before

            await mgets_of_one_hit()  # the miss and its fill
            if near_cache:
                await eventually(lambda: _is_zero(mgets_of_one_hit()), "a hit with no MGET")
            else:
                assert [await mgets_of_one_hit() for _ in range(5)] == [1] * 5
                flags = {c["flags"] for c in await outside.client_list()}
                assert not any("t" in each or "P" in each for each in flags)
    finally:
        await close_cache()


async def _is_zero(count: Awaitable[int]) -> bool:
    return await count == 0


def test_the_byte_bound_keeps_the_memory_backend_bounded() -> None:
    store = MemoryStore(10_000, max_bytes=1 << 20)
    value = b"x" * 100_000
    for index in range(100):
        asyncio.run(store.write(f"k{index}", value, 60, SCOPE))
    assert store.bytes_held <= 1 << 20
    assert len(store) == (1 << 20) // (100_000 + 300)
    assert store.read_now("k99").value == value
    assert not asyncio.run(store.write("huge", b"x" * (2 << 20), 60, SCOPE))


async def _written(store: RedisStore, count: int, value: bytes) -> list[str]:
    """``count`` keys of ``SCOPE`` written with ``value`` (not read yet)."""
    generation = await store.generation(SCOPE)
    keys = [f"{KEY}/{index}" for index in range(count)]
    for key in keys:
        await store.write(key, value, 60, SCOPE, generation)
    return keys


async def test_the_byte_bound_keeps_it_bounded_and_once_full_it_keeps_what_it_holds(
    own_redis: RedisServer, recorder: Recorder
) -> None:
    # Over a working set far larger than its bounds, keeping every read would evict an entry
    # read as often as the new one, and cost every read from Redis a keeping and an eviction.
    async with tracked_store(
        own_redis, recorder, max_entries=10_000, max_bytes=256 * 1024
    ) as store:
        near = near_of(store)
        keys = await _written(store, 300, b"x" * 3000)
        for key in keys:
            await store.read(key, SCOPE)  # the first ones fill it, the others are read once
            assert near.bytes_held <= 256 * 1024
        held = len(near)
        assert 20 < held < 100

        hits = recorder.near_hits
        for key in keys[: held - 10]:
            assert (await store.read(key, SCOPE)).from_memory
        assert recorder.near_hits == hits + held - 10

        # A key read again soon (the sweep read it once) comes in, in place of the least
        # recently used.
        assert not (await store.read(keys[-1], SCOPE)).from_memory
        assert (await store.read(keys[-1], SCOPE)).from_memory


async def test_entries_of_one_scope_share_its_generations_and_are_counted_until_dropped(
    own_redis: RedisServer, recorder: Recorder
) -> None:
    # Per entry only its key, value and expiry: what the byte bound counts, and what is held.
    async with tracked_store(own_redis, recorder, max_entries=10_000, max_bytes=1 << 20) as store:
        near = near_of(store)
        keys = await _written(store, 50, b"x" * 100)
        for key in keys:
            assert (await store.read(key, SCOPE)).value is not None
        assert len(near) == 50
        first, *others = (near._entries[key] for key in keys)
        for entry in others:
            assert all(entry[field] is first[field] for field in (2, 3, 4))

        near.drop(keys)
        generation_keys = near.held_generation_keys()
        assert len(near) == 0
        assert generation_keys
        assert near.bytes_held == sum(
            len(key) + len(near._generations[key]) + GENERATION_OVERHEAD_BYTES
            for key in generation_keys
        )
        near.drop(generation_keys)
        assert near.bytes_held == 0


async def test_an_invalidation_on_one_replica_is_seen_by_the_other(
    redis_url: str, start_replicas: Callable[..., list[str]], tmp_path: Path
) -> None:
    """Two uvicorn processes on one Redis: B answers from its near cache (no MGET), A's PUT
    invalidates and returns; B answers the new version within PATIENCE_SECONDS, and only it."""
    database = tmp_path / "replicas.sqlite"
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.execute("CREATE TABLE IF NOT EXISTS res (tenant TEXT PRIMARY KEY, version INTEGER)")
    replica_a, replica_b = start_replicas(
        REDIS_URL=redis_url,
        CACHE_PREFIX="near-replicas",
        REPLICA_DB=str(database),
        REPLICA_READ_SECONDS="0",
    )
    outside = Redis.from_url(redis_url)
    try:
        async with (
            httpx.AsyncClient(base_url=replica_a, timeout=10) as a,
            httpx.AsyncClient(base_url=replica_b, timeout=10) as b,
        ):
            for _ in range(3):
                await _one_round(a, b, outside, {"X-Test-Tenant": f"t-{uuid.uuid4().hex[:12]}"})
    finally:
        await outside.aclose()


async def _one_round(
    a: httpx.AsyncClient, b: httpx.AsyncClient, outside: Redis, tenant: dict[str, str]
) -> None:
    assert (await a.get("/res", headers=tenant)).json() == {"version": 1}

    async def b_answers_without_redis() -> bool:
        before = (await command_calls(outside)).get("mget", 0)
        assert (await b.get("/res", headers=tenant)).json() == {"version": 1}
        return (await command_calls(outside)).get("mget", 0) == before

    await eventually(b_answers_without_redis, "B answering from its near cache")
    assert (await a.put("/res", headers=tenant)).json() == {"version": 2}

    async def b_answers_v2() -> bool:
        return (await b.get("/res", headers=tenant)).json() == {"version": 2}

    await eventually(b_answers_v2, "B answering the new version")
    answers = [(await b.get("/res", headers=tenant)).json() for _ in range(5)]
    assert answers == [{"version": 2}] * 5


async def test_a_redis_that_refuses_tracking_turns_it_off_and_hits_read_redis(
    refused_tracking: tuple[RedisStore, NearCache], recorder: Recorder, outside: Redis
) -> None:
    """While Redis refuses CLIENT TRACKING: one warning, no near hit, every read answered by
    Redis."""
    store, near = refused_tracking
    before = (await command_calls(outside)).get("mget", 0)

    reads = [await store.read(KEY, SCOPE) for _ in range(5)]

    assert {read.value for read in reads} == {b"v1"}
    assert (await command_calls(outside)).get("mget", 0) == before + 5
    assert recorder.near_hits == 0
    assert not near.live


async def test_near_cache_metrics_count_hits_messages_and_flushes(
    own_redis: RedisServer, outside: Redis
) -> None:
    from prometheus_client import CollectorRegistry

    from commons.cache.metrics import PrometheusEvents

    registry = CollectorRegistry()
    events = PrometheusEvents(registry)
    near = NearCache(max_entries=100, max_bytes=1 << 20, events=events)
    store = RedisStore(Redis.from_url(own_redis.url), PREFIX, near_cache=near)
    try:
        await store.ping()
        await eventually(lambda: _true(near.live), "tracking on")
        generation = await store.generation(SCOPE)
        await store.write(KEY, b"v1", 60, SCOPE, generation)

        def sample(name: str, **labels: str) -> float:
            return registry.get_sample_value(name, labels) or 0.0

        async def near_hit() -> bool:
            await store.read(KEY, SCOPE)
            return sample("commons_cache_near_hits_total", namespace="reports") > 0

        await eventually(near_hit, "a near hit counted")
        await outside.delete(store.generation_keys(SCOPE)[-1])
        await eventually(
            lambda: _true(sample("commons_cache_near_invalidations_total") > 0), "a message"
        )
        await outside.flushdb()
        await eventually(
            lambda: _true(sample("commons_cache_near_flushes_total", reason="server_flush") == 1),
            "a flush counted",
        )
    finally:
        await store.aclose()


# -- what tracking costs Redis -------------------------------------------------------------------


async def read_twice(store: RedisStore, recorder: Recorder, keys: int) -> int:
    """Writes ``keys`` entries of SCOPE and reads each twice; the near hits of the second pass."""
    generation = await store.generation(SCOPE)
    for n in range(keys):
        assert await store.write(f"{KEY}/{n}", b"v", 60, SCOPE, generation)
        await store.read(f"{KEY}/{n}", SCOPE)
    hits = recorder.near_hits
    for n in range(keys):
        assert (await store.read(f"{KEY}/{n}", SCOPE)).value == b"v"
    return recorder.near_hits - hits


async def test_redis_remembers_no_key_the_near_cache_read(
    store: RedisStore, recorder: Recorder, outside: Redis
) -> None:
    """Only the generation keys' prefix is tracked (broadcast): Redis keeps no table of the keys
    each process read, which would grow with every key read and outlive the processes that read
    them (redis/redis#9231), and the near cache still answers every entry it holds."""
    assert await read_twice(store, recorder, 200) == 200

    stats = await outside.info("stats")
    assert stats["tracking_total_items"] == 0
    assert stats["tracking_total_keys"] == 0
    assert stats["tracking_total_prefixes"] == 1


async def test_a_tracking_table_smaller_than_the_working_set_costs_the_near_cache_nothing(
    store: RedisStore, recorder: Recorder, outside: Redis
) -> None:
    """``tracking-table-max-keys`` below the keys read: Redis would evict tracked keys by
    announcing them (the generations every entry depends on among them); with nothing tracked
    per key, nothing is evicted and nothing announced."""
    await outside.config_set("tracking-table-max-keys", 10)
    # The scope's first fill re-arms its new generations' life, a change Redis announces once.
    assert await read_twice(store, recorder, 1) == 1
    await eventually(lambda: _true(recorder.messages == 1), "the re-arming announced")

    assert await read_twice(store, recorder, 200) == 200
    assert recorder.messages == 1


async def test_its_bounds_are_its_own_settings_not_the_memory_backends(
    own_redis: RedisServer, recorder: Recorder
) -> None:
    settings = CacheSettings(
        REDIS_URL=own_redis.url,
        CACHE_PREFIX=PREFIX,
        CACHE_MEMORY_MAX_ENTRIES=10,
        CACHE_MEMORY_MAX_BYTES=1024,
        CACHE_NEAR_CACHE_MAX_ENTRIES=500,
        CACHE_NEAR_CACHE_MAX_BYTES=1 << 20,
    )
    store = factory.redis_store(settings, serving=recorder)
    keys = [f"{KEY}/{n}" for n in range(100)]
    try:
        await store.ping()
        near = near_of(store)
        await eventually(lambda: _true(near.live), "tracking on")
        generation = await store.generation(SCOPE)
        for key in keys:
            assert await store.write(key, b"x" * 2_000, 60, SCOPE, generation)
            await store.read(key, SCOPE)  # kept

        reads = [await store.read(key, SCOPE) for key in keys]
        entries, counted = store.near_cache_held()
        bytes_held = near.bytes_held
    finally:
        await store.aclose()

    assert all(read.from_memory for read in reads)
    # What an operator reads in cache_status(): every entry, each counted as more than its value.
    assert entries == len(keys)
    assert len(keys) * 2_000 < counted == bytes_held <= 1 << 20


async def test_held_entries_are_not_walked_by_the_garbage_collector(
    store: RedisStore, recorder: Recorder
) -> None:
    # A full collection walks every object the collector tracks: held entries that were tracked
    # made each one take 100-230 ms with a hundred thousand of them. Requests read with keys
    # that know their scope (objects themselves); what is held must not keep them.
    generation = await store.generation(SCOPE)
    keys = [f"{KEY}/{n}" for n in range(500)]
    for key in keys:
        assert await store.write(key, b"x" * 100, 60, SCOPE, generation)
    gc.collect()
    tracked_before = len(gc.get_objects())

    for key in keys:
        await store.read(ScopedKey(key, SCOPE), SCOPE)
    gc.collect()

    assert len(near_of(store)) >= 500
    assert len(gc.get_objects()) - tracked_before < len(keys) // 4  # not one per entry
