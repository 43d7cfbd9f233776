"""An asyncio.wait_for that never loses a cancel, installed over Python 3.11's own.

Python 3.11's wait_for runs what it waits for in a task of its own. Cancelled in the instant
that task finishes, it hands back the result and drops the cancel (CPython gh-86296; 3.12
rewrote wait_for on asyncio.timeout). redis-py wraps the send of every command in wait_for when
the client has a socket timeout, and every pointmesh client has one. So a task cancelled just
as it sent a command went on running as if nothing had happened: 128 bus tails cancelled right
after an event reached them all went on reading for good, and CI hung at 81% waiting for them.
A service stops its event followers and background loops the same way, and would have waited on
them for ever.

On 3.11, importing pointmesh replaces `asyncio.wait_for` with `wait_for` below. Like 3.12's, it
awaits in the caller's own task under asyncio.timeout, where a cancel can only arrive as the
CancelledError it is. It also spares a task per Redis command.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:  # noqa: ASYNC109 (asyncio.wait_for's own signature)
    """`aw`'s result, or TimeoutError after `timeout` seconds (None: no limit), with `aw`
    cancelled. A timeout of zero or less lets nothing run: only an already finished future
    gives its result."""
    if timeout is not None and timeout <= 0:
        fut = asyncio.ensure_future(aw)
        if fut.done():
            return fut.result()
        fut.cancel()
        await asyncio.wait([fut])
        if fut.cancelled():
            raise TimeoutError
        return fut.result()  # it finished (or failed) rather than be cancelled
    async with asyncio.timeout(timeout):
        return await aw


def install() -> None:
    """Put `wait_for` in asyncio's place where the running Python's own can lose a cancel.
    Callers that look `asyncio.wait_for` up when they call it (redis-py, pointmesh) get it."""
    if sys.version_info < (3, 12):
        asyncio.wait_for = wait_for  # type: ignore[assignment]
