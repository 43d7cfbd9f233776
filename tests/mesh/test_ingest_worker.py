"""The ingest topic's consumer when the batch path itself fails: a purchase that breaks it the
same way every time is found and dead-lettered, and the rest of the topic keeps flowing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from ledger_svc import commands as c
from ledger_svc.ingest_worker import IngestWorker
from ledger_svc.store.sqlite import SqliteLedgerStore
from pointmesh.events import INGEST_PURCHASES, OutgoingEvent, RedisStreamBus, dead_letter_topic
from pointmesh.redis_server import RedisServer, free_port
from tests.events.test_bus_conformance import drain
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import new_member, points, purchase_request
from tests.waiting import until


async def test_a_purchase_that_breaks_the_batch_path_is_dead_lettered_and_the_others_earn(
    mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not isinstance(mesh.ledger.app.store, SqliteLedgerStore):
        pytest.skip("store-independent: the SQLite run covers it")
    service = mesh.ledger.app.service
    real_ingest = service.ingest

    async def with_a_bug(commands: Sequence[Any]) -> list[Any]:
        """Fault injection: a code bug that one receipt trips, as a ValueError every time."""
        if any(isinstance(cmd, c.RecordPurchase) and cmd.receipt_id == "R-BUG" for cmd in commands):
            raise ValueError("a bug in the batch path")
        return await real_ingest(commands)

    monkeypatch.setattr(service, "ingest", with_a_bug)
    redis = RedisServer(free_port(), tmp_path / "redis")  # the ingest topic of this test alone
    redis.start()
    bus = RedisStreamBus(Redis.from_url(redis.url), owns_client=True)
    members = [await new_member(mesh) for _ in range(3)]
    feed = [purchase_request(m, [("misc", 2_000, 1)], at=mesh.clock.now(), receipt=receipt)
            for m, receipt in zip(members, ("R-1", "R-BUG", "R-3"), strict=True)]  # fmt: skip
    await bus.publish(INGEST_PURCHASES, [
        OutgoingEvent(r.member_id, f"{r.channel}/{r.store_id}/{r.receipt_id}", "record_purchase", r.SerializeToString())
        for r in feed
    ])  # fmt: skip
    worker = IngestWorker(service, bus, "c1", batch=10)
    running = asyncio.create_task(worker.run())
    try:
        dead = await drain(bus, dead_letter_topic(INGEST_PURCHASES), "dlq-reader", "r1", 1)

        async def others_earned() -> bool:
            return await points(mesh, members[0]) > 0 and await points(mesh, members[2]) > 0

        await until(others_earned, 30)
    finally:
        worker.stop.set()
        await running
        await bus.close()
        redis.stop()

    assert [m.event_id for m in dead] == ["pos/HEL-01/R-BUG"]
    assert dict(dead[0].headers)["dlq_reason"] == "failed 5 times: ValueError: a bug in the batch path"
    assert await points(mesh, members[1]) == 0
