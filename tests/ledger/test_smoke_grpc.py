"""The fixture ledger answers over gRPC: create a member, earn, read the balance."""

from __future__ import annotations

from pointmesh.v1 import common_pb2, ledger_pb2
from tests.conftest import LedgerUnderTest


async def test_earn_then_balance_over_grpc(ledger: LedgerUnderTest) -> None:
    member = (
        await ledger.stub.CreateMember(
            ledger_pb2.CreateMemberRequest(idempotency_key=common_pb2.IdempotencyKey(key="c"))
        )
    ).member
    await ledger.stub.Earn(
        ledger_pb2.EarnRequest(
            idempotency_key=common_pb2.IdempotencyKey(key="e"), member_id=member.member_id, points=70
        )
    )
    first = (await ledger.stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=member.member_id))).balance
    assert (first.balance_points, first.available_points) == (70, 70)
    await ledger.stub.Earn(
        ledger_pb2.EarnRequest(
            idempotency_key=common_pb2.IdempotencyKey(key="e2"), member_id=member.member_id, points=5
        )
    )
    second = (await ledger.stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=member.member_id))).balance
    assert second.balance_points == 75
    assert second.version > first.version
