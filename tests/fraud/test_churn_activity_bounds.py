"""ChurnScore and Offers refuse activity no ledger could have sent, with INVALID_ARGUMENT and a
field violation naming the field, as Score does. Before, only negative counts were refused (on
"activity", not the field), and a last purchase in year 1 (740,000 days ago), 2**62 purchases,
a 30-day count above the 90-day one, spend with no purchase, a balance past 10**15 or an as_of
in year 9999 were scored as if they described a member."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2

from fraud_svc.domain import FUTURE_SKEW
from pointmesh.bounds import MAX_AMOUNT_MINOR, MAX_POINTS
from pointmesh.errors import status_details
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import fraud_pb2, fraud_pb2_grpc
from tests.fraud.conftest import NOW

YEAR_1 = Timestamp(seconds=-62135596800 + 86_400)  # 0001-01-02
YEAR_9999 = Timestamp(seconds=253402300000)  # 9999-12-31
MAX_PURCHASES = 365 * 86_400  # one a second all year (fraud_svc.churn.MAX_PURCHASES)


def member(**fields: object) -> fraud_pb2.MemberActivity:
    base: dict[str, object] = {
        "member_id": "m_drift", "member_since": to_timestamp(NOW - timedelta(days=900)),
        "last_purchase_at": to_timestamp(NOW - timedelta(days=80)), "purchases_30d": 0, "purchases_90d": 1,
        "purchases_365d": 14, "spend_90d_minor": 60_000, "balance_points": 5200,
        "last_redemption_at": to_timestamp(NOW - timedelta(days=200)), "segment": "regular", "tier": "silver",
    }  # fmt: skip
    base.update(fields)
    return fraud_pb2.MemberActivity(**base)  # type: ignore[arg-type]


CASES = [
    pytest.param("activity.purchases_30d", {"purchases_30d": -1}, id="negative-30d"),
    pytest.param("activity.purchases_90d", {"purchases_90d": -5}, id="negative-90d"),
    pytest.param("activity.purchases_365d", {"purchases_365d": 2**62}, id="absurd-365d"),
    pytest.param("activity.purchases_30d", {"purchases_30d": MAX_PURCHASES + 1, "purchases_90d": MAX_PURCHASES + 1,
                                            "purchases_365d": MAX_PURCHASES + 1}, id="past-one-a-second"),
    pytest.param("activity.purchases_30d", {"purchases_30d": 10, "purchases_90d": 3}, id="30d-above-90d"),
    pytest.param("activity.purchases_90d", {"purchases_90d": 50, "purchases_365d": 20}, id="90d-above-365d"),
    pytest.param("activity.spend_90d_minor", {"spend_90d_minor": -1}, id="negative-spend"),
    pytest.param("activity.spend_90d_minor", {"spend_90d_minor": MAX_AMOUNT_MINOR + 1}, id="spend-past-bound"),
    pytest.param("activity.spend_90d_minor", {"purchases_30d": 0, "purchases_90d": 0}, id="spend-without-purchase"),
    pytest.param("activity.balance_points", {"balance_points": MAX_POINTS + 1}, id="balance-past-bound"),
    pytest.param("activity.balance_points", {"balance_points": -MAX_POINTS - 1}, id="negative-balance-past-bound"),
    pytest.param("activity.balance_points", {"balance_points": 2**63 - 1}, id="balance-int64-max"),
    pytest.param("activity.last_purchase_at", {"last_purchase_at": YEAR_1}, id="last-purchase-in-year-1"),
    pytest.param("activity.last_purchase_at", {"last_purchase_at": to_timestamp(NOW + timedelta(days=1))},
                 id="last-purchase-after-as-of"),
    pytest.param("activity.member_since", {"member_since": to_timestamp(datetime(1969, 12, 31, tzinfo=UTC))},
                 id="member-before-1970"),
    pytest.param("activity.last_redemption_at", {"last_redemption_at": YEAR_9999}, id="redemption-in-year-9999"),
    pytest.param("activity.member_id", {"member_id": "m" * 129}, id="member-id-too-long"),
]  # fmt: skip


@pytest.mark.parametrize("rpc", ["ChurnScore", "Offers"])
@pytest.mark.parametrize(("field", "fields"), CASES)
async def test_absurd_activity_is_refused_on_its_field(
    stub: fraud_pb2_grpc.FraudServiceStub, rpc: str, field: str, fields: dict[str, object]
) -> None:
    await refused_on(stub, rpc, field, member(**fields), to_timestamp(NOW))


@pytest.mark.parametrize("rpc", ["ChurnScore", "Offers"])
async def test_an_as_of_ahead_of_the_clock_is_refused(stub: fraud_pb2_grpc.FraudServiceStub, rpc: str) -> None:
    await refused_on(stub, rpc, "as_of", member(), YEAR_9999)
    # The last second a Timestamp holds: as_of plus the skew is past what a datetime holds.
    await refused_on(stub, rpc, "as_of", member(), Timestamp(seconds=253402300799))
    await refused_on(stub, rpc, "as_of", member(), to_timestamp(NOW + FUTURE_SKEW + timedelta(seconds=1)))


async def refused_on(
    stub: fraud_pb2_grpc.FraudServiceStub, rpc: str, field: str, activity: fraud_pb2.MemberActivity,
    as_of: Timestamp,
) -> None:  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if rpc == "ChurnScore":
            await stub.ChurnScore(fraud_pb2.ChurnScoreRequest(activity=activity, as_of=as_of))
        else:
            await stub.Offers(fraud_pb2.OffersRequest(activity=activity, as_of=as_of))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details().startswith(f"{field}: "), caught.value.details()
    found = [d for d in status_details(caught.value) if isinstance(d, error_details_pb2.BadRequest)]
    assert [[v.field for v in d.field_violations] for d in found] == [[field]]


async def test_the_largest_plausible_activity_is_scored_and_offered(stub: fraud_pb2_grpc.FraudServiceStub) -> None:
    """The bounds are inclusive: a member at every limit at once still gets an answer."""
    most = member(
        member_since=to_timestamp(datetime(1970, 1, 1, tzinfo=UTC)), last_purchase_at=to_timestamp(NOW + FUTURE_SKEW),
        purchases_30d=MAX_PURCHASES, purchases_90d=MAX_PURCHASES, purchases_365d=MAX_PURCHASES,
        spend_90d_minor=MAX_AMOUNT_MINOR, balance_points=-MAX_POINTS, last_redemption_at=to_timestamp(NOW),
    )  # fmt: skip
    as_of = to_timestamp(NOW + FUTURE_SKEW)
    churn = await stub.ChurnScore(fraud_pb2.ChurnScoreRequest(activity=most, as_of=as_of))
    assert 0.0 <= churn.probability <= 1.0
    offers = await stub.Offers(fraud_pb2.OffersRequest(activity=most, as_of=as_of))
    assert offers.member_id == "m_drift"
    quiet = member(last_purchase_at=None, last_redemption_at=None, purchases_30d=0, purchases_90d=0,
                   purchases_365d=0, spend_90d_minor=0, balance_points=MAX_POINTS)  # fmt: skip
    got = await stub.ChurnScore(fraud_pb2.ChurnScoreRequest(activity=quiet, as_of=to_timestamp(NOW)))
    assert got.member_id == "m_drift"
