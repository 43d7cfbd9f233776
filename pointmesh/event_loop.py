"""The event loop every service process runs on, chosen by one setting.

uvloop (libuv underneath) runs the same asyncio code with less interpreter time per callback
and per socket read; the services spend much of their time there (gRPC calls, Redis replies,
many small tasks), and the ledger did the same purchases with 11% less CPU (docs/benchmarks.md).
The standard loop stays one setting away (`POINTMESH_EVENT_LOOP=asyncio`): for a platform
without uvloop's wheels, and to rule the loop out when a problem is being chased. The tests follow the same setting, in-process services
included (tests/conftest.py), so `POINTMESH_EVENT_LOOP=asyncio make test` runs the suite on
Python's own loop; tests/plumbing/test_event_loop.py and the gateway's abort test run on both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
LOOPS = ("uvloop", "asyncio")


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """None is asyncio's own loop."""
    if kind not in LOOPS:
        raise ValueError(f"event loop {kind!r}: expected one of {', '.join(LOOPS)}")
    if kind == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise ValueError("event loop 'uvloop' is not installed here: choose 'asyncio'") from None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], kind: str) -> T:
    """`asyncio.run` on the chosen loop (same shutdown: pending tasks cancelled, generators and
    the default executor closed)."""
    try:
        factory = loop_factory(kind)
    except ValueError:
        main.close()  # never to run: closed, not left to warn that it was never awaited
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
