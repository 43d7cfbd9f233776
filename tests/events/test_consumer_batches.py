"""A consumer group's batch is all or nothing: a message given up on (poison, or out of
attempts) goes to the dead-letter topic only once its whole batch is through, so a batch read
again after a later message failed does not dead-letter it again (and a redrive send it back
twice); and a consumer whose close fails after a failed batch reopens all the same."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from pointmesh import consumers
from pointmesh.consumers import BatchHandler, Handler, by_key, in_order, run_group
from pointmesh.events import BusMessage, EventBus, RedisGroupConsumer, RedisStreamBus, dead_letter_topic
from pointmesh.redis_server import RedisServer
from tests.events.test_bus_conformance import bus, event, new_topic
from tests.waiting import until

__all__ = ["bus"]
Wrapper = Callable[[EventBus, str, str, Handler], BatchHandler]


async def _read_until(bus: EventBus, topic: str, event_id: str) -> list[BusMessage]:
    """Everything on `topic` up to the message `event_id` (published last, on the same key)."""
    member = bus.group(topic, "counter", "c1")
    got: list[BusMessage] = []
    try:
        async with asyncio.timeout(30):
            while not any(m.event_id == event_id for m in got):
                got += await member.poll(max_messages=50, block_ms=200)
    finally:
        await member.close()
    return got


@pytest.mark.parametrize("wrapper", [in_order, by_key])
async def test_a_poison_message_is_dead_lettered_once_though_a_later_message_of_its_batch_failed_for_a_while(
    bus: EventBus, wrapper: Wrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consumers, "RETRY_PAUSE_SECONDS", 0.05)
    topic = new_topic()
    dlq = dead_letter_topic(topic)
    await bus.ensure_topics([topic, dlq])
    await bus.publish(topic, [event("m_a", 1, schema="pointmesh.v1/2"), event("m_b", 2)])
    outage_left = [3]  # the next service is away for the first three tries of m_b-2
    handled: list[str] = []

    async def handle(message: BusMessage) -> None:
        if outage_left[0] > 0:
            outage_left[0] -= 1
            raise ConnectionError("ledger away")  # transient: retried without limit
        handled.append(message.event_id)

    stop = asyncio.Event()
    runner = asyncio.create_task(
        run_group(bus, topic, "g", "c1", wrapper(bus, topic, "g", handle), stop=stop, block_ms=200)
    )
    await until(lambda: handled == ["m_b-2"], 30)
    stop.set()
    await runner
    await bus.publish(dlq, [event("m_a", 99)])  # a marker after every copy (one key: one partition)

    copies = [m.event_id for m in await _read_until(bus, dlq, "m_a-99") if m.event_id != "m_a-99"]
    assert copies == ["m_a-1"]


class CloseFailsOnce(RedisGroupConsumer):
    """Fault injection: a consumer whose close fails, as one whose broker went away may."""

    closes_failed = 0

    async def close(self) -> None:
        if CloseFailsOnce.closes_failed == 0:
            CloseFailsOnce.closes_failed += 1
            raise ConnectionError("connection lost while leaving the group")


class BusWithFailingClose(RedisStreamBus):
    def group(self, topic: str, group: str, consumer: str) -> RedisGroupConsumer:
        return CloseFailsOnce(self, topic, group, consumer)


async def test_a_consumer_whose_close_fails_after_a_failed_batch_reopens_and_goes_on(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consumers, "RETRY_PAUSE_SECONDS", 0.05)
    made = BusWithFailingClose(Redis.from_url(redis_server.url), owns_client=True)
    topic = new_topic()
    await made.publish(topic, [event("m_a", 1)])
    tries: list[str] = []

    async def handle(message: BusMessage) -> None:
        tries.append(message.event_id)
        if len(tries) == 1:
            raise ConnectionError("ledger away")

    stop = asyncio.Event()
    runner = asyncio.create_task(run_group(made, topic, "g", "c1", in_order(made, topic, "g", handle), stop=stop,
                                           block_ms=200))  # fmt: skip
    try:
        await until(lambda: len(tries) >= 2 or runner.done(), 30)
        assert not runner.done(), f"the consumer task ended: {runner.exception()!r}"
    finally:
        stop.set()
        await asyncio.gather(runner, return_exceptions=True)
        await made.close()
    assert tries == ["m_a-1", "m_a-1"] and CloseFailsOnce.closes_failed == 1
