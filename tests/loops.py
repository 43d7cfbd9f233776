"""Runs a coroutine to completion on a named event loop, for tests that compare the loops."""

from __future__ import annotations

import os
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pointmesh import event_loop
from pointmesh.config import Settings

T = TypeVar("T")


def suite_loop() -> str:
    """The loop the suite's in-process services run on: POINTMESH_EVENT_LOOP, else the default."""
    return os.environ.get("POINTMESH_EVENT_LOOP") or Settings().event_loop


def run_on(kind: str, main: Coroutine[Any, Any, T]) -> T:
    """On a thread of its own: asyncio's runner leaves its thread with no current loop when it
    is done (as `asyncio.run` does), and a sync test that opens a grpc.aio channel on the main
    thread (test_logs builds the gateway's app) gets its loop from there: it failed once these
    runs were on the main thread."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(event_loop.run, main, kind).result()
