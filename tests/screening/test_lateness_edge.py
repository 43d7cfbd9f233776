"""The ledger refuses a spend dated further back than fraud_svc scores, "so that no caller can
choose that path" (docs/fraud.md); fraud_svc takes events the clock skew further back than that
bound, so a redemption dated just inside the ledger's bound, reaching fraud_svc a moment later
(or a clock a fraction of a second ahead), is scored, a blocked device's denied, not paid by the
unavailable policy."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc

from pointmesh.bounds import SCREENED_LATENESS
from pointmesh.clock import ManualClock
from pointmesh.v1 import ledger_pb2
from tests.ledger.helpers import balance, key, ts
from tests.screening.test_fraud_on_the_path import NOW, Screened, regular_member


async def test_a_redemption_dated_at_the_ledgers_lateness_edge_is_not_paid_unscored(
    screened: Screened, stolen_device: Path
) -> None:
    env = screened
    member = await regular_member(env)
    await env.stop_fraud()
    # fraud_svc's host clock 200 ms ahead of the ledger's (or, the same: the request reaches
    # fraud_svc 200 ms after the ledger checked it).
    await env.start_fraud(stolen_device, clock=ManualClock(NOW + timedelta(milliseconds=200)))
    for attempt in range(60):  # until the ledger reaches the restarted fraud_svc (channel backoff, breaker)
        probe = await env.ledger.stub.Redeem(ledger_pb2.RedeemRequest(
            idempotency_key=key(f"probe-{attempt}-{member}"), member_id=member, unit="points", points=1,
            context=ledger_pb2.ScreeningContext(channel="pos", store_id="HEL-01"),
        ))  # fmt: skip
        if probe.screening.scored:
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError("fraud_svc never answered again")
    before = await balance(env.ledger.stub, member)
    stolen = ledger_pb2.ScreeningContext(channel="app", device_id="dev-stolen", ip="203.0.113.9")
    request = ledger_pb2.RedeemRequest(
        idempotency_key=key(f"edge-{member}"), member_id=member, unit="points", points=1_500, context=stolen,
        business_time=ts(NOW - SCREENED_LATENESS + timedelta(milliseconds=100)),
    )  # fmt: skip
    try:
        got = await env.ledger.stub.Redeem(request)
    except grpc.aio.AioRpcError as error:
        # refused by the ledger on business_time, or denied by fraud_svc: either is fine
        assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
        assert (await balance(env.ledger.stub, member)).available_points == before.available_points
        return
    raise AssertionError(
        f"a blocked device's redemption was paid: scored={got.screening.scored}, "
        f"reasons={list(got.screening.reasons)}, posted={got.HasField('transaction')}"
    )
