"""A cancel is never lost: Python 3.11's asyncio.wait_for dropped one that came in the instant
what it waited for finished, and redis-py waits that way on every command's send, so a bus tail
cancelled just after an event reached it read on for good (CI hung at 81%)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from pointmesh.events import OutgoingEvent, RedisStreamBus, bus_redis
from pointmesh.redis_server import RedisServer
from tests.waiting import until


async def test_a_cancel_in_the_instant_the_awaited_work_finishes_is_kept() -> None:
    reached_after = False

    async def quick() -> int:
        return 7

    async def caller() -> None:
        nonlocal reached_after
        await asyncio.wait_for(quick(), 5)
        await asyncio.sleep(0)
        reached_after = True
        await asyncio.sleep(30)

    task = asyncio.create_task(caller())
    await asyncio.sleep(0)  # caller is inside wait_for; 3.11's own has just started quick() as a task
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2)
    assert done and task.cancelled()
    assert not reached_after


async def test_wait_for_times_out_cancelling_what_it_waited_for() -> None:
    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            cancelled.set()

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(slow(), 0.05)
    assert cancelled.is_set()
    assert await asyncio.wait_for(asyncio.sleep(0, "in time"), 1) == "in time"
    assert await asyncio.wait_for(asyncio.sleep(0, "no limit"), None) == "no limit"


async def test_a_zero_timeout_runs_nothing_and_gives_only_a_finished_result() -> None:
    ran = False

    async def work() -> None:
        nonlocal ran
        ran = True

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(work(), 0)
    assert not ran
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    done.set_result("ready")
    assert await asyncio.wait_for(done, 0) == "ready"


async def test_a_bus_tail_cancelled_as_an_event_reaches_it_stops(redis_server: RedisServer) -> None:
    """Each tail asks for its own cancel as it takes the event, so the cancel lands while the
    tail sends its next read: the moment 3.11's wait_for lost it."""
    client = bus_redis(SimpleNamespace(redis_url=redis_server.url, redis_timeout_seconds=0.5))
    bus = RedisStreamBus(client)
    topic, tails = f"cancel-{time.time_ns()}", 16
    got = [0] * tails
    loop = asyncio.get_running_loop()

    async def tail(k: int) -> None:
        async for _ in bus.subscribe(topic, "0"):
            got[k] += 1
            loop.call_soon(readers[k].cancel)

    readers = [asyncio.create_task(tail(k)) for k in range(tails)]
    try:
        await asyncio.sleep(0.3)  # every tail blocked in Redis
        await bus.publish(topic, [OutgoingEvent(key="m1", event_id="e1", event_type="t", payload=b"x")])
        await until(lambda: min(got) >= 1, 10)
        done, running = await asyncio.wait(readers, timeout=3)
        assert not running, f"{len(running)} of {tails} cancelled tails still reading"
        assert all(r.cancelled() for r in done)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.wait(readers, timeout=5)
        await client.aclose()
