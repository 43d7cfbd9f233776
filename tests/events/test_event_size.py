"""An event over the bus's size limit: a publish is all or nothing on both buses (Kafka's
producer refused the big record only after queueing, and then sending, the ones before it), the
limit is the same on both, and `pointmesh ingest produce` reports such a line as a bad line."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import Redis

from pointmesh import consumers
from pointmesh.consumers import Poison, in_order, run_group
from pointmesh.events import (
    HEADER_ROOM,
    INGEST_PURCHASES,
    MAX_EVENT_BYTES,
    BusMessage,
    EventBus,
    EventTooLarge,
    RedisStreamBus,
    dead_letter_topic,
    event_bytes,
)
from pointmesh.redis_server import RedisServer
from tests.conftest import pointmesh_cli
from tests.events.test_bus_conformance import bus, drain, event, new_topic
from tests.waiting import until

__all__ = ["bus"]


async def test_a_batch_with_an_event_over_the_limit_is_refused_whole_before_anything_is_sent(bus: EventBus) -> None:
    topic = new_topic()
    await bus.ensure_topics([topic])
    batch = [event("m_a", 1), event("m_a", 2, payload=b"x" * 2_000_000), event("m_a", 3)]
    with pytest.raises(EventTooLarge, match=r"event m_a-2 .* none of its batch of 3 was sent"):
        await bus.publish(topic, batch)
    await bus.publish(topic, [event("m_a", 4)])  # on the same key: it comes after anything sent before
    assert [m.event_id for m in await drain(bus, topic, "reader", "r1", 1)] == ["m_a-4"]


async def test_an_event_of_exactly_the_limit_goes_through_on_either_bus(bus: EventBus) -> None:
    topic = new_topic()
    await bus.ensure_topics([topic])
    small = event("m_a", 1, payload=b"")
    largest = replace(small, payload=b"x" * (MAX_EVENT_BYTES - event_bytes(small)))
    assert event_bytes(largest) == MAX_EVENT_BYTES
    await bus.publish(topic, [largest, event("m_a", 2)])
    got = await drain(bus, topic, "reader", "r1", 2)
    assert [(m.event_id, m.payload) for m in got] == [("m_a-1", largest.payload), ("m_a-2", event("m_a", 2).payload)]


async def test_ingest_produce_reports_a_line_too_large_for_the_bus_and_sends_the_others(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    feed = tmp_path / "purchases.jsonl"
    good = {"member_id": "m_1", "channel": "pos", "store_id": "S1", "receipt_id": "R-1"}
    big = dict(good, receipt_id="R-" + "x" * 1_100_000)
    feed.write_text("\n".join(json.dumps(x) for x in (good, big, dict(good, receipt_id="R-3"))) + "\n")
    env = {"POINTMESH_EVENT_BUS": "kafka", "POINTMESH_KAFKA_BOOTSTRAP": kafka_bootstrap,
           "POINTMESH_DATA_DIR": str(tmp_path)}  # fmt: skip

    done = await asyncio.to_thread(pointmesh_cli, "ingest", "produce", str(feed), env=env, timeout=120)

    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.returncode == 1
    assert f"{feed}:2: too large: " in done.stderr
    assert f"2 purchases on {INGEST_PURCHASES}" in done.stdout and "1 bad lines not sent" in done.stdout


async def _poison_first(bus: EventBus, topic: str) -> list[str]:
    """Runs a group whose handler finds the topic's first message poison until it has handled
    the second; returns the ids it handled, in order."""
    handled: list[str] = []
    first: list[str] = []

    async def handle(message: BusMessage) -> None:
        handled.append(message.event_id)
        if not first or first[0] == message.event_id:
            first[:] = [message.event_id]
            raise Poison("cannot be decoded")

    stop = asyncio.Event()
    task = asyncio.create_task(run_group(bus, topic, "g", "c1", in_order(bus, topic, "g", handle), stop=stop))
    try:
        await until(lambda: len(set(handled)) >= 2, 20)
    finally:
        stop.set()
        await task
    return handled


async def test_a_poison_message_of_the_largest_size_is_dead_lettered_whole_and_its_group_moves_on(
    bus: EventBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy's dlq_* headers used to count against the limit: a message the bus took could
    not be dead-lettered, and its group read it again for ever."""
    monkeypatch.setattr(consumers, "RETRY_PAUSE_SECONDS", 0.05)
    topic = new_topic()
    await bus.ensure_topics([topic, dead_letter_topic(topic)])
    small = event("m_a", 1, payload=b"")
    largest = replace(small, payload=b"x" * (MAX_EVENT_BYTES - event_bytes(small)))
    await bus.publish(topic, [largest, event("m_a", 2)])

    assert await _poison_first(bus, topic) == ["m_a-1", "m_a-2"]
    (dead,) = await drain(bus, dead_letter_topic(topic), "ops", "o1", 1)
    assert (dead.event_id, dead.payload, dict(dead.headers)["dlq_reason"]) == ("m_a-1", largest.payload,
                                                                                "cannot be decoded")  # fmt: skip


