"""The ingest topic's consumer when the batch path itself fails: purchases that break it the
same way every time are found and dead-lettered once each, the rest of the topic keeps flowing,
and a failure every purchase shares, once some went through alone, dead-letters nothing."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from ledger_svc import commands as c
from ledger_svc.ingest_worker import GROUP, IngestWorker
from ledger_svc.store.sqlite import SqliteLedgerStore
from pointmesh import consumers
from pointmesh.consumers import MAX_DETERMINISTIC_ATTEMPTS
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
    await bus.publish(INGEST_PURCHASES, [purchase_event(r) for r in feed])
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


async def test_a_shared_step_that_breaks_after_purchases_went_through_alone_dead_letters_nothing(
    mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqlite_only(mesh)
    monkeypatch.setattr(consumers, "RETRY_PAUSE_SECONDS", 0.05)
    seen = itertools.count(1)
    # Round one: the batch and R-BUG alone fail, R-0 and R-1 go through alone. From the fifth
    # call on every call fails, say a step they all share broke.
    calls = inject_bug(mesh, monkeypatch, lambda receipts: bool(receipts) and (next(seen) > 4 or "R-BUG" in receipts))
    members = [await new_member(mesh) for _ in range(3)]
    feed = [purchase_request(m, [("misc", 2_000, 1)], at=mesh.clock.now(), receipt=receipt)
            for m, receipt in zip(members, ("R-0", "R-1", "R-BUG"), strict=True)]  # fmt: skip
    async with ingesting(mesh, tmp_path, feed) as redis:
        await until(lambda: len(calls) >= 4 + 8 * (1 + len(feed)), 60)  # eight rounds more
        dead = await redis.xlen(dead_letter_topic(INGEST_PURCHASES))

    assert dead == 0


async def test_purchases_that_break_the_batch_path_read_alone_are_dead_lettered_and_the_topic_moves_on(
    mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Redis a reopened consumer reads its own pending purchases first: two bad ones read
    together, with nothing that ever went through alone, came back for ever and stopped the topic."""
    sqlite_only(mesh)
    monkeypatch.setattr(consumers, "RETRY_PAUSE_SECONDS", 0.05)
    calls = inject_bug(mesh, monkeypatch, lambda receipts: bool(receipts & {"R-BUG", "R-BUG2"}))
    members = [await new_member(mesh) for _ in range(3)]
    bad = [purchase_request(member, [("misc", 2_000, 1)], at=mesh.clock.now(), receipt=receipt)
           for member, receipt in ((members[0], "R-BUG"), (members[1], "R-BUG2"))]  # fmt: skip
    good = purchase_request(members[2], [("misc", 2_000, 1)], at=mesh.clock.now(), receipt="R-GOOD")
    dlq = dead_letter_topic(INGEST_PURCHASES)
    async with ingesting(mesh, tmp_path, bad) as redis:
        await until(lambda: len(calls) >= 3, 30)  # the pair failed together, then each alone
        await RedisStreamBus(redis).publish(INGEST_PURCHASES, [purchase_event(good)])

        async def settled() -> bool:
            return await redis.xlen(dlq) >= 2 and await points(mesh, members[2]) > 0

        await until(settled, 60)
        dead = await redis.xrange(dlq)

    reasons = {fields[b"event_id"].decode(): fields[b"dlq_reason"].decode() for _, fields in dead}
    assert reasons == {
        "pos/HEL-01/R-BUG": "failed 5 times: ValueError: a bug in the batch path",
        "pos/HEL-01/R-BUG2": "failed 5 times: ValueError: a bug in the batch path",
    }
    assert len(dead) == 2


