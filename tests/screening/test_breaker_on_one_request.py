"""A fault fraud_svc has on one request (INTERNAL for that request alone) is not an outage: on
the batch path it leaves only that row to the unavailable policy, and on the unary path too,
without opening the breaker that would send everyone else's transactions through unscored."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from pointmesh.v1 import ledger_pb2
from tests.ledger.helpers import create_member, key
from tests.mesh.helpers import purchase_request
from tests.screening.test_fraud_on_the_path import BAD_DEVICE, NOW, Screened, fail_on_bad_device, regular_member

BLOCKED = "dv-blocked-hunt"


async def test_one_request_fraud_svc_fails_on_does_not_let_a_blocked_device_redeem_unscored(
    screened: Screened,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fail_on_bad_device(monkeypatch)
    assert screened.fraud is not None
    screened.fraud.service.configure({"blocked_devices": [BLOCKED]})
    member = await regular_member(screened, visits=4)
    screened.clock.set(NOW - timedelta(days=100))
    other = (await create_member(screened.ledger.stub)).member_id
    screened.clock.set(NOW)

    bad = purchase_request(other, [("grocery", 1_000, 1)], at=NOW - timedelta(minutes=5), receipt="bad-one")
    bad.context.device_id = BAD_DEVICE
    tripped = await screened.ledger.stub.RecordPurchase(bad)
    assert tripped.purchase.screening.reasons == ["unscored:fraud_svc_unavailable:allow"]

    # Right after, another member's redemption from a blocked device: fraud_svc is up and
    # answers for it (DENY), so it must be refused, not posted by the policy unscored.
    redeem = ledger_pb2.RedeemRequest(
        idempotency_key=key(f"blocked-{member}"), member_id=member, unit="points", points=300,
        context=ledger_pb2.ScreeningContext(channel="app", device_id=BLOCKED),
    )  # fmt: skip
    try:
        got = await screened.ledger.stub.Redeem(redeem)
    except grpc.aio.AioRpcError as error:  # the expected outcome
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        assert "rule:blocked_device" in (error.details() or ""), error.details()
        return
    pytest.fail(
        f"a blocked device's redemption was posted: scored={got.screening.scored} "
        f"reasons={list(got.screening.reasons)} transaction={got.HasField('transaction')}"
    )
