"""A fault fraud_svc has on one request (INTERNAL for that request alone) is not an outage: on
the batch path it leaves only that row to the unavailable policy, and on the unary path too,
without opening the breaker that would send everyone else's transactions through unscored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest

from fraud_svc import service as fraud_service
from fraud_svc.domain import TxContext
from pointmesh.redis_server import RedisServer
from pointmesh.v1 import ledger_pb2
from tests.ledger.helpers import create_member, key
from tests.mesh.helpers import purchase_request
from tests.screening.test_fraud_on_the_path import NOW, Screened, regular_member, screened_mesh

BAD_DEVICE = "device-fraud-svc-trips-on"


@pytest.fixture
async def screened(tmp_path: Path, redis_server: RedisServer, fraud_models: Path) -> AsyncIterator[Screened]:
    async with screened_mesh(tmp_path, redis_server, fraud_models) as env:
        yield env


BLOCKED = "dv-blocked-hunt"


async def test_one_request_fraud_svc_fails_on_does_not_let_a_blocked_device_redeem_unscored(
    screened: Screened,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_check = fraud_service.check

    def trips(ctx: TxContext, now: datetime, path: str = "transaction") -> TxContext:
        if ctx.device_id == BAD_DEVICE:  # a bug in fraud_svc that this one basket trips
            raise ZeroDivisionError("division by zero")
        return real_check(ctx, now, path)

    monkeypatch.setattr(fraud_service, "check", trips)
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
