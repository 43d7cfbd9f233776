"""An asyncio.wait_for that does not lose a cancel, installed over Python 3.11's own.

Python 3.11's wait_for runs what it waits for in a task of its own. Cancelled in the instant
that task finishes, it hands back the result and drops the cancel (CPython gh-86296; 3.12
rewrote wait_for on asyncio.timeout). redis-py wraps the send of every command in wait_for when
the client has a socket timeout, and every pointmesh client has one. So a task cancelled just
as it sent a command went on running as if nothing had happened: 128 bus tails cancelled right
after an event reached them all went on reading for good, and CI hung at 81% waiting for them.
A service stops its event followers and background loops the same way, and would have waited on
them for ever.

On 3.11, importing pointmesh replaces `asyncio.wait_for` with `wait_for` below. Like 3.12's, it
awaits in the caller's own task under asyncio.timeout, where a cancel arrives as the
CancelledError it is (code awaited that suppresses CancelledError still swallows it, as on
3.12). It also spares a task per Redis command. docs/decisions/0009-cancel-safe-wait-for.md.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_for(fut: Awaitable[T], timeout: float | None) -> T:  # noqa: ASYNC109 (asyncio.wait_for's own signature)
    """`fut`'s result, or TimeoutError after `timeout` seconds (None: no limit), with `fut`
    cancelled. A timeout of zero or less cancels `fut` at once unless it has finished."""
    if timeout is not None and timeout <= 0:
        task = asyncio.ensure_future(fut)
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
        try:
            return task.result()  # finished, failed, or let the cancel pass
        except asyncio.CancelledError as exc:
            raise TimeoutError from exc
    async with asyncio.timeout(timeout):
        return await fut


def install() -> None:
    """Put `wait_for` in asyncio's place where the running Python's own can lose a cancel.
    Callers that look `asyncio.wait_for` up when they call it (redis-py, pointmesh) get it."""
    if sys.version_info < (3, 12):
        asyncio.wait_for = wait_for  # type: ignore[assignment]
