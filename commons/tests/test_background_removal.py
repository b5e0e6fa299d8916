"""Removals of invalidated entries after their invalidations returned: bounded, observable, and
never in the way of a shutdown. Plain coroutines stand for the store's removals (no Redis)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from commons.cache.background_removal import BackgroundRemovals


class Removals:
    """A :class:`BackgroundRemovals` whose reports are recorded, and removals the test releases."""

    def __init__(self, *, max_running: int = 1, max_waiting: int = 10) -> None:
        self.removed: list[tuple[str, int]] = []
        self.pending: list[int] = []
        self.running = 0
        self.most_running = 0
        self.release = asyncio.Event()
        self.runner = BackgroundRemovals(
            on_removed=lambda namespace, n: self.removed.append((namespace, n)),
            on_pending=self.pending.append,
            max_running=max_running,
            max_waiting=max_waiting,
        )

    async def removal(self, entries: int = 1) -> int:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return entries

    def start(self, target: str, entries: int = 1) -> None:
        self.runner.start(target, "ns", lambda: self.removal(entries))


async def test_removals_run_a_few_at_a_time_and_report_what_they_removed() -> None:
    removals = Removals(max_running=2)
    for n in range(5):
        removals.start(f"target-{n}", entries=n)
    await asyncio.sleep(0.01)

    assert removals.running == 2
    assert removals.runner.pending == 5
    removals.release.set()
    await removals.runner.wait()

    assert removals.most_running == 2
    assert sorted(n for _, n in removals.removed) == [0, 1, 2, 3, 4]
    assert removals.runner.pending == 0
    assert removals.pending[-1] == 0


async def test_the_same_target_waiting_twice_is_removed_once() -> None:
    removals = Removals()
    removals.start("running")
    removals.start("waiting")
    removals.start("waiting")
    removals.release.set()
    await removals.runner.wait()

    assert len(removals.removed) == 2


async def test_past_the_waiting_bound_a_removal_is_given_up_counted_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    removals = Removals(max_waiting=2)
    with caplog.at_level(logging.WARNING, logger="commons.cache"):
        for n in range(5):
            removals.start(f"target-{n}")

    # One runs, two wait, two are given up (their entries expire by themselves).
    assert removals.runner.pending == 3
    assert removals.runner.given_up == 2
    assert [r.getMessage() for r in caplog.records].count(
        "removal of invalidated entries given up: 2 removals were waiting (the invalidation "
        "holds; its entries are left to expire)"
    ) == 1
    removals.release.set()
    await removals.runner.wait()
    assert len(removals.removed) == 3


async def test_closing_cancels_what_runs_and_drops_what_waits() -> None:
    removals = Removals()
    removals.start("running")
    removals.start("waiting")
    await asyncio.sleep(0.01)

    await asyncio.wait_for(removals.runner.aclose(), 2)

    assert removals.running == 0
    assert removals.removed == []
    assert removals.runner.pending == 0
    removals.start("after closing")
    assert removals.runner.pending == 0


async def test_a_failing_removal_is_logged_and_the_next_one_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    removals = Removals()

    async def failing() -> int:
        raise RuntimeError("the store broke")

    removals.runner.start("failing", "ns", failing)
    removals.start("next", entries=3)
    removals.release.set()
    with caplog.at_level(logging.ERROR, logger="commons.cache"):
        await removals.runner.wait()

    assert removals.removed == [("ns", 3)]
    assert "left to expire" in caplog.text


async def test_closing_stops_a_removal_that_swallowed_one_cancellation() -> None:
    # redis-py can swallow a cancellation that lands inside a command (it reconnects and goes
    # on): a removal of many pages then ran to its end after the close returned, through a client
    # that reconnected on its own.
    pages: list[int] = []

    async def stubborn_removal() -> int:
        swallowed = False
        while True:
            try:
                await asyncio.sleep(0.005)  # one page
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True
            pages.append(1)

    runner = BackgroundRemovals(on_removed=lambda *_: None, on_pending=lambda _: None)
    runner.start("target", "ns", stubborn_removal)
    await asyncio.sleep(0.02)

    await asyncio.wait_for(runner.aclose(), timeout=0.5)
    after_close = len(pages)
    await asyncio.sleep(0.05)

    assert runner.pending == 0
    assert len(pages) == after_close
