"""Where a merged-away member's points go when something reaches back to them (a reversal of
one of their earns, a released pending credit), after the member was erased or merged on in a
chain; a merge paying the target's debt; replays after a merge; and a cross-shard transfer that
must not give points a longer life. Each test runs on SQLite and on Cassandra (tests/ledger)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from pointmesh.redis_server import RedisServer
from pointmesh.v1 import ledger_pb2, ledger_pb2_grpc
from tests.conftest import LedgerUnderTest, start_ledger, stop_ledger, store_settings
from tests.ledger.helpers import (
    assert_books_balance,
    balance,
    create_member,
    earn,
    figures,
    key,
    place_hold,
    redeem,
    rpc_error,
    ts,
)  # fmt: skip


async def merge(stub: ledger_pb2_grpc.LedgerServiceStub, source: str, target: str, name: str = "") -> None:
    await stub.MergeMembers(ledger_pb2.MergeMembersRequest(idempotency_key=key(name), source_member_id=source,
                                                           target_member_id=target))  # fmt: skip


async def reverse_all(stub: ledger_pb2_grpc.LedgerServiceStub, tx_id: str) -> ledger_pb2.ReverseResponse:
    return await stub.Reverse(ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=tx_id, full=True))


async def test_a_reversal_of_an_erased_merged_members_earn_takes_the_points_from_the_member_holding_them(
    ledger: LedgerUnderTest,
) -> None:
    """Erasure wipes the profile, not where the points went: the reversal must not land as debt
    on the erased member while the target keeps the points."""
    s = ledger.stub
    a, b = (await create_member(s)).member_id, (await create_member(s)).member_id
    earned = await earn(s, a, 100)
    await merge(s, a, b)
    await s.EraseMember(ledger_pb2.EraseMemberRequest(idempotency_key=key(), member_id=a))

    await reverse_all(s, earned.transaction.transaction_id)

    assert figures(await balance(s, a))["debt"] == 0
    assert figures(await balance(s, b))["balance"] == 0
    await assert_books_balance(ledger)


async def test_a_reversal_after_chained_merges_lands_on_the_end_of_the_chain(ledger: LedgerUnderTest) -> None:
    s = ledger.stub
    a, b, c = [(await create_member(s)).member_id for _ in range(3)]
    earned = await earn(s, a, 100)
    await earn(s, c, 30)
    await merge(s, a, b)
    await merge(s, b, c)

    reversed_ = await reverse_all(s, earned.transaction.transaction_id)

    assert reversed_.debt_points == 0
    assert [figures(await balance(s, m))["debt"] for m in (a, b)] == [0, 0]
    assert figures(await balance(s, c))["balance"] == 30
    await assert_books_balance(ledger)


async def test_a_merge_into_a_member_with_points_pays_the_debt_it_brings(ledger: LedgerUnderTest) -> None:
    """Debt is paid first by any credit: merged points must not stay spendable beside it."""
    s = ledger.stub
    a, b = (await create_member(s)).member_id, (await create_member(s)).member_id
    earned = await earn(s, a, 100)
    await redeem(s, a, 100)
    await reverse_all(s, earned.transaction.transaction_id)  # spent already: 100 of debt
    await earn(s, b, 130)

    await merge(s, a, b)

    got = figures(await balance(s, b))
    assert (got["balance"], got["debt"], got["available"]) == (30, 0, 30)
    await rpc_error(redeem(s, b, 31), grpc.StatusCode.FAILED_PRECONDITION)
    await assert_books_balance(ledger)


async def test_a_merge_and_an_adjustment_replayed_after_the_members_changed_answer_as_the_first_time(
    ledger: LedgerUnderTest,
) -> None:
    s = ledger.stub
    a, b = (await create_member(s)).member_id, (await create_member(s)).member_id
    await earn(s, a, 100)
    adjust = ledger_pb2.AdjustRequest(idempotency_key=key("adj-1"), member_id=a, points=5, reason="goodwill")
    adjusted = await s.Adjust(adjust)
    merge_request = ledger_pb2.MergeMembersRequest(idempotency_key=key("merge-1"), source_member_id=a,
                                                   target_member_id=b)  # fmt: skip
    merged = await s.MergeMembers(merge_request)
    await s.BlockMember(ledger_pb2.BlockMemberRequest(idempotency_key=key(), member_id=b, reason="chargeback"))

    again = await s.MergeMembers(merge_request)
    adjusted_again = await s.Adjust(adjust)

    assert dict(again.moved_points) == dict(merged.moved_points) == {"points": 105}
    assert adjusted_again.transaction.transaction_id == adjusted.transaction.transaction_id
    assert figures(await balance(s, b))["balance"] == 105  # nothing moved or posted twice
    await assert_books_balance(ledger)


async def test_a_transfer_beside_another_hold_moves_the_lots_it_credits_on_either_shard_layout(
    ledger: LedgerUnderTest,
) -> None:
    """The recipient is credited with the expiry dates of the lots after what other holds keep;
    the sender must lose exactly those lots, or points due soon live on (cross-shard: the saga
    captured the earliest lots instead)."""
    s, svc = ledger.stub, ledger.app.service
    for same_shard in (True, False):
        a = (await create_member(s)).member_id
        b = (await create_member(s)).member_id
        while (svc.shard_of(a) == svc.shard_of(b)) != same_shard:
            b = (await create_member(s)).member_id
        now = ledger.clock.now()
        await earn(s, a, 50, expires_at=ts(now + timedelta(days=10)))
        await earn(s, a, 100, expires_at=ts(now + timedelta(days=300)))
        other = await place_hold(s, a, 50, timeout=Duration(seconds=3600))
        await s.Transfer(ledger_pb2.TransferRequest(idempotency_key=key(), source_member_id=a, destination_member_id=b,
                                                    points=50))  # fmt: skip
        await s.VoidHold(ledger_pb2.VoidHoldRequest(idempotency_key=key(), hold_id=other.hold.hold_id))
        ledger.clock.advance(timedelta(days=11))

        expired = await s.RunExpiry(ledger_pb2.RunExpiryRequest())

        assert expired.expired_points == 50, f"same shard: {same_shard}"
        assert (figures(await balance(s, a))["balance"], figures(await balance(s, b))["balance"]) == (50, 50)
    await assert_books_balance(ledger)


@pytest.mark.parametrize("store", ["sqlite", "cassandra"])
async def test_a_cross_shard_transfer_beside_another_hold_keeps_never_expiring_points_never_expiring(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer, store: str
) -> None:
    """With lots due in 10 days (kept by another hold), in 20 days, and never: a transfer of 150
    credits the recipient the 20-day lot and 50 that never expire, so the sender must lose those
    same points (the saga took 50 of the 10-day lot in place of the never-expiring ones)."""
    ledger = await start_ledger(tmp_path / "data", redis_server.url, expiry_days=0, **store_settings(request, store))
    try:
        s, svc = ledger.stub, ledger.app.service
        a = (await create_member(s)).member_id
        b = (await create_member(s)).member_id
        while svc.shard_of(a) == svc.shard_of(b):
            b = (await create_member(s)).member_id
        now = ledger.clock.now()
        await earn(s, a, 100, expires_at=ts(now + timedelta(days=10)))
        await earn(s, a, 100, expires_at=ts(now + timedelta(days=20)))
        await earn(s, a, 100)  # never expires
        other = await place_hold(s, a, 100, timeout=Duration(seconds=3600))
        await s.Transfer(ledger_pb2.TransferRequest(idempotency_key=key(), source_member_id=a, destination_member_id=b,
                                                    points=150))  # fmt: skip
        await s.VoidHold(ledger_pb2.VoidHoldRequest(idempotency_key=key(), hold_id=other.hold.hold_id))
        ledger.clock.advance(timedelta(days=11))

        expired = await s.RunExpiry(ledger_pb2.RunExpiryRequest())

        assert expired.expired_points == 100
        assert (figures(await balance(s, a))["balance"], figures(await balance(s, b))["balance"]) == (50, 150)
        await assert_books_balance(ledger)
    finally:
        await stop_ledger(ledger)


async def test_what_a_merged_away_member_earned_counts_in_the_heirs_lifetime_earned(ledger: LedgerUnderTest) -> None:
    """Two cards of one person made one: lifetime_earned_points is what the person earned,
    whatever they spent since, along the chain, and the spent-out card moves it too."""
    s = ledger.stub
    a, b, c = [(await create_member(s)).member_id for _ in range(3)]
    await earn(s, a, 100)
    await redeem(s, a, 100)  # a has nothing left to move but what it earned
    await earn(s, b, 30)
    await earn(s, c, 5)
    await merge(s, a, b)
    assert (await balance(s, b, "points")).lifetime_earned_points == 130
    assert (await balance(s, a, "points")).lifetime_earned_points == 0  # counted once, on the heir
    await merge(s, b, c)
    after = await balance(s, c, "points")
    assert (after.balance_points, after.lifetime_earned_points) == (35, 135)
    await assert_books_balance(ledger)
