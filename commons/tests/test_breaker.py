"""The breaker's state machine, which needs no server: how each kind of failure is judged, and what
every store call the layer makes goes through (timed, absorbed, counted, judged).

The shared store is a Redis store nobody connects to (nothing is sent until it is used): the calls
judged here are the test's own, failing with the errors a store raises.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from commons.cache.backends.base import StoredRead
from commons.cache.backends.factory import memory_store, redis_store
from commons.cache.breaker import FAILED, Breaker
from commons.cache.errors import (
    BackendBusyError,
    BackendError,
    BackendRejectedError,
    BackendUnavailableError,
)
from commons.cache.events import CacheEvents
from commons.cache.settings import CacheSettings
from commons.cache.status import CacheState
from commons.testing.redis_server import free_port


class Counted(CacheEvents):
    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []
        self.timings: list[str] = []
        self.states: list[str] = []

    def backend_error(self, namespace: str, operation: str) -> None:
        self.errors.append((namespace, operation))

    def timed(self, namespace: str, operation: str, seconds: float) -> None:
        self.timings.append(operation)

    def state_changed(self, state: str) -> None:
        self.states.append(state)


@pytest.fixture
def events() -> Counted:
    return Counted()


@pytest.fixture
def breaker(make_settings: Callable[..., CacheSettings], events: Counted) -> Breaker:
    """A closed breaker (serving from Redis), which opens after three outages in a row."""
    settings = make_settings(f"redis://127.0.0.1:{free_port()}/0", CACHE_FAILURE_THRESHOLD=3)
    breaker = Breaker(settings, events, redis=redis_store(settings), memory=memory_store(settings))
    breaker.transition(CacheState.REDIS, "connected")
    return breaker


async def failing(error: BackendError) -> None:
    raise error


async def answering(value: object) -> object:
    return value


async def outage(breaker: Breaker, reason: str = "refused") -> None:
    """One call to Redis that found it unreachable."""
    call = failing(BackendUnavailableError(reason))
    await breaker.attempt(breaker.active, call, namespace="", operation="get")


async def test_a_successful_call_returns_its_result_and_is_timed(
    breaker: Breaker, events: Counted
) -> None:
    result = await breaker.attempt(
        breaker.active, answering(7), namespace="n", operation="set", timed=True
    )

    assert result == 7
    assert events.timings == ["set"]
    assert events.errors == []


async def test_a_near_cache_hit_is_no_redis_operation_and_is_not_timed(
    breaker: Breaker, events: Counted
) -> None:
    read = StoredRead(10, b"v", b"1", from_memory=True)

    result = await breaker.attempt(
        breaker.active, answering(read), namespace="n", operation="get", timed=True
    )

    assert result == read
    assert events.timings == []


async def test_a_failed_call_is_absorbed_counted_and_timed(
    breaker: Breaker, events: Counted
) -> None:
    result = await breaker.attempt(
        breaker.active,
        failing(BackendUnavailableError("refused")),
        namespace="n",
        operation="get",
        timed=True,
    )

    assert result is FAILED
    assert events.errors == [("n", "get")]
    assert events.timings == ["get"]


async def test_the_breaker_opens_after_the_threshold_of_outages_in_a_row(
    breaker: Breaker, events: Counted
) -> None:
    redis = breaker.active
    for _ in range(2):
        await outage(breaker)
    assert breaker.state is CacheState.REDIS

    await outage(breaker, "timed out")

    assert breaker.state is CacheState.DEGRADED
    assert breaker.active is not redis
    assert breaker.reason == "timed out"
    assert events.states[-1] == "degraded"


async def test_a_success_between_outages_starts_the_count_again(breaker: Breaker) -> None:
    redis = breaker.active
    for _ in range(2):
        await outage(breaker)
    await breaker.attempt(redis, answering(None), namespace="", operation="get")
    for _ in range(2):
        await outage(breaker)

    assert breaker.state is CacheState.REDIS


async def test_a_busy_pool_is_a_miss_not_an_outage(breaker: Breaker, events: Counted) -> None:
    for _ in range(5):
        await breaker.attempt(
            breaker.active, failing(BackendBusyError("pool")), namespace="", operation="get"
        )

    assert breaker.state is CacheState.REDIS
    assert len(events.errors) == 5


async def test_a_refusal_keeps_redis_says_so_until_the_operation_succeeds_again(
    breaker: Breaker,
) -> None:
    redis = breaker.active
    for _ in range(5):
        await breaker.attempt(
            redis, failing(BackendRejectedError("OOM")), namespace="", operation="set"
        )
    assert breaker.state is CacheState.REDIS
    assert breaker.reason == "Redis refuses writes: OOM"

    await breaker.attempt(redis, answering(True), namespace="", operation="get")
    assert breaker.reason == "Redis refuses writes: OOM"  # reads never said writes work

    await breaker.attempt(redis, answering(True), namespace="", operation="set")
    assert breaker.reason == "Redis accepts writes again"


def test_degrade_opens_the_breaker_whatever_the_count(breaker: Breaker) -> None:
    breaker.degrade("an invalidation could not reach Redis")

    assert breaker.state is CacheState.DEGRADED
    assert breaker.reason == "an invalidation could not reach Redis"


@pytest.mark.parametrize(
    ("redis_url", "overrides", "state"),
    [
        (None, {}, CacheState.MEMORY),
        (None, {"CACHE_ENABLED": False}, CacheState.DISABLED),
        ("redis://127.0.0.1:1/0", {}, CacheState.DEGRADED),
    ],
)
def test_the_state_before_start_follows_the_settings(
    make_settings: Callable[..., CacheSettings],
    redis_url: str | None,
    overrides: dict[str, object],
    state: CacheState,
) -> None:
    settings = make_settings(redis_url, **overrides)
    redis = redis_store(settings) if redis_url else None

    breaker = Breaker(settings, CacheEvents(), redis=redis, memory=memory_store(settings))

    assert breaker.state is state
    assert breaker.enabled is (state is not CacheState.DISABLED)