async def test_a_foreign_message_over_the_limit_is_dead_lettered_without_its_payload(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis has no cap of its own: a producer of someone else's may write more than our limit.
    Its copy could never be published whole, so it goes without the payload, its size said."""
    monkeypatch.setattr(consumers, "RETRY_PAUSE_SECONDS", 0.05)
    bus = RedisStreamBus(Redis.from_url(redis_server.url), owns_client=True)
    try:
        topic = new_topic()
        await bus.redis.xadd(topic, {"key": "m_a", "event_id": "m_a-1", "type": "ops_alert",
                                     "payload": b"x" * (MAX_EVENT_BYTES + 10), "schema": "pointmesh.v1/1"})  # fmt: skip
        await bus.publish(topic, [event("m_a", 2)])

        assert await _poison_first(bus, topic) == ["m_a-1", "m_a-2"]
        (dead,) = await drain(bus, dead_letter_topic(topic), "ops", "o1", 1)
        assert (dead.event_id, dead.payload) == ("m_a-1", b"")
        assert dict(dead.headers)["dlq_payload_dropped"] == str(MAX_EVENT_BYTES + 10)
    finally:
        await bus.close()


async def test_a_poison_message_with_headers_up_to_the_room_is_dead_lettered_and_its_group_moves_on(
    bus: EventBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bus took the event (headers of exactly HEADER_ROOM bytes); its copy kept them and
    added the dlq_* ones, was refused for its headers, and the group read the poison for ever."""
    monkeypatch.setattr(consumers, "RETRY_PAUSE_SECONDS", 0.05)
    topic = new_topic()
    await bus.ensure_topics([topic, dead_letter_topic(topic)])
    tagged = replace(event("m_a", 1), headers=(("trace", "t" * (HEADER_ROOM - len("trace"))),))
    await bus.publish(topic, [tagged, event("m_a", 2)])

    assert await _poison_first(bus, topic) == ["m_a-1", "m_a-2"]
    (dead,) = await drain(bus, dead_letter_topic(topic), "ops", "o1", 1)
    headers = dict(dead.headers)
    assert (dead.event_id, dead.payload, headers["dlq_reason"]) == ("m_a-1", tagged.payload, "cannot be decoded")
    assert headers["dlq_headers_dropped"] == str(HEADER_ROOM) and "trace" not in headers


async def test_a_foreign_message_with_outsized_headers_and_fields_is_dead_lettered_and_its_group_moves_on(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone else's producer wrote a 20 kB extra field (a header to us) and a key alone over
    the limit: the copy goes without the header and with the key cut, rather than never."""
    monkeypatch.setattr(consumers, "RETRY_PAUSE_SECONDS", 0.05)
    bus = RedisStreamBus(Redis.from_url(redis_server.url), owns_client=True)
    try:
        topic = new_topic()
        await bus.redis.xadd(topic, {"key": "k" * (MAX_EVENT_BYTES + 1), "event_id": "m_a-1", "type": "ops_alert",
                                     "payload": b"x", "schema": "pointmesh.v1/1", "trace": "t" * 20_000})  # fmt: skip
        await bus.publish(topic, [event("m_a", 2)])

        assert await _poison_first(bus, topic) == ["m_a-1", "m_a-2"]
        (dead,) = await drain(bus, dead_letter_topic(topic), "ops", "o1", 1)
        headers = dict(dead.headers)
        assert (dead.event_id, dead.key, dead.payload) == ("m_a-1", "k" * consumers.DLQ_REASON_CHARS, b"")
        assert "trace" not in headers and int(headers["dlq_headers_dropped"]) >= 20_000
    finally:
        await bus.close()
