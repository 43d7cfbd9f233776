"""A purchase whose earn fraud review rejects (or ops reverses) no longer counts toward the
member's tier: the tier credits come off its month as a return's would, once, so a burst of
fraudulent purchases cannot buy a tier the member keeps after the points are taken back."""

from __future__ import annotations

from datetime import timedelta

import pytest

from pointmesh.v1 import ledger_pb2
from tests.ledger.helpers import create_member, key
from tests.mesh.helpers import purchase_request
from tests.screening.test_fraud_on_the_path import NOW, Screened, _decide


async def _burst_ending_in_a_held_big_purchase(
    env: Screened, category: str = "grocery"
) -> tuple[str, ledger_pb2.Purchase]:
    env.clock.set(NOW - timedelta(days=200))
    member = (await create_member(env.ledger.stub)).member_id
    env.clock.set(NOW)
    last = ledger_pb2.Purchase()
    for i in range(9):  # eight small ones, then a big one: the velocity rule sends it to review
        request = purchase_request(member, [(category if i == 8 else "grocery", 30_000 if i == 8 else 1_000, 1)],
                                   at=NOW - timedelta(minutes=20) + timedelta(seconds=30 * i),
                                   receipt=f"burst-{member}-{i}")  # fmt: skip
        request.context.card_hash = f"card-{member}"
        last = (await env.ledger.stub.RecordPurchase(request)).purchase
    assert last.screening.review_id and last.tier_after != last.tier_before, last
    return member, last


async def _next_purchase_tier(env: Screened, member: str, receipt: str) -> tuple[str, str]:
    env.clock.advance(timedelta(hours=2))
    request = purchase_request(member, [("grocery", 1_000, 1)], at=env.clock.now(), receipt=receipt)
    got = (await env.ledger.stub.RecordPurchase(request)).purchase
    return got.tier_before, got.tier_after


async def test_a_rejected_review_takes_the_tier_credits_off_the_members_qualification(screened: Screened) -> None:
    env = screened
    member, held = await _burst_ending_in_a_held_big_purchase(env)
    first_tier = held.tier_before

    await env.ledger.stub.DecideReview(_decide(held.screening.review_id, False))

    assert await _next_purchase_tier(env, member, f"after-{member}") == (first_tier, first_tier)
    returned = await env.ledger.stub.RecordReturn(ledger_pb2.RecordReturnRequest(
        idempotency_key=key(), purchase_id=held.purchase_id, channel="pos", store_id="HEL-01",
        lines=[ledger_pb2.ReturnLine(line_index=0, quantity=1)]))  # fmt: skip
    assert list(returned.reversed) == []  # nothing left to take back, and nothing comes off twice
    assert await _next_purchase_tier(env, member, f"after2-{member}") == (first_tier, first_tier)


async def test_an_ops_reversal_of_a_purchase_earn_lowers_the_tier_like_a_return(screened: Screened) -> None:
    env = screened
    member, held = await _burst_ending_in_a_held_big_purchase(env)
    first_tier = held.tier_before
    await env.ledger.stub.DecideReview(_decide(held.screening.review_id, True))  # approved: it counts
    assert (await _next_purchase_tier(env, member, f"kept-{member}"))[1] == held.tier_after

    for tx_id in held.earn_transactions.values():
        await env.ledger.stub.Reverse(ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=tx_id, full=True))

    assert (await _next_purchase_tier(env, member, f"reversed-{member}"))[1] == first_tier


async def _boost_now(env: Screened, member: str, receipt: str) -> int:
    env.clock.advance(timedelta(minutes=30))
    request = purchase_request(member, [("boost", 400, 1)], at=env.clock.now(), receipt=receipt)
    got = (await env.ledger.stub.RecordPurchase(request)).purchase
    return sum(p.part.points for p in got.parts if p.part.rule_id == "boost" and p.part.unit == "points")


@pytest.mark.parametrize("taken_back_by", ["rejected review", "ops reversal"])
async def test_a_capped_bonus_taken_back_whole_gives_the_day_cap_back(screened: Screened, taken_back_by: str) -> None:
    """boost is x5 with a day cap of 50: the held purchase used the cap up. Taken back whole
    (the review rejected, or ops reversing the earn in full) the member kept none of it, so the
    same day's next boost earns again, as after a return."""
    env = screened
    member, held = await _burst_ending_in_a_held_big_purchase(env, "boost")
    assert [p.part.points for p in held.parts if p.part.rule_id == "boost" and p.part.unit == "points"] == [50]
    if taken_back_by == "rejected review":
        await env.ledger.stub.DecideReview(_decide(held.screening.review_id, False))
    else:
        await env.ledger.stub.DecideReview(_decide(held.screening.review_id, True))
        for tx_id in held.earn_transactions.values():
            await env.ledger.stub.Reverse(
                ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=tx_id, full=True)
            )
    assert await _boost_now(env, member, f"boost-{member}") == 16
    returned = await env.ledger.stub.RecordReturn(ledger_pb2.RecordReturnRequest(
        idempotency_key=key(), purchase_id=held.purchase_id, channel="pos", store_id="HEL-01",
        lines=[ledger_pb2.ReturnLine(line_index=0, quantity=1)]))  # fmt: skip
    assert list(returned.reversed) == []  # nothing left to take back: the cap is not given back twice
    assert await _boost_now(env, member, f"boost2-{member}") == 16
    assert await _boost_now(env, member, f"boost3-{member}") == 16
    assert await _boost_now(env, member, f"boost4-{member}") == 2  # 16 * 3 + 2: the day's 50
