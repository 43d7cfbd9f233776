"""Waiting in tests for state another task or process produces, with a bound."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def until(done: Callable[[], bool | Awaitable[bool]], seconds: float, pause: float = 0.05) -> None:
    """Polls `done` until it holds; fails the test (TimeoutError) after `seconds`."""
    async with asyncio.timeout(seconds):
        while True:
            result = done()
            if await result if isinstance(result, Awaitable) else result:
                return
            await asyncio.sleep(pause)
