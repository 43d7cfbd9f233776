"""The ingest topic's consumer when the batch path itself fails: purchases that break it the
same way every time are found and dead-lettered once each, the rest of the topic keeps flowing,
and a failure every purchase shares dead-letters nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from ledger_svc import commands as c
from ledger_svc.ingest_worker import IngestWorker
from ledger_svc.store.sqlite import SqliteLedgerStore
from pointmesh.events import INGEST_PURCHASES, OutgoingEvent, RedisStreamBus, dead_letter_topic
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import ledger_pb2
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import new_member, points, purchase_request
from tests.waiting import until

UNKNOWN = "m_" + "0" * 28


def sqlite_only(mesh: Mesh) -> None:
    if not isinstance(mesh.ledger.app.store, SqliteLedgerStore):
        pytest.skip("store-independent: the SQLite run covers it")


def inject_bug(mesh: Mesh, monkeypatch: pytest.MonkeyPatch, trips: Any) -> list[int]:
    """Fault injection: a code bug in the batch path that `trips(receipts)` decides, raised as
    a ValueError every time. Returns a list that grows by one per ingest call."""
    service = mesh.ledger.app.service
    real_ingest = service.ingest
    calls: list[int] = []

    async def with_a_bug(commands: Sequence[Any]) -> list[Any]:
        calls.append(len(commands))
        receipts = {cmd.receipt_id for cmd in commands if isinstance(cmd, c.RecordPurchase)}
        if trips(receipts):
            raise ValueError("a bug in the batch path")
        return await real_ingest(commands)

    monkeypatch.setattr(service, "ingest", with_a_bug)
    return calls


@asynccontextmanager
async def ingesting(mesh: Mesh, tmp_path: Path, feed: list[ledger_pb2.RecordPurchaseRequest]) -> AsyncIterator[Redis]:
    """The feed on an ingest topic of this test alone, consumed by an IngestWorker."""
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    bus = RedisStreamBus(Redis.from_url(server.url), owns_client=True)
    await bus.publish(INGEST_PURCHASES, [
        OutgoingEvent(r.member_id, f"{r.channel}/{r.store_id}/{r.receipt_id}", "record_purchase", r.SerializeToString())
        for r in feed
    ])  # fmt: skip
    worker = IngestWorker(mesh.ledger.app.service, bus, "c1", batch=20)
    running = asyncio.create_task(worker.run())
    try:
        yield bus.redis
    finally:
        worker.stop.set()
        await running
        await bus.close()
        server.stop()


async def test_purchases_that_break_the_batch_path_are_dead_lettered_once_and_the_others_earn(
    mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqlite_only(mesh)
    inject_bug(mesh, monkeypatch, lambda receipts: bool(receipts & {"R-BUG", "R-BUG2"}))
    members = [await new_member(mesh) for _ in range(4)]
    feed = [purchase_request(member, [("misc", 2_000, 1)], at=mesh.clock.now(), receipt=receipt)
            for member, receipt in ((members[0], "R-1"), (members[1], "R-BUG"), (UNKNOWN, "R-REFUSED"),
                                    (members[2], "R-BUG2"), (members[3], "R-3"))]  # fmt: skip
    dlq = dead_letter_topic(INGEST_PURCHASES)
    async with ingesting(mesh, tmp_path, feed) as redis:

        async def settled() -> bool:
            return await redis.xlen(dlq) >= 3 and await points(mesh, members[3]) > 0

        await until(settled, 60)
        await asyncio.sleep(0.5)  # a batch read again would dead-letter them again now
        dead = await redis.xrange(dlq)

    reasons = {fields[b"event_id"].decode(): fields[b"dlq_reason"].decode() for _, fields in dead}
    assert len(dead) == 3
    assert reasons == {
        "pos/HEL-01/R-BUG": "failed 5 times: ValueError: a bug in the batch path",
        "pos/HEL-01/R-BUG2": "failed 5 times: ValueError: a bug in the batch path",
        "pos/HEL-01/R-REFUSED": reasons["pos/HEL-01/R-REFUSED"],
    }
    assert UNKNOWN in reasons["pos/HEL-01/R-REFUSED"]
    assert [await points(mesh, m) > 0 for m in members] == [True, False, False, True]


async def test_a_failure_every_purchase_shares_dead_letters_nothing(
    mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqlite_only(mesh)
    calls = inject_bug(mesh, monkeypatch, lambda receipts: True)  # say, a shared step that always fails
    members = [await new_member(mesh) for _ in range(3)]
    feed = [purchase_request(m, [("misc", 2_000, 1)], at=mesh.clock.now(), receipt=f"R-{i}")
            for i, m in enumerate(members)]  # fmt: skip
    async with ingesting(mesh, tmp_path, feed) as redis:
        await until(lambda: len(calls) >= 6 * (1 + len(feed)), 60)  # six rounds: the batch, then each alone
        dead = await redis.xlen(dead_letter_topic(INGEST_PURCHASES))

    assert dead == 0
