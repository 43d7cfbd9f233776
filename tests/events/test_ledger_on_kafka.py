"""ledger_svc with POINTMESH_EVENT_BUS=kafka: the outbox relay publishes ledger events and ops
alerts to a real broker, a consumer group reads them, and WatchEvents streams them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pointmesh.events import LEDGER_EVENTS, OPS_ALERTS
from pointmesh.kafka_bus import KafkaBus
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import common_pb2, ledger_pb2
from tests.conftest import LedgerUnderTest, start_ledger, stop_ledger
from tests.ledger.helpers import create_member, earn, key


@pytest.fixture
async def kafka_ledger(
    tmp_path: Path, redis_server: RedisServer, kafka_bootstrap: str
) -> AsyncIterator[LedgerUnderTest]:
    # Screening on with no fraud_svc listening: a large redemption is held by the fail-closed policy.
    ledger = await start_ledger(tmp_path / "data", redis_server.url, event_bus="kafka", kafka_bootstrap=kafka_bootstrap,
                                fraud_screening=True, fraud_addr=f"127.0.0.1:{free_port()}",
                                fraud_deadline_seconds=0.2)  # fmt: skip
    yield ledger
    await stop_ledger(ledger)


async def test_postings_and_alerts_reach_kafka_consumers_and_watchers(
    kafka_ledger: LedgerUnderTest, kafka_bootstrap: str
) -> None:
    stub = kafka_ledger.stub
    member = (await create_member(stub)).member_id
    watched: list[ledger_pb2.LedgerEvent] = []

    async def watch() -> None:
        async for item in stub.WatchEvents(ledger_pb2.WatchEventsRequest(member_id=member)):
            watched.append(item.event)

    watcher = asyncio.create_task(watch())
    earned: list[str] = []
    async with asyncio.timeout(30):  # the watcher starts at the end of the topic: earn until it sees one
        while not watched:
            earned.append((await earn(stub, member, 6_000 + len(earned))).transaction.transaction_id)
            await asyncio.sleep(0.5)
    watcher.cancel()
    assert watched[0].points_earned.transaction_id in earned

    held = await stub.Redeem(ledger_pb2.RedeemRequest(idempotency_key=key(), member_id=member, points=5_000))
    assert held.HasField("hold") and not held.screening.scored

    bus = KafkaBus(kafka_bootstrap)
    try:
        events = bus.group(LEDGER_EVENTS, f"events-{member}", "c")
        alerts = bus.group(OPS_ALERTS, f"alerts-{member}", "c")
        mine: list[ledger_pb2.LedgerEvent] = []
        found: list[common_pb2.OpsAlert] = []
        # Fresh groups read the topics from the start, including other tests' events.
        async with asyncio.timeout(90):
            while len(mine) < len(earned) + 2 or not found:  # every earn, the hold, the review
                mine += [e for e in (ledger_pb2.LedgerEvent.FromString(m.payload)
                                     for m in await events.poll(max_messages=5000, block_ms=200)) if e.member_id == member]  # fmt: skip
                found += [a for a in (common_pb2.OpsAlert.FromString(m.payload)
                                      for m in await alerts.poll(max_messages=5000, block_ms=200)) if a.member_id == member]  # fmt: skip
        await events.close()
        await alerts.close()
    finally:
        await bus.close()
    kinds = [e.WhichOneof("payload") for e in mine]
    assert kinds == ["points_earned"] * len(earned) + ["hold_placed", "review_opened"]
    assert [
        e.points_earned.transaction_id for e in mine[: len(earned)]
    ] == earned  # one member: one partition, in order
    assert found[0].kind == "redemption_held" and found[0].subject_id == held.screening.review_id
