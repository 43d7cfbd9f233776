"""A hold past its timeout is EXPIRED whether or not the maintenance pass ran (docs/ledger.md,
Jobs: a hold's timeout is a promise, not the job's schedule): voiding it answers the same either
way."""

from __future__ import annotations

from datetime import timedelta

import grpc
from google.protobuf.duration_pb2 import Duration

from pointmesh.v1 import ledger_pb2
from tests.conftest import LedgerUnderTest
from tests.ledger.helpers import create_member, earn, key, place_hold


async def _void(ledger: LedgerUnderTest, hold_id: str) -> tuple[str, int]:
    """(gRPC code name, hold status) of a VoidHold, then of GetHold."""
    try:
        await ledger.stub.VoidHold(ledger_pb2.VoidHoldRequest(idempotency_key=key(), hold_id=hold_id))
        code = "OK"
    except grpc.aio.AioRpcError as e:
        code = e.code().name
    got = await ledger.stub.GetHold(ledger_pb2.GetHoldRequest(hold_id=hold_id))
    return code, got.hold.status


async def test_voiding_a_timed_out_hold_answers_alike_before_and_after_the_expiry_pass(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 100)
    early = (await place_hold(ledger.stub, member, 30, timeout=Duration(seconds=60))).hold
    late = (await place_hold(ledger.stub, member, 30, timeout=Duration(seconds=60))).hold
    ledger.clock.advance(timedelta(minutes=5))  # both timed out; the pass has not run

    before_pass = await _void(ledger, early.hold_id)
    await ledger.stub.RunExpiry(ledger_pb2.RunExpiryRequest())
    after_pass = await _void(ledger, late.hold_id)
    # Was: ("OK", VOIDED) before the pass, ("FAILED_PRECONDITION", EXPIRED) after it.
    assert before_pass == after_pass
    assert before_pass[1] == ledger_pb2.HOLD_STATUS_EXPIRED
