"""An event over the bus's size limit: a publish is all or nothing on both buses (Kafka's
producer refused the big record only after queueing, and then sending, the ones before it), the
limit is the same on both, and `pointmesh ingest produce` reports such a line as a bad line."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from pointmesh.events import INGEST_PURCHASES, MAX_EVENT_BYTES, EventBus, EventTooLarge, event_bytes
from tests.conftest import pointmesh_cli
from tests.events.test_bus_conformance import bus, drain, event, new_topic

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
