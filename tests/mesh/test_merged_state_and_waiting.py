"""What a merge moves beyond points, kept right afterwards: the member state (purchase count,
caps, tier months) is added once even if the target buys before a crashed merge is recovered,
and tier credits taken back from a pre-merge purchase (a return, an ops reversal) come off the
member who now holds those months. And a waiting pass is not crowded out by one member whose
baskets rules_svc fails on. Both stores (tests/mesh)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from ledger_svc import codec
from ledger_svc.accrual import BREAKER_SECONDS
from ledger_svc.domain import SagaState
from ledger_svc.purchases import MemberState
from ledger_svc.reconcile import reconcile
from pointmesh.v1 import ledger_pb2
from tests.ledger.helpers import key
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import buy, new_member, points, return_lines, welcomed_member
from tests.mesh.test_outage import settle_all


async def state_of(mesh: Mesh, member: str) -> MemberState:
    svc = mesh.ledger.app.service
    raw = await svc.store.read(svc.shard_of(member), lambda tx: tx.get_member_state(member))
    return MemberState() if raw is None else codec.loads(MemberState, raw)


async def merge(mesh: Mesh, source: str, target: str) -> None:
    await mesh.ledger.stub.MergeMembers(ledger_pb2.MergeMembersRequest(
        idempotency_key=key(), source_member_id=source, target_member_id=target))  # fmt: skip


async def test_a_recovered_merge_adds_the_member_state_once_even_after_the_target_bought(mesh: Mesh) -> None:
    svc = mesh.ledger.app.service
    a, b = await welcomed_member(mesh), await new_member(mesh)
    await buy(mesh, a, [("misc", 30_000, 1)])  # a: 2 purchases, 300 tier credits
    await merge(mesh, a, b)
    merge_id = svc.sagas.merge_id(a)  # as if it crashed after moving in, before it was marked done:
    await svc.store.write(svc.shard_of(a), lambda tx: tx.set_saga_state(merge_id, SagaState.HELD, mesh.clock.now()))
    await buy(mesh, b, [("misc", 1_000, 1)])

    await svc.recover_sagas()

    state = await state_of(mesh, b)
    assert (state.purchase_count, sum(state.qualification.values())) == (3, 310)


async def test_a_return_of_a_pre_merge_purchase_takes_its_tier_credits_off_the_target(mesh: Mesh) -> None:
    a, b = await welcomed_member(mesh), await new_member(mesh)
    bought = await buy(mesh, a, [("misc", 30_000, 1)])
    await merge(mesh, a, b)
    assert sum((await state_of(mesh, b)).qualification.values()) == 300

    await return_lines(mesh, bought.purchase.purchase_id, [(0, 1)])

    assert sum((await state_of(mesh, b)).qualification.values()) == 0
    assert (await buy(mesh, b, [("misc", 100, 1)])).purchase.tier_before == "blue"


async def test_an_ops_reversal_of_a_pre_merge_earn_takes_its_tier_credits_off_the_target(mesh: Mesh) -> None:
    a, b = await welcomed_member(mesh), await new_member(mesh)
    bought = (await buy(mesh, a, [("misc", 30_000, 1)])).purchase
    await merge(mesh, a, b)

    await mesh.ledger.stub.Reverse(ledger_pb2.ReverseRequest(
        idempotency_key=key(), transaction_id=bought.earn_transactions["tier_credits"], reason="ops", full=True))  # fmt: skip

    assert sum((await state_of(mesh, b)).qualification.values()) == 0


async def test_a_member_held_on_a_failing_basket_does_not_crowd_out_the_waiting_pass(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    accrual, svc, rules = mesh.ledger.app.service.accrual, mesh.ledger.app.service, mesh.rules.app.service
    real = rules.evaluate

    def evaluate(program: str, version: int, basket: Any, member: Any) -> Any:
        if basket.receipt_id.startswith("CRASH"):
            raise ValueError("a bug these baskets trip")
        return real(program, version, basket, member)

    monkeypatch.setattr(rules, "evaluate", evaluate)
    a = await new_member(mesh)
    b = await new_member(mesh)
    while svc.shard_of(b) != svc.shard_of(a):
        b = await new_member(mesh)
    accrual.engine_down("the test", RuntimeError("an outage"))
    t = mesh.clock.now()
    held = [await buy(mesh, a, [("misc", 1000, 1)], receipt=f"CRASH-{i}", at=t - timedelta(minutes=9 - i))
            for i in range(3)]  # fmt: skip
    behind = await buy(mesh, b, [("misc", 1000, 1)], at=t - timedelta(minutes=1))
    assert {p.purchase.status for p in (*held, behind)} == {ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL}
    await asyncio.sleep(BREAKER_SECONDS + 0.1)

    await accrual.process_waiting(limit=2)  # a's purchases alone fill the first page

    got = await mesh.ledger.stub.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=behind.purchase.purchase_id))
    assert got.purchase.status == ledger_pb2.PURCHASE_STATUS_EARNED


async def test_a_waiting_purchase_earns_nothing_while_its_member_is_blocked_and_is_refused_once_erased(
    mesh: Mesh,
) -> None:
    """Accepted while rules_svc was away; the member was blocked before it came back: the
    purchase keeps waiting (and earns once the block is lifted), where it earned on a blocked
    member. A member erased meanwhile gets it refused."""
    s = mesh.ledger.stub
    kept, gone = await new_member(mesh), await new_member(mesh)
    await mesh.stop_rules()
    waited = {m: (await buy(mesh, m, [("misc", 5000, 1)])).purchase for m in (kept, gone)}
    assert {p.status for p in waited.values()} == {ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL}
    await s.BlockMember(ledger_pb2.BlockMemberRequest(idempotency_key=key(), member_id=kept, reason="check"))
    await s.EraseMember(ledger_pb2.EraseMemberRequest(idempotency_key=key(), member_id=gone))
    await mesh.restart_rules()

    for _ in range(50):  # the breaker gives rules_svc a second after the outage
        await mesh.ledger.app.service.accrual.process_waiting()
        got = (await s.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=waited[gone].purchase_id))).purchase
        if got.status != ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL:
            break
        await asyncio.sleep(0.1)

    assert got.status == ledger_pb2.PURCHASE_STATUS_REFUSED and "ERASED" in got.status_reason
    still = (await s.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=waited[kept].purchase_id))).purchase
    assert still.status == ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL
    assert await points(mesh, kept) == 0
    await s.UnblockMember(ledger_pb2.UnblockMemberRequest(idempotency_key=key(), member_id=kept))
    await settle_all(mesh)
    assert await points(mesh, kept) > 0


async def test_a_purchase_waiting_when_a_merge_stopped_short_earns_and_the_merge_then_completes(
    mesh: Mesh,
) -> None:
    """The purchase was accepted to wait after the merge's own check, so the write that moves
    the points stopped the merge (the member stays MERGED). The purchase must still earn, and
    the merge, with nothing left to wait for, carry its points to the target: before, they sat
    on the merged-away member until someone sent the merge again."""
    from ledger_svc.domain import FailedPrecondition, MemberStatus

    svc = mesh.ledger.app.service
    source, target = await new_member(mesh), await new_member(mesh)
    await mesh.stop_rules()
    waiting = (await buy(mesh, source, [("misc", 5000, 1)])).purchase
    assert waiting.status == ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL
    await svc.store.write_directory(lambda d: d.set_status(source, MemberStatus.MERGED, target))  # as the merge does
    svc._status_cache.put(source, MemberStatus.MERGED)
    with pytest.raises(FailedPrecondition, match="waiting for the points engine"):
        await svc.sagas.complete_merge(source, target)
    await mesh.restart_rules()

    await settle_all(mesh)

    got = (await mesh.ledger.stub.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=waiting.purchase_id))).purchase
    assert got.status == ledger_pb2.PURCHASE_STATUS_EARNED
    earned = await points(mesh, target)
    assert earned > 0 and await points(mesh, source) == 0
    await svc.sagas.complete_merge(source, target)  # the merge, sent again, moves nothing twice
    assert (await points(mesh, target), await points(mesh, source)) == (earned, 0)
    assert (await reconcile(svc.store, mesh.ledger.clock.now())).differences == []


async def test_a_purchase_that_began_waiting_behind_a_merges_check_follows_the_merge_when_it_earns(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The purchase passed its status check, the merge checked the member and moved everything,
    then the purchase's waiting row committed (here: the merge's check does not see it). When
    the points engine answers, it earns on the merged-away member: those points now go on to
    the target, where they sat on the member for ever before (reconcile: points left on a
    merged member)."""
    from ledger_svc import sagas
    from ledger_svc.domain import MemberStatus

    svc = mesh.ledger.app.service
    source, target = await new_member(mesh), await new_member(mesh)
    before = await points(mesh, target)
    await mesh.stop_rules()
    waiting = (await buy(mesh, source, [("misc", 5000, 1)])).purchase
    assert waiting.status == ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL
    await svc.store.write_directory(lambda d: d.set_status(source, MemberStatus.MERGED, target))  # as the merge does
    svc._status_cache.put(source, MemberStatus.MERGED)
    monkeypatch.setattr(sagas, "_require_settled", lambda tx, member_id: None)
    await svc.sagas.complete_merge(source, target)  # its check ran before the waiting row committed
    monkeypatch.undo()
    await mesh.restart_rules()

    await settle_all(mesh)

    got = (await mesh.ledger.stub.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=waiting.purchase_id))).purchase
    assert got.status == ledger_pb2.PURCHASE_STATUS_EARNED
    assert await points(mesh, source) == 0 and await points(mesh, target) > before
    assert (await reconcile(svc.store, mesh.ledger.clock.now())).differences == []
