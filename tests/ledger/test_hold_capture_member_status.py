"""A hold's capture spends the member's points, so it is refused, as a redemption is, once the
member cannot spend: blocked (a takeover confirmed while the till held the points) or erased.
The hold stays placed and voiding it still gives the points back."""

from __future__ import annotations

import grpc

from pointmesh.v1 import ledger_pb2
from tests.conftest import LedgerUnderTest
from tests.ledger.helpers import balance, create_member, earn, error_field, figures, key, place_hold, redeem, rpc_error


async def test_a_blocked_members_hold_is_not_captured(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 100)
    hold = (await place_hold(ledger.stub, member, 60)).hold
    await ledger.stub.BlockMember(
        ledger_pb2.BlockMemberRequest(idempotency_key=key(), member_id=member, reason="takeover")
    )
    before = figures(await balance(ledger.stub, member))
    # A redemption of the same points is refused: a blocked member cannot spend.
    refused_redeem = await rpc_error(redeem(ledger.stub, member, 10), grpc.StatusCode.FAILED_PRECONDITION)
    assert error_field(refused_redeem) == "member_id"

    capture = ledger.stub.CaptureHold(ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=hold.hold_id))
    refused = await rpc_error(capture, grpc.StatusCode.FAILED_PRECONDITION)  # was: captured, 60 points spent
    assert error_field(refused) == "hold_id"  # the request's field (DecideReview names review_id alike)
    assert "BLOCKED" in (refused.details() or "")
    assert figures(await balance(ledger.stub, member)) == before
    got = await ledger.stub.GetHold(ledger_pb2.GetHoldRequest(hold_id=hold.hold_id))
    assert got.hold.status == ledger_pb2.HOLD_STATUS_PLACED


async def test_an_erased_members_hold_is_not_captured(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 100)
    hold = (await place_hold(ledger.stub, member, 60)).hold
    await ledger.stub.EraseMember(ledger_pb2.EraseMemberRequest(idempotency_key=key(), member_id=member))
    capture = ledger.stub.CaptureHold(ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=hold.hold_id))
    refused = await rpc_error(capture, grpc.StatusCode.FAILED_PRECONDITION)  # was: captured
    assert error_field(refused) == "hold_id"
    assert "ERASED" in (refused.details() or "")