async def test_a_shared_step_that_breaks_sends_at_most_one_batch_to_the_dead_letter_topic(
    mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step every purchase shares breaks with the first batch it meets: that batch alone cannot
    be told from a batch of bad purchases and goes to the dead-letter topic; the next batch that
    fails whole the same way shows the step is broken, and it waits (nothing more dead-lettered)
    until the step is mended, then earns. Taking every such batch for bad purchases drained the
    whole topic into the dead-letter topic."""
    sqlite_only(mesh)
    monkeypatch.setattr(consumers, "RETRY_PAUSE_SECONDS", 0.05)
    broken = [True]
    calls = inject_bug(mesh, monkeypatch, lambda receipts: bool(receipts) and broken[0])
    members = [await new_member(mesh) for _ in range(4)]
    first = [purchase_request(m, [("misc", 2_000, 1)], at=mesh.clock.now(), receipt=f"R-A{i}")
             for i, m in enumerate(members[:2])]  # fmt: skip
    second = [purchase_request(m, [("misc", 2_000, 1)], at=mesh.clock.now(), receipt=f"R-B{i}")
              for i, m in enumerate(members[2:])]  # fmt: skip
    dlq = dead_letter_topic(INGEST_PURCHASES)
    async with ingesting(mesh, tmp_path, first) as redis:

        async def first_dead() -> bool:
            return await redis.xlen(dlq) >= 2  # the first batch, taken for bad purchases

        await until(first_dead, 60)
        await RedisStreamBus(redis).publish(INGEST_PURCHASES, [purchase_event(r) for r in second])
        before = len(calls)
        await until(lambda: len(calls) >= before + 8 * (1 + len(second)), 60)  # eight rounds of the second
        assert await redis.xlen(dlq) == 2

        broken[0] = False  # mended: the waiting batch earns
        await until(lambda: points(mesh, members[3]), 60)
        assert [await points(mesh, m) > 0 for m in members] == [False, False, True, True]
        assert await redis.xlen(dlq) == 2


async def test_a_purchase_read_again_after_its_batch_went_through_has_all_its_attempts_again(
    mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failures counted in rounds before its batch went through are forgotten then (kept, they
    grew with every batch that once failed, and a replay gave the purchase fewer attempts)."""
    sqlite_only(mesh)
    monkeypatch.setattr(consumers, "RETRY_PAUSE_SECONDS", 0.05)
    failures_left = [4]  # two rounds: the batch, then the purchase alone

    def trips(receipts: set[str]) -> bool:
        if not receipts:  # an empty poll
            return False
        failures_left[0] -= 1
        return failures_left[0] >= 0

    calls = inject_bug(mesh, monkeypatch, trips)
    member = await new_member(mesh)
    feed = [purchase_request(member, [("misc", 2_000, 1)], at=mesh.clock.now(), receipt="R-A")]
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    bus = RedisStreamBus(Redis.from_url(server.url), owns_client=True)
    worker = IngestWorker(mesh.ledger.app.service, bus, "c1", batch=20)
    try:
        await bus.publish(INGEST_PURCHASES, [purchase_event(r) for r in feed])
        async with consuming(worker):
            await until(lambda: points(mesh, member), 30)  # the third round went through
        failures_left[0] = 1_000_000  # now it fails every time
        replayed_from = len([n for n in calls if n])
        await bus.rewind(INGEST_PURCHASES, GROUP, datetime(1970, 1, 1, tzinfo=UTC))
        async with consuming(worker):
            await until(lambda: bus.redis.xlen(dead_letter_topic(INGEST_PURCHASES)), 30)
    finally:
        await bus.close()
        server.stop()

    assert (
        len([n for n in calls if n]) - replayed_from == 2 * MAX_DETERMINISTIC_ATTEMPTS
    )  # each round: the batch, then alone


@asynccontextmanager
async def consuming(worker: IngestWorker) -> AsyncIterator[None]:
    worker.stop.clear()
    running = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        worker.stop.set()
        await running


def purchase_event(r: ledger_pb2.RecordPurchaseRequest) -> OutgoingEvent:
    return OutgoingEvent(r.member_id, f"{r.channel}/{r.store_id}/{r.receipt_id}", "record_purchase",
                         r.SerializeToString())  # fmt: skip


async def test_a_batch_read_again_after_its_commit_failed_does_not_dead_letter_its_refused_purchase_twice(
    mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purchase of an unknown member and a good one in one batch; Redis refuses the XACK once
    (a failover between the dead letter and the commit), and the consumer reads both again."""
    sqlite_only(mesh)
    monkeypatch.setattr(consumers, "RETRY_PAUSE_SECONDS", 0.05)
    member = await new_member(mesh)
    feed = [purchase_request(UNKNOWN, [("misc", 2_000, 1)], at=mesh.clock.now(), receipt="R-UNKNOWN"),
            purchase_request(member, [("misc", 2_000, 1)], at=mesh.clock.now(), receipt="R-GOOD")]  # fmt: skip
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    admin = Redis.from_url(server.url)
    bus = RedisStreamBus(Redis.from_url(server.url), owns_client=True)
    dlq = dead_letter_topic(INGEST_PURCHASES)
    worker = IngestWorker(mesh.ledger.app.service, bus, "c1", batch=20)
    try:
        await bus.publish(INGEST_PURCHASES, [purchase_event(r) for r in feed])
        await admin.execute_command("ACL", "SETUSER", "default", "-xack")  # the first commit is refused
        running = asyncio.create_task(worker.run())
        try:
            await until(lambda: admin.xlen(dlq), 30)
            await admin.execute_command("ACL", "SETUSER", "default", "+xack")

            async def drained() -> bool:
                return not (await admin.xpending(INGEST_PURCHASES, GROUP))["pending"]

            await until(drained, 30)
        finally:
            worker.stop.set()
            await running
        copies = [fields for _id, fields in await admin.xrange(dlq)]
    finally:
        await admin.aclose()
        await bus.close()
        server.stop()

    assert await points(mesh, member) > 0
    assert [f[b"event_id"] for f in copies] == [b"pos/HEL-01/R-UNKNOWN"]
