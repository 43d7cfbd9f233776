"""A row fraud_svc itself fails on is decided as unavailable, on the unary and batch paths alike."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from fraud_svc import service as fraud_service
from fraud_svc.domain import TxContext
from pointmesh.v1 import ledger_pb2
from tests.ledger.helpers import create_member
from tests.mesh.helpers import purchase_request
from tests.screening.test_fraud_on_the_path import NOW, Screened, aiter_of, kept_for, screened  # noqa: F401

BAD_DEVICE = "device-fraud-svc-trips-on-it"


@pytest.mark.parametrize("path", ["unary", "batch"])
async def test_a_row_fraud_svc_fails_on_is_unscored_as_unavailable_and_kept_for_later_on_both_paths(
    screened: Screened,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    real_check = fraud_service.check

    def trips(ctx: TxContext, now: datetime, path: str = "transaction") -> TxContext:
        if ctx.device_id == BAD_DEVICE:  # a bug in fraud_svc that this one basket trips
            raise ZeroDivisionError("division by zero")
        return real_check(ctx, now, path)

    monkeypatch.setattr(fraud_service, "check", trips)
    screened.clock.set(NOW - timedelta(days=100))
    good_member = (await create_member(screened.ledger.stub)).member_id
    bad_member = (await create_member(screened.ledger.stub)).member_id
    screened.clock.set(NOW)
    at = NOW - timedelta(hours=2)
    good = purchase_request(good_member, [("grocery", 1_000, 1)], at=at, receipt=f"good-{path}", store="LIS-01")
    bad = purchase_request(bad_member, [("grocery", 1_000, 1)], at=at, receipt=f"bad-{path}", store="LIS-01")
    bad.context.device_id = BAD_DEVICE
    if path == "unary":
        await screened.ledger.stub.RecordPurchase(good)
        got = (await screened.ledger.stub.RecordPurchase(bad)).purchase.screening
    else:
        response = await screened.ledger.stub.IngestBatch(
            aiter_of(ledger_pb2.IngestBatchRequest(purchase=p) for p in (good, bad))
        )
        bad_id = next(p.purchase_id for p in response.purchases if p.index == 1)
        request = ledger_pb2.GetPurchaseRequest(purchase_id=bad_id)
        got = (await screened.ledger.stub.GetPurchase(request)).purchase.screening
    assert (got.verdict, got.scored) == (ledger_pb2.SCREENING_VERDICT_ALLOW, False)
    screen = screened.ledger.app.service.fraud
    assert screen is not None and screen.backlog is not None
    kept = bool(await kept_for(screened.redis_url, screen.backlog, bad_member))
    assert (list(got.reasons), kept) == (["unscored:fraud_svc_unavailable:allow"], True), path
