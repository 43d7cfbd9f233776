"""Reconciliation while postings run: the shards are read one after another, so a transfer
between two of them may complete between their reads, or be on its way during the pass; a
consistent ledger is reported consistent, with its true totals, and a saga stuck past the
grace is still reported."""

from __future__ import annotations

from ledger_svc.reconcile import SAGA_GRACE, reconcile
from pointmesh.v1 import ledger_pb2
from tests.conftest import LedgerUnderTest
from tests.ledger.helpers import create_member, earn, key


async def _member_on(ledger: LedgerUnderTest, shard: int) -> str:
    while True:
        m = (await create_member(ledger.stub)).member_id
        if ledger.app.service.shard_of(m) == shard:
            return m


async def test_reconcile_reports_no_difference_for_a_transfer_made_during_the_pass(ledger: LedgerUnderTest) -> None:
    """A cross-shard transfer completes while a reconciliation pass is between shards: the
    ledger is consistent before and after, so the pass must find nothing, and its totals must
    not count the moved points twice."""
    alice, bob = await _member_on(ledger, 0), await _member_on(ledger, 3)
    await earn(ledger.stub, alice, 100)
    store = ledger.app.store
    before = await reconcile(store, ledger.clock.now())
    assert before.differences == []
    real_scan = store.scan
    done = False

    async def scan(shard, work):  # type: ignore[no-untyped-def]
        nonlocal done
        if shard == 1 and not done:  # shard 0 read; a transfer runs before the others are
            done = True
            r = await ledger.stub.Transfer(
                ledger_pb2.TransferRequest(
                    idempotency_key=key(), source_member_id=alice, destination_member_id=bob, points=40
                )
            )
            assert r.credit.transaction_id
        return await real_scan(shard, work)

    store.scan = scan  # type: ignore[method-assign]
    try:
        during = await reconcile(store, ledger.clock.now())
    finally:
        store.scan = real_scan  # type: ignore[method-assign]
    after = await reconcile(store, ledger.clock.now())
    assert after.differences == []
    assert ([d.describe() for d in during.differences], during.totals_by_account_class["member:points"]) == ([], 100)


async def test_reconcile_does_not_report_a_transfer_still_on_its_way(ledger: LedgerUnderTest) -> None:
    """A cross-shard transfer between its first step (source reserved, saga HELD) and its
    second: a pass then reports 'saga left open', exit 1 for `pointmesh ledger reconcile`,
    although nothing is wrong and the transfer completes a moment later."""
    import asyncio

    alice, bob = await _member_on(ledger, 0), await _member_on(ledger, 3)
    await earn(ledger.stub, alice, 100)
    sagas = ledger.app.service.sagas
    real_drive = sagas.drive_transfer
    go = asyncio.Event()

    async def slow_drive(saga_id, saga=None):  # type: ignore[no-untyped-def]
        await go.wait()  # the network or the destination shard a moment slow
        return await real_drive(saga_id, saga)

    sagas.drive_transfer = slow_drive  # type: ignore[method-assign]
    try:
        call = asyncio.ensure_future(
            ledger.stub.Transfer(
                ledger_pb2.TransferRequest(
                    idempotency_key=key(), source_member_id=alice, destination_member_id=bob, points=40
                )
            )
        )
        await asyncio.sleep(0.3)
        during = await reconcile(ledger.app.store, ledger.clock.now())
        stuck = await reconcile(ledger.app.store, ledger.clock.now() + SAGA_GRACE)
        go.set()
        await call
    finally:
        sagas.drive_transfer = real_drive  # type: ignore[method-assign]
    assert (await reconcile(ledger.app.store, ledger.clock.now())).differences == []
    assert [d.describe() for d in during.differences] == []
    assert [d.kind for d in stuck.differences] == ["transfer saga left open in state HELD"]
