"""Pipelined reads: every GET gets its own reply, whatever happens to the connection."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import hiredis
import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.sentinel import SentinelConnectionPool

from commons.cache.backends.redis import RedisStore, pipelined_reads, read_channel
from commons.cache.backends.redis.pipelined_reads import (
    PipelinedReader,
    ReadChannel,
    channel_opener,
    encode_command,
)
from commons.cache.backends.redis.translation import translate
from commons.cache.scope import CacheScope
from commons.testing.proxy import LoopbackProxy
from commons.testing.redis_server import RedisServer

MakeReader = Callable[..., Awaitable[PipelinedReader]]


@pytest.fixture
async def make_reader() -> AsyncIterator[MakeReader]:
    """``await make_reader(url, reply_timeout=2.0, max_pending=10_000)``: closed afterwards."""
    made: list[tuple[PipelinedReader, Redis]] = []

    async def make(
        url: str, *, reply_timeout: float = 2.0, max_pending: int = 10_000
    ) -> PipelinedReader:
        client = Redis.from_url(url, socket_connect_timeout=1.0)
        opener = channel_opener(client)
        assert opener is not None
        reader = PipelinedReader(opener, timeout=reply_timeout, max_pending=max_pending)
        made.append((reader, client))
        return reader

    yield make
    for reader, client in made:
        await reader.aclose()
        await client.aclose()


def connected_clients(server: RedisServer) -> int:
    reply = server.command("INFO", "clients").decode()
    line = next(line for line in reply.splitlines() if line.startswith("connected_clients:"))
    return int(line.split(":", 1)[1])


async def test_concurrent_gets_each_receive_the_value_of_their_own_key(
    redis_url: str, make_reader: MakeReader
) -> None:
    rng = random.Random(7)
    values = {
        f"k{n}": rng.randbytes(rng.choice([0, 1, 90, 1_500, 20_000, 200_000])) for n in range(150)
    }
    writer = Redis.from_url(redis_url)
    try:
        await writer.mset(values)
    finally:
        await writer.aclose()
    reader = await make_reader(redis_url)
    wanted = [rng.choice([*values, "missing-a", "missing-b"]) for _ in range(3_000)]

    replies = await asyncio.gather(*(reader.get(key) for key in wanted))

    assert replies == [values.get(key) for key in wanted]


async def test_a_burst_of_reads_shares_one_connection(
    redis_server: RedisServer, redis_url: str, make_reader: MakeReader
) -> None:
    reader = await make_reader(redis_url)
    await reader.get("warm-up")
    before = connected_clients(redis_server)

    await asyncio.gather(*(reader.get(f"key{n}") for n in range(500)))

    assert connected_clients(redis_server) == before


async def test_a_store_serves_a_burst_of_hits_on_one_connection(
    redis_server: RedisServer, redis_url: str
) -> None:
    store = RedisStore(Redis.from_url(redis_url), "burst")
    try:
        await store.set("burst:ns:k", b"body", 60, CacheScope("ns", "t"))
        await store.get_with_ttl("burst:ns:k")
        before = connected_clients(redis_server)

        hits = await asyncio.gather(*(store.get_with_ttl("burst:ns:k") for _ in range(300)))

        assert {value for _, value in hits} == {b"body"}
        assert connected_clients(redis_server) == before
    finally:
        await store.aclose()


async def test_a_caller_that_gives_up_does_not_shift_the_others_replies(
    redis_url: str, make_reader: MakeReader
) -> None:
    writer = Redis.from_url(redis_url)
    try:
        await writer.mset({f"k{n}": f"v{n}" for n in range(200)})
    finally:
        await writer.aclose()
    reader = await make_reader(redis_url)
    tasks = [asyncio.ensure_future(reader.get(f"k{n}")) for n in range(200)]
    await asyncio.sleep(0)  # every GET is queued
    for task in tasks[::2]:
        task.cancel()

    results = await asyncio.gather(*tasks, return_exceptions=True)

    for n, result in enumerate(results):
        if n % 2 == 0:
            assert isinstance(result, asyncio.CancelledError)
        else:
            assert result == f"v{n}".encode()
    assert await reader.get("k7") == b"v7"


async def test_a_silent_server_fails_the_waiting_reads_after_the_timeout_and_nothing_after(
    own_redis: RedisServer, make_reader: MakeReader
) -> None:
    own_redis.command("SET", "k", "before")
    reader = await make_reader(own_redis.url, reply_timeout=0.3)
    assert await reader.get("k") == b"before"

    own_redis.pause()
    try:
        started = time.monotonic()
        results = await asyncio.gather(
            *(reader.get("k") for _ in range(20)), return_exceptions=True
        )
        waited = time.monotonic() - started
    finally:
        own_redis.resume()

    assert all(isinstance(result, redis_errors.TimeoutError) for result in results)
    assert 0.25 <= waited <= 1.0
    # The late replies went to the abandoned connection; new reads see the server's answers.
    own_redis.command("SET", "k", "after")
    assert await reader.get("k") == b"after"
    assert await reader.get("absent") is None


async def test_a_restarted_server_is_reconnected_to_without_failing_a_read(
    own_redis: RedisServer, make_reader: MakeReader
) -> None:
    own_redis.command("SET", "k", "v")
    reader = await make_reader(own_redis.url)
    assert await reader.get("k") == b"v"

    own_redis.kill()
    own_redis.start()

    assert await reader.get("k") is None  # the restarted server keeps nothing
    own_redis.command("SET", "k", "v2")
    assert await reader.get("k") == b"v2"


async def test_an_unreachable_server_fails_the_read_within_the_connect_timeout(
    own_redis: RedisServer, make_reader: MakeReader
) -> None:
    reader = await make_reader(own_redis.url)
    await reader.get("k")
    own_redis.kill()

    started = time.monotonic()
    with pytest.raises(redis_errors.ConnectionError):
        await reader.get("k")
    assert time.monotonic() - started <= 2.5


async def test_reads_past_the_bound_are_refused_at_once_while_others_wait(
    own_redis: RedisServer, make_reader: MakeReader
) -> None:
    reader = await make_reader(own_redis.url, reply_timeout=0.5, max_pending=5)
    await reader.get("k")
    own_redis.pause()
    try:
        waiting = [asyncio.ensure_future(reader.get("k")) for _ in range(5)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(redis_errors.MaxConnectionsError):
            await reader.get("k")
        assert time.monotonic() - started < 0.2  # the waiting ones take 0.5 s
        await asyncio.gather(*waiting, return_exceptions=True)
    finally:
        own_redis.resume()


async def test_an_error_reply_belongs_to_its_read_and_the_connection_stays(
    redis_server: RedisServer, redis_url: str, make_reader: MakeReader
) -> None:
    redis_server.command("ACL", "SETUSER", "narrow", "on", ">secret", "~allowed:*", "+get")
    redis_server.command("SET", "allowed:k", "yes")
    redis_server.command("SET", "secret:k", "no")
    try:
        url = redis_url.replace("redis://", "redis://narrow:secret@")
        reader = await make_reader(url)

        allowed, refused, again = await asyncio.gather(
            reader.get("allowed:k"),
            reader.get("secret:k"),
            reader.get("allowed:k"),
            return_exceptions=True,
        )

        assert (allowed, again) == (b"yes", b"yes")
        assert isinstance(refused, redis_errors.NoPermissionError)
        assert await reader.get("allowed:k") == b"yes"
    finally:
        redis_server.command("ACL", "DELUSER", "narrow")


async def test_reads_use_the_database_the_url_names(
    redis_server: RedisServer, redis_url: str, make_reader: MakeReader
) -> None:
    other_db = Redis.from_url(redis_url.rsplit("/", 1)[0] + "/3")
    try:
        await other_db.set("k", "in db 3")
        reader = await make_reader(redis_url.rsplit("/", 1)[0] + "/3")
        assert await reader.get("k") == b"in db 3"
    finally:
        await other_db.flushdb()
        await other_db.aclose()


async def test_a_closed_reader_fails_its_waiting_reads_and_refuses_new_ones(
    own_redis: RedisServer, make_reader: MakeReader
) -> None:
    reader = await make_reader(own_redis.url)
    await reader.get("k")
    own_redis.pause()
    try:
        waiting = asyncio.ensure_future(reader.get("k"))
        await asyncio.sleep(0.05)
        await reader.aclose()
        with pytest.raises(redis_errors.ConnectionError):
            await waiting
        with pytest.raises(redis_errors.ConnectionError):
            await reader.get("k")
    finally:
        own_redis.resume()


def test_a_reader_used_from_another_event_loop_opens_a_connection_there(
    redis_server: RedisServer, redis_url: str
) -> None:
    redis_server.command("SET", "k", "v")
    opener = channel_opener(Redis.from_url(redis_url))
    assert opener is not None
    reader = PipelinedReader(opener, timeout=2.0, max_pending=100)

    async def read_then_close() -> bytes | None:
        try:
            return await reader.get("k")
        finally:
            await reader.aclose()

    first_loop = asyncio.new_event_loop()
    try:
        assert first_loop.run_until_complete(reader.get("k")) == b"v"
        assert asyncio.run(read_then_close()) == b"v"
    finally:
        # The first loop closes the connection it was left with once it runs again.
        first_loop.run_until_complete(asyncio.sleep(0))
        first_loop.close()


def test_a_pool_that_picks_its_server_per_connection_keeps_redis_pys_own_reads() -> None:
    sentinel_pool = SentinelConnectionPool("primary", sentinel_manager=None)
    assert channel_opener(Redis(connection_pool=sentinel_pool)) is None
    assert channel_opener(Redis.from_url("redis://127.0.0.1:1/0")) is not None


async def test_a_read_on_a_connection_dropped_right_after_opening_fails_in_bounded_time(
    redis_url: str,
) -> None:
    """The connection breaks between the handshake and the first read: the read fails (a miss
    for the layer) within its timeout instead of waiting forever."""
    client = Redis.from_url(redis_url, socket_connect_timeout=1.0)
    opener = channel_opener(client)
    assert opener is not None
    opened = 0

    async def open_then_drop() -> ReadChannel:
        nonlocal opened
        opened += 1
        channel = await opener()
        channel.transport.abort()  # lost just after the handshake, before any read is sent
        return channel

    reader = PipelinedReader(open_then_drop, timeout=0.5, max_pending=100)
    try:
        started = time.perf_counter()
        outcomes = await asyncio.wait_for(
            asyncio.gather(reader.get("k"), reader.mget(["k", "j"]), return_exceptions=True), 5
        )
        elapsed = time.perf_counter() - started
    finally:
        await reader.aclose()
        await client.aclose()

    assert all(isinstance(outcome, redis_errors.ConnectionError) for outcome in outcomes)
    assert elapsed < 1.0
    assert opened == 2  # the first attempt, then the one retry on a new connection


async def test_an_mget_gets_the_values_of_its_own_keys_in_order_among_concurrent_reads(
    redis_url: str, make_reader: MakeReader
) -> None:
    rng = random.Random(11)
    values = {f"m{n}": rng.randbytes(rng.choice([0, 5, 3_000])) for n in range(40)}
    writer = Redis.from_url(redis_url)
    try:
        await writer.mset(values)
    finally:
        await writer.aclose()
    reader = await make_reader(redis_url)
    batches = [
        [rng.choice([*values, "absent"]) for _ in range(rng.randint(1, 6))] for _ in range(500)
    ]

    replies = await asyncio.gather(
        *(reader.mget(batch) if n % 2 else reader.get(batch[0]) for n, batch in enumerate(batches))
    )

    for n, (batch, reply) in enumerate(zip(batches, replies, strict=True)):
        expected = [values.get(key) for key in batch]
        assert reply == (expected if n % 2 else expected[0])


async def test_an_mget_with_ttl_gets_the_values_and_the_first_keys_time_to_live(
    redis_url: str, make_reader: MakeReader
) -> None:
    writer = Redis.from_url(redis_url)
    try:
        await writer.set("lives", b"v", px=60_000)
        await writer.set("forever", b"w")
    finally:
        await writer.aclose()
    reader = await make_reader(redis_url)

    def read(keys: list[str]) -> Awaitable[tuple[list[bytes | None], int, int | None]]:
        return reader.mget_with_ttl(encode_command(b"MGET", keys), len(keys), pttl(keys[0]))

    lives, forever, absent, plain = await asyncio.gather(
        read(["lives", "forever"]), read(["forever"]), read(["absent"]), reader.get("lives")
    )

    assert lives[0] == [b"v", b"w"]
    assert 59_000 < lives[1] <= 60_000
    assert forever[:2] == ([b"w"], -1)
    assert absent[:2] == ([None], -2)
    assert plain == b"v"


def pttl(key: str) -> bytes:
    return encode_command(b"PTTL", [key])


async def test_a_hit_whose_expiry_the_store_never_saw_costs_one_round_trip(
    redis_server: RedisServer,
) -> None:
    # Another replica filled the entry: this store remembers no expiry for it, as past its expiry
    # memo's bound. A link that delays every reply shows how many round trips the hit took.
    scope = CacheScope("ns", "t")
    writer = RedisStore(Redis.from_url(redis_server.url), "trips")
    with LoopbackProxy(redis_server.port) as proxy:
        store = RedisStore(Redis.from_url(proxy.url), "trips")
        try:
            await writer.set("trips:ns:k", b"body", 60, scope)
            await store.get_with_ttl("trips:ns:other")  # connections opened before the delay
            proxy.delay_replies(0.3)
            started = time.perf_counter()

            ttl, value = await store.get_with_ttl("trips:ns:k")

            elapsed = time.perf_counter() - started
        finally:
            await store.aclose()
            await writer.aclose()

    assert elapsed < 0.55  # one delayed reply (0.3 s), not two
    assert value == b"body"
    assert ttl in (59, 60)


@pytest.mark.parametrize("with_hiredis_encoder", [True, False], ids=["hiredis", "python"])
def test_a_command_is_encoded_the_same_by_hiredis_and_without_it(
    with_hiredis_encoder: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not with_hiredis_encoder:
        monkeypatch.setattr(read_channel, "_pack_command", None)
    elif read_channel._pack_command is None:
        pytest.skip("this hiredis has no encoder of its own")

    command = encode_command(
        b"MGET", ["k:1", "é", 2, -3, b"\x00"], encoded_after=b"$1\r\ng\r\n", count_after=1
    )

    assert command == (
        b"*7\r\n$4\r\nMGET\r\n$3\r\nk:1\r\n$2\r\n\xc3\xa9\r\n$1\r\n2\r\n$2\r\n-3\r\n"
        b"$1\r\n\x00\r\n$1\r\ng\r\n"
    )
    assert encode_command(b"PTTL", ["k:1"]) == b"*2\r\n$4\r\nPTTL\r\n$3\r\nk:1\r\n"
    assert encode_command(b"X", [True]) == b"*2\r\n$1\r\nX\r\n$1\r\n1\r\n"


@pytest.mark.parametrize(
    ("reply", "said"),
    [
        ("OOM command not allowed when used memory > 'maxmemory'.", "OOM, used memory"),
        ("READONLY You can't write against a read only replica.", "READONLY, the server"),
        ("MASTERDOWN Link with MASTER is down", "MASTERDOWN, the link"),
        ("NOPERM this user has no permissions to run the 'evalsha' command", "may not run EVALSHA"),
    ],
)
def test_an_error_reply_on_the_pipelined_connection_is_named_as_redis_py_names_it(
    reply: str, said: str
) -> None:
    # A fill's script on a full Redis said "refused the command (ResponseError)": the reason
    # an operator reads must name the refusal, whichever connection met it.
    error = pipelined_reads._error_reply(hiredis.ReplyError(reply))

    assert said in str(translate(error))
