"""A rules_svc outage during purchases: nothing lost, nothing earned twice, same balances."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from cassandra import OperationTimedOut

from ledger_svc.store.cassandra import CassandraLedgerStore
from pointmesh.timestamps import from_timestamp
from pointmesh.v1 import ledger_pb2
from tests.cassandra.faults import WatchedSession
from tests.ledger.helpers import key, rpc_error
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import Line, buy, new_member, points

# A day of one member: welcome, a cap-limited boost, a basket bonus, a tier crossing, a weekend.
DAY: list[list[Line]] = [
    [("misc", 1250, 1)], [("boost", 1500, 1)], [("boost", 500, 1)], [("misc", 12000, 1)],
    [("misc", 20000, 1)], [("misc", 1000, 1)],
]  # fmt: skip


async def run_day(mesh: Mesh, member: str) -> list[ledger_pb2.RecordPurchaseResponse]:
    start = mesh.clock.now()
    return [await buy(mesh, member, lines, at=start + timedelta(minutes=i)) for i, lines in enumerate(DAY)]


async def settle_all(mesh: Mesh) -> None:
    """Drains waiting purchases, as the ledger's maintenance loop does, until none wait."""
    for _ in range(100):
        await mesh.ledger.app.service.accrual.process_waiting()
        waiting = 0
        for shard in range(mesh.ledger.app.store.shard_count):
            waiting += len(await mesh.ledger.app.store.read(shard, lambda tx: tx.waiting_purchases(10)))
        if not waiting:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("waiting purchases never drained")


async def test_an_outage_then_recovery_leaves_the_balances_of_a_run_without_outage(mesh: Mesh) -> None:
    control, member = await new_member(mesh), await new_member(mesh)
    mesh.clock.advance(timedelta(hours=1))
    baseline = await run_day(mesh, control)
    await mesh.stop_rules()
    during = await run_day(mesh, member)
    assert {r.purchase.status for r in during} == {ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL}
    assert await points(mesh, member) == 0
    # A retry during the outage is the same waiting purchase, not a second one.
    again = await buy(
        mesh,
        member,
        DAY[0],
        at=from_timestamp(during[0].purchase.receipt_time),
        receipt=during[0].purchase.receipt_id,
    )
    assert again.replayed and again.purchase.purchase_id == during[0].purchase.purchase_id
    await mesh.restart_rules()
    await settle_all(mesh)
    for unit in ("points", "tier_credits"):
        assert await points(mesh, member, unit) == await points(mesh, control, unit) > 0
    settled = [
        await mesh.ledger.stub.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=r.purchase.purchase_id))
        for r in during
    ]
    assert [s.purchase.status for s in settled] == [ledger_pb2.PURCHASE_STATUS_EARNED] * len(DAY)
    assert [list(s.purchase.earned) for s in settled] == [list(b.purchase.earned) for b in baseline]
    assert [s.purchase.tier_after for s in settled] == [b.purchase.tier_after for b in baseline]
    # Draining again changes nothing.
    await mesh.ledger.app.service.accrual.process_waiting()
    assert await points(mesh, member) == await points(mesh, control)


async def test_a_member_with_purchases_waiting_for_the_engine_is_merged_only_once_they_earned(mesh: Mesh) -> None:
    """A late quote would otherwise land on the merged-away member and strand its points."""
    source, target = await new_member(mesh), await new_member(mesh)
    await mesh.stop_rules()
    waiting = await buy(mesh, source, [("misc", 5000, 1)])
    assert waiting.purchase.status == ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL
    merge = ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=source, target_member_id=target)
    error = await rpc_error(mesh.ledger.stub.MergeMembers(merge), grpc.StatusCode.FAILED_PRECONDITION)
    assert "1 purchases waiting for the points engine" in error.details()
    await mesh.restart_rules()
    await settle_all(mesh)
    earned = await points(mesh, source)
    assert earned > 0
    await mesh.ledger.stub.MergeMembers(
        ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=source, target_member_id=target)
    )
    assert (await points(mesh, target), await points(mesh, source)) == (earned, 0)


async def test_a_store_timeout_while_settling_leaves_a_waiting_purchase_waiting(mesh: Mesh) -> None:
    """Only Cassandra answers `unavailable` from inside the store: the pass stops and the
    purchase earns on the next one, instead of being saved as refused."""
    store = mesh.ledger.app.store
    if not isinstance(store, CassandraLedgerStore):
        pytest.skip("the SQLite store has no transient read failures to inject")
    member = await new_member(mesh)
    await mesh.stop_rules()
    waiting = await buy(mesh, member, DAY[0], at=mesh.clock.now())
    assert waiting.purchase.status == ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL
    await mesh.restart_rules()
    mesh.ledger.app.service._profiles.clear()  # as after a restart: the profile is read from the store
    watched = WatchedSession.on(store)
    watched.fault = lambda name, _: OperationTimedOut("timed out") if name == "member_get" else None

    assert await mesh.ledger.app.service.accrual.process_waiting() == 0
    still = await mesh.ledger.stub.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=waiting.purchase.purchase_id))
    watched.fault = None
    await settle_all(mesh)
    settled = await mesh.ledger.stub.GetPurchase(
        ledger_pb2.GetPurchaseRequest(purchase_id=waiting.purchase.purchase_id)
    )

    assert still.purchase.status == ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL
    assert settled.purchase.status == ledger_pb2.PURCHASE_STATUS_EARNED
    assert await points(mesh, member) > 0
