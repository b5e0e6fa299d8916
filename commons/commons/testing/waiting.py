"""Waiting in tests for what takes milliseconds: a message, a reconnection, a session."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

__all__ = ["PATIENCE_SECONDS", "eventually"]

#: How long a test waits for something that takes milliseconds.
PATIENCE_SECONDS = 5.0


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, patience: float = PATIENCE_SECONDS
) -> None:
    """Waits until ``check()`` holds, for at most ``patience`` seconds (else fails, naming
    ``what``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {patience} s: {what}")
        await asyncio.sleep(0.01)
