"""What fraud_svc is told, and when: a spend dated further back than fraud_svc scores is refused
by the ledger (before, fraud_svc refused it and the unavailable policy paid small ones unscored,
a blocked device's too); a return counts in the velocity windows at its return time (before, at
the time the ledger recorded it, so a file of last month's returns looked like a burst today);
purchases and redemptions let through while fraud_svc was down reach its velocity state on the
maintenance pass after it is back (before, only transfers and returns did)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc

from fraud_svc.domain import TxContext, TxKind
from pointmesh.bounds import SCREENED_LATENESS
from pointmesh.v1 import common_pb2, ledger_pb2
from tests.ledger.helpers import balance, error_field, key, rpc_error, ts
from tests.mesh.helpers import purchase_request
from tests.screening.test_fraud_on_the_path import (
    NOW,
    Screened,
    _features,
    regular_member,
    tell_until_told,
)


async def test_a_redemption_dated_before_what_fraud_svc_scores_is_refused_not_paid_unscored(
    screened: Screened, stolen_device: Path
) -> None:
    env = screened
    await env.stop_fraud()
    await env.start_fraud(stolen_device)
    member = await regular_member(env)
    before = await balance(env.ledger.stub, member)
    stolen = ledger_pb2.ScreeningContext(channel="app", device_id="dev-stolen", ip="203.0.113.9")

    def spend(name: str, days_back: timedelta) -> ledger_pb2.RedeemRequest:
        return ledger_pb2.RedeemRequest(
            idempotency_key=key(f"{name}-{member}"), member_id=member, unit="points", points=1_500,
            context=stolen, business_time=ts(NOW - days_back),
        )  # fmt: skip

    late = await rpc_error(env.ledger.stub.Redeem(spend("late", SCREENED_LATENESS + timedelta(days=1))),
                           grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    assert error_field(late) == "business_time"
    assert f"at most {SCREENED_LATENESS.days} days back" in (late.details() or "")
    # Within the bound it is scored at its date, and the blocked device is denied.
    denied = await rpc_error(env.ledger.stub.Redeem(spend("recent", SCREENED_LATENESS - timedelta(days=1))),
                             grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    assert "blocked_device" in (denied.details() or "")
    assert (await balance(env.ledger.stub, member)).available_points == before.available_points


async def test_a_return_counts_in_fraud_svcs_windows_at_its_return_time(screened: Screened) -> None:
    member = await regular_member(screened)
    bought = await screened.ledger.stub.RecordPurchase(
        purchase_request(member, [("grocery", 40_000, 1)], at=NOW - timedelta(days=6), receipt=f"{member}-old")
    )
    returned_at = NOW - timedelta(days=3)
    await screened.ledger.stub.RecordReturn(ledger_pb2.RecordReturnRequest(
        idempotency_key=key(f"ret-{member}"), purchase_id=bought.purchase.purchase_id, channel="pos",
        store_id="HEL-01", refund=common_pb2.Money(amount_minor=10_000, currency="EUR"), return_time=ts(returned_at),
    ))  # fmt: skip

    probe = await _features(screened, TxContext(f"probe-{member}", TxKind.REDEMPTION, member,
                                                NOW + timedelta(seconds=1), points=10))  # fmt: skip
    assert (probe["member_returns_24h"], probe["member_returns_7d"]) == (0, 1)


async def test_a_return_time_ahead_of_the_clock_or_before_the_purchase_is_refused(screened: Screened) -> None:
    member = await regular_member(screened, visits=2)
    bought = await screened.ledger.stub.RecordPurchase(
        purchase_request(member, [("grocery", 40_000, 1)], at=NOW - timedelta(days=1), receipt=f"{member}-r")
    )

    def back(name: str, at: timedelta) -> ledger_pb2.RecordReturnRequest:
        return ledger_pb2.RecordReturnRequest(
            idempotency_key=key(f"{name}-{member}"), purchase_id=bought.purchase.purchase_id, channel="pos",
            store_id="HEL-01", refund=common_pb2.Money(amount_minor=10_000, currency="EUR"), return_time=ts(NOW + at),
        )  # fmt: skip

    ahead = await rpc_error(screened.ledger.stub.RecordReturn(back("ahead", timedelta(hours=1))),
                            grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    early = await rpc_error(screened.ledger.stub.RecordReturn(back("early", -timedelta(days=2))),
                            grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    assert (error_field(ahead), error_field(early)) == ("return_time", "return_time")
    assert "before the purchase's receipt time" in (early.details() or "")
    # The early one wrote nothing and gave its key back: corrected, it goes through.
    fixed = await screened.ledger.stub.RecordReturn(back("early", -timedelta(hours=1)))
    assert fixed.purchase.refunded_minor == 10_000 and not fixed.replayed


async def test_purchases_and_redemptions_let_through_while_fraud_svc_was_down_reach_its_windows_later(
    screened: Screened,
) -> None:
    member = await regular_member(screened, visits=4)
    await screened.stop_fraud()
    bought = await screened.ledger.stub.RecordPurchase(
        purchase_request(member, [("grocery", 5_000, 1)], at=NOW, receipt=f"down-{member}")
    )
    spent = await screened.ledger.stub.Redeem(ledger_pb2.RedeemRequest(
        idempotency_key=key(f"down-{member}"), member_id=member, unit="points", points=300,
    ))  # fmt: skip
    assert not bought.purchase.screening.scored and not spent.screening.scored
    await screened.start_fraud()
    await tell_until_told(screened, member)
    await screened.ledger.app.service.run_maintenance()  # told once, however often the pass runs

    probe = await _features(screened, TxContext(f"probe-{member}", TxKind.REDEMPTION, member,
                                                NOW + timedelta(seconds=1), points=10))  # fmt: skip
    # The probe, a redemption of 10, counts itself in with the one of 300.
    assert (probe["member_redemptions_24h"], probe["member_redeemed_points_24h"]) == (2, 310)
    assert probe["member_purchases_24h"] == 1
