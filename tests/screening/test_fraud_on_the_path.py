"""Fraud screening end to end: rules_svc, fraud_svc (a LightGBM model trained here on generated
data, Redis velocity state) and ledger_svc as real gRPC servers on loopback.

Purchases and redemptions are scored before they post; review holds the points (pending
credit or a hold) with a review item and an ops alert; ops approves or rejects; a fraud_svc
that is down leaves the configured policy in charge and loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from fraud_svc import service as fraud_service
from fraud_svc.app import FraudApp
from fraud_svc.app import build as build_fraud
from fraud_svc.domain import TxContext, TxKind
from fraud_svc.features import FeatureRow, featurize
from fraud_svc.velocity_redis import RedisVelocity
from ledger_svc.domain import FailedPrecondition
from ledger_svc.screening import ObservationBacklog, ScreeningRequest
from pointmesh.clock import ManualClock
from pointmesh.config import load_settings
from pointmesh.events import OPS_ALERTS, RedisStreamBus
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import common_pb2, ledger_pb2, rules_pb2
from tests.conftest import LedgerUnderTest, RulesUnderTest, start_ledger, start_rules, stop_ledger, stop_rules
from tests.ledger.helpers import balance, create_member, key, rpc_error, ts
from tests.mesh.helpers import purchase_request
from tests.waiting import until

PROGRAM = Path(__file__).parent.parent / "mesh" / "program.yaml"
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


@dataclass
class Screened:
    rules: RulesUnderTest
    ledger: LedgerUnderTest
    fraud: FraudApp | None
    clock: ManualClock
    fraud_port: int
    models: Path
    redis_url: str

    async def stop_fraud(self) -> None:
        assert self.fraud is not None
        await self.fraud.stop(grace=0.5)
        self.fraud = None

    async def start_fraud(self, decision_file: Path | None = None, clock: ManualClock | None = None) -> None:
        """fraud_svc on its port, on the default decisions or those of `decision_file`, on the
        mesh's clock or (a host whose clock differs) `clock`."""
        settings = load_settings({}, redis_url=self.redis_url, models_dir=str(self.models),
                                 fraud_addr=f"127.0.0.1:{self.fraud_port}", grace_seconds=0.5,
                                 **({"fraud_decision_file": str(decision_file)} if decision_file else {}))  # fmt: skip
        self.fraud = await build_fraud(settings, clock=clock or self.clock)
        await self.fraud.start()


@contextlib.asynccontextmanager
async def screened_mesh(
    tmp_path: Path, redis_server: RedisServer, fraud_models: Path, **ledger_overrides: object
) -> AsyncIterator[Screened]:
    """rules_svc, fraud_svc (a copy of the session's trained models) and a screening ledger."""
    clock = ManualClock(NOW)
    models = tmp_path / "models"
    shutil.copytree(fraud_models, models)
    rules_port = free_port()
    rules = await start_rules(tmp_path / "rules", clock, rules_addr=f"127.0.0.1:{rules_port}",
                              rules_seed_file=str(PROGRAM))  # fmt: skip
    env = Screened(rules, None, None, clock, free_port(), models, redis_server.url)  # type: ignore[arg-type]
    await env.start_fraud()
    env.ledger = await start_ledger(
        tmp_path / "ledger", redis_server.url, clock, rules_addr=f"127.0.0.1:{rules_port}", program="meshmart",
        rules_deadline_seconds=2.0, fraud_screening=True, fraud_addr=f"127.0.0.1:{env.fraud_port}",
        fraud_deadline_seconds=2.0, fraud_large_redemption_points=2000, **ledger_overrides,
    )  # fmt: skip
    try:
        yield env
    finally:
        await stop_ledger(env.ledger)
        if env.fraud is not None:
            await env.fraud.stop(grace=0.5)
        await stop_rules(rules)


async def regular_member(env: Screened, visits: int = 12) -> str:
    """A member who joined months ago and has shopped in the same store every few days since."""
    env.clock.set(NOW - timedelta(days=4 * visits + 30))
    member = (await create_member(env.ledger.stub)).member_id
    for i in range(visits):
        at = env.clock.advance(timedelta(days=4))
        got = await env.ledger.stub.RecordPurchase(
            purchase_request(member, [("grocery", 30_000, 1)], at=at, receipt=f"{member}-{i}")
        )
        assert got.purchase.screening.verdict == ledger_pb2.SCREENING_VERDICT_ALLOW, got.purchase.screening
        assert got.purchase.screening.scored
    env.clock.set(NOW)
    return member


def takeover(member: str, points: int, device: str) -> ledger_pb2.RedeemRequest:
    """The account-takeover shape: contact details changed an hour ago, a device never seen,
    most of the balance redeemed in the app."""
    return ledger_pb2.RedeemRequest(
        idempotency_key=key(f"ato-{member}"), member_id=member, unit="points", points=points, business_time=ts(NOW),
        context=ledger_pb2.ScreeningContext(channel="app", device_id=device, ip="203.0.113.7",
                                            contact_changed_at=ts(NOW - timedelta(hours=1))),
    )  # fmt: skip


async def kept_for(redis_url: str, backlog: ObservationBacklog, *members: str) -> list[bytes]:
    """The backlog's entries about any of `members`: kept, or taken by a pass that has not put
    them back yet."""
    redis = Redis.from_url(redis_url)
    try:
        entries = [*await redis.lrange(backlog.key, 0, -1), *await redis.hvals(backlog.leases_key)]
    finally:
        await redis.aclose()
    return [entry for entry in entries if any(m.encode() in entry for m in members)]


async def tell_until_told(env: Screened, *members: str) -> None:
    """Runs the ledger's maintenance pass until nothing kept for `members` is left in the
    backlog. fraud_svc restarted is not reached at once: the ledger's breaker waits a second
    after a failure, and its channel retries on a backoff of its own (1 s, then 1.6 s)."""
    screen = env.ledger.app.service.fraud
    assert screen is not None and screen.backlog is not None
    backlog = screen.backlog

    async def told() -> bool:
        await env.ledger.app.service.run_maintenance()
        return not await kept_for(env.redis_url, backlog, *members)

    await until(told, 30, pause=0.2)


async def alerts_for(env: Screened, review_id: str) -> list[common_pb2.OpsAlert]:
    """The ops alerts about one review, read from the start of the alert stream."""
    bus = RedisStreamBus(Redis.from_url(env.redis_url), owns_client=True)
    found: list[common_pb2.OpsAlert] = []
    try:
        async with asyncio.timeout(10):
            async for message in bus.subscribe(OPS_ALERTS, "0", block_ms=200):
                alert = common_pb2.OpsAlert.FromString(message.payload)
                if alert.subject_id == review_id:
                    found.append(alert)
                    return found
    finally:
        await bus.close()
    return found


async def test_regular_purchases_pass_and_a_takeover_redemption_is_held_with_an_alert_then_approved(
    screened: Screened,
) -> None:
    member = await regular_member(screened)
    before = await balance(screened.ledger.stub, member)
    assert before.available_points > 3000
    held = await screened.ledger.stub.Redeem(takeover(member, before.available_points - 100, "phone-new-1"))
    assert held.screening.verdict == ledger_pb2.SCREENING_VERDICT_REVIEW, held.screening
    assert held.screening.scored and held.screening.review_id and not held.HasField("transaction")
    assert held.hold.points == before.available_points - 100
    during = await balance(screened.ledger.stub, member)
    assert (during.balance_points, during.reserved_points) == (before.balance_points, held.hold.points)
    # The same request again is a replay, not a second hold or a second score.
    again = await screened.ledger.stub.Redeem(takeover(member, before.available_points - 100, "phone-new-1"))
    assert again.hold.hold_id == held.hold.hold_id

    alerts = await alerts_for(screened, held.screening.review_id)
    assert [a.kind for a in alerts] == ["redemption_held"]
    assert alerts[0].member_id == member and alerts[0].severity == "high"
    listed = await screened.ledger.stub.ListReviews(ledger_pb2.ListReviewsRequest(member_id=member))
    assert [r.review_id for r in listed.reviews] == [held.screening.review_id]
    # The POS cannot capture a hold that is under review.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await screened.ledger.stub.CaptureHold(
            ledger_pb2.CaptureHoldRequest(idempotency_key=key("pos-capture"), hold_id=held.hold.hold_id)
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "under fraud review" in (refused.value.details() or "")

    decided = await screened.ledger.stub.DecideReview(ledger_pb2.DecideReviewRequest(
        idempotency_key=key("approve-1"), review_id=held.screening.review_id, approve=True, operator_id="ops-anna",
        note="member confirmed by phone",
    ))  # fmt: skip
    assert decided.review.status == ledger_pb2.REVIEW_STATUS_APPROVED
    assert decided.review.decided_by == "ops-anna" and len(decided.review.outcome_transaction_ids) == 1
    after = await balance(screened.ledger.stub, member)
    assert (after.balance_points, after.reserved_points) == (100, 0)
    hold = await screened.ledger.stub.GetHold(ledger_pb2.GetHoldRequest(hold_id=held.hold.hold_id))
    assert hold.hold.status == ledger_pb2.HOLD_STATUS_CAPTURED
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await screened.ledger.stub.DecideReview(ledger_pb2.DecideReviewRequest(
            idempotency_key=key("approve-2"), review_id=held.screening.review_id, approve=False, operator_id="ops-ben",
        ))  # fmt: skip
    assert twice.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already approved by ops-anna" in (twice.value.details() or "")
    assert not (await screened.ledger.stub.ListReviews(ledger_pb2.ListReviewsRequest(member_id=member))).reviews


async def test_rejecting_a_held_redemption_voids_the_hold_and_the_points_stay(screened: Screened) -> None:
    member = await regular_member(screened)
    before = await balance(screened.ledger.stub, member)
    held = await screened.ledger.stub.Redeem(takeover(member, before.available_points - 50, "phone-new-2"))
    assert held.screening.verdict == ledger_pb2.SCREENING_VERDICT_REVIEW
    await screened.ledger.stub.DecideReview(ledger_pb2.DecideReviewRequest(
        idempotency_key=key("reject-1"), review_id=held.screening.review_id, approve=False, operator_id="ops-anna",
    ))  # fmt: skip
    after = await balance(screened.ledger.stub, member)
    assert (after.balance_points, after.reserved_points, after.available_points) == (before.balance_points, 0,
                                                                                     before.available_points)  # fmt: skip
    hold = await screened.ledger.stub.GetHold(ledger_pb2.GetHoldRequest(hold_id=held.hold.hold_id))
    assert hold.hold.status == ledger_pb2.HOLD_STATUS_VOIDED


async def test_a_held_redemption_or_credit_of_a_member_blocked_meanwhile_is_not_approved(screened: Screened) -> None:
    """A takeover confirmed while the redemption waited: the member is blocked, and approving
    would spend a blocked member's points (or release a blocked member's credit, when blocked
    members cannot earn). Refused, as a transfer's is; the points stay reserved and ops rejects."""
    stub = screened.ledger.stub
    member = await regular_member(screened)
    before = await balance(stub, member)
    held = await stub.Redeem(takeover(member, before.available_points - 50, "phone-new-3"))
    assert held.screening.verdict == ledger_pb2.SCREENING_VERDICT_REVIEW
    credit = await _held_purchase(screened)
    for blocked in (member, credit.member_id):
        await stub.BlockMember(
            ledger_pb2.BlockMemberRequest(idempotency_key=key(), member_id=blocked, reason="takeover")
        )

    for review_id, blocked in ((held.screening.review_id, member), (credit.screening.review_id, credit.member_id)):
        refused = await rpc_error(stub.DecideReview(_decide(review_id, True)), grpc.StatusCode.FAILED_PRECONDITION)
        assert f"member {blocked} is BLOCKED; reject the review" in (refused.details() or "")
    assert (await balance(stub, member)).reserved_points == before.available_points - 50
    pending = (await balance(stub, credit.member_id)).pending_points
    assert pending > 0
    for review_id in (held.screening.review_id, credit.screening.review_id):
        rejected = await stub.DecideReview(_decide(review_id, False))
        assert rejected.review.status == ledger_pb2.REVIEW_STATUS_REJECTED
    after = await balance(stub, member)
    assert (after.balance_points, after.reserved_points) == (before.balance_points, 0)
    assert (await balance(stub, credit.member_id)).pending_points < pending


async def _burst(env: Screened) -> list[ledger_pb2.Purchase]:
    """Ten purchases of a months-old member within five minutes, one card: the velocity rule
    reviews the 9th and later within 10 minutes."""
    env.clock.set(NOW - timedelta(days=200))
    member = (await create_member(env.ledger.stub)).member_id
    env.clock.set(NOW)
    bought = []
    for i in range(10):
        request = purchase_request(
            member, [("grocery", 1_000, 1)], at=NOW - timedelta(minutes=20) + timedelta(seconds=30 * i),
            receipt=f"burst-{member}-{i}",
        )  # fmt: skip
        request.context.card_hash = f"card-{member}"
        bought.append((await env.ledger.stub.RecordPurchase(request)).purchase)
    return bought


async def test_a_purchase_burst_earns_as_pending_credit_under_review_until_approved(screened: Screened) -> None:
    burst = await _burst(screened)
    member = burst[-1].member_id
    verdicts = [p.screening.verdict for p in burst]
    assert verdicts[:8] == [ledger_pb2.SCREENING_VERDICT_ALLOW] * 8
    assert verdicts[8:] == [ledger_pb2.SCREENING_VERDICT_REVIEW] * 2
    held = burst[-1]
    assert "rule:velocity_member_purchases_10m" in held.screening.reasons
    assert held.status == ledger_pb2.PURCHASE_STATUS_EARNED
    pending = await balance(screened.ledger.stub, member)
    held_points = sum(u.points for u in held.earned if u.unit == "points")
    assert pending.pending_points == 2 * held_points
    decided = await screened.ledger.stub.DecideReview(ledger_pb2.DecideReviewRequest(
        idempotency_key=key("approve-burst"), review_id=held.screening.review_id, approve=True, operator_id="ops-c",
    ))  # fmt: skip
    # Both units the purchase earned (points and tier_credits) are released by one decision.
    assert len(decided.review.outcome_transaction_ids) == 2
    after = await balance(screened.ledger.stub, member)
    assert (after.pending_points, after.balance_points) == (held_points, pending.balance_points + held_points)


async def test_a_burst_ingested_in_one_batch_is_scored_in_event_time_order(screened: Screened) -> None:
    """IngestBatch screens with one ScoreBatch: the velocity rule sees the burst in receipt
    order (the stream is shuffled), exactly as one RecordPurchase after another would. (Three
    days and a store away from the unary burst test, whose velocity state shares this Redis.)"""
    screened.clock.set(NOW - timedelta(days=200))
    member = (await create_member(screened.ledger.stub)).member_id
    screened.clock.set(NOW)
    burst = []
    for i in range(10):
        request = purchase_request(
            member, [("grocery", 1_000, 1)], at=NOW - timedelta(days=3, minutes=20) + timedelta(seconds=30 * i),
            receipt=f"batch-burst-{member}-{i}", store="LIS-01",
        )  # fmt: skip
        request.context.card_hash = f"card-{member}"
        burst.append(request)
    shuffled = burst[5:] + burst[:5]

    async def stream():  # type: ignore[no-untyped-def]
        for request in shuffled:
            yield ledger_pb2.IngestBatchRequest(purchase=request)

    response = await screened.ledger.stub.IngestBatch(stream())
    verdicts = {shuffled[p.index].receipt_id: p.verdict for p in response.purchases}
    in_receipt_order = [verdicts[r.receipt_id] for r in burst]
    assert in_receipt_order == [ledger_pb2.SCREENING_VERDICT_ALLOW] * 8 + [ledger_pb2.SCREENING_VERDICT_REVIEW] * 2
    held = [p for p in response.purchases if p.verdict == ledger_pb2.SCREENING_VERDICT_REVIEW]
    after = await balance(screened.ledger.stub, member)
    assert after.pending_points == sum(p.earned["points"] for p in held) > 0
    assert after.balance_points + after.pending_points == sum(p.earned["points"] for p in response.purchases)


class RecordingScreener:
    """Passes every request to the real fraud_svc client and keeps what each was scored on."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.seen: list[ScreeningRequest] = []

    async def screen(self, request: ScreeningRequest) -> Any:
        self.seen.append(request)
        return await self.real.screen(request)

    async def screen_many(self, requests: Sequence[ScreeningRequest]) -> Any:
        self.seen.extend(requests)
        return await self.real.screen_many(requests)


async def test_a_batch_purchase_after_a_held_one_is_scored_on_the_balance_it_meets(screened: Screened) -> None:
    """A batch predicts each purchase's balance from the member's earlier ones in the chunk; one
    fraud_svc held for review earns pending points, not spendable ones, so the purchases after
    it must be scored on the balance without them, as purchase by purchase (fraud_svc reviews
    every purchase here: its purchase thresholds are put at zero)."""
    screened.clock.set(NOW - timedelta(days=100))
    member = (await create_member(screened.ledger.stub)).member_id
    screened.clock.set(NOW)
    assert screened.fraud is not None
    screened.fraud.service.configure({"thresholds": {"purchase": {"review": 0.0, "deny": 1.0}}})
    fraud = screened.ledger.app.service.fraud
    assert fraud is not None
    recording = RecordingScreener(fraud.screener)
    fraud.screener = recording
    at = NOW - timedelta(hours=2)
    purchases = [purchase_request(member, [("grocery", amount, 1)], at=at + timedelta(minutes=k),
                                  receipt=f"after-held-{member}-{k}", store="LIS-01")
                 for k, amount in enumerate([1_000, 4_000, 3_000])]  # fmt: skip

    response = await screened.ledger.stub.IngestBatch(aiter_of(ledger_pb2.IngestBatchRequest(purchase=p)
                                                               for p in purchases))  # fmt: skip

    answered = sorted(response.purchases, key=lambda p: p.index)
    assert [p.verdict for p in answered] == [ledger_pb2.SCREENING_VERDICT_REVIEW] * 3
    for k in (1, 2):
        scored = [r for r in recording.seen if r.event_id == answered[k].purchase_id]
        assert scored[-1].balance_points == 0, (k, [r.balance_points for r in scored])


async def aiter_of(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def test_with_fraud_svc_down_the_policy_decides_and_nothing_is_lost(screened: Screened) -> None:
    member = await regular_member(screened, visits=4)
    start = await balance(screened.ledger.stub, member)
    await screened.stop_fraud()
    bought = await screened.ledger.stub.RecordPurchase(
        purchase_request(member, [("grocery", 5_000, 1)], at=NOW, receipt=f"down-{member}")
    )
    assert bought.purchase.status == ledger_pb2.PURCHASE_STATUS_EARNED
    assert bought.purchase.screening.verdict == ledger_pb2.SCREENING_VERDICT_ALLOW
    assert not bought.purchase.screening.scored
    assert bought.purchase.screening.reasons == ["unscored:fraud_svc_unavailable:allow"]
    small = await screened.ledger.stub.Redeem(ledger_pb2.RedeemRequest(
        idempotency_key=key(f"small-{member}"), member_id=member, unit="points", points=500,
    ))  # fmt: skip
    assert small.HasField("transaction") and not small.screening.scored
    large = await screened.ledger.stub.Redeem(ledger_pb2.RedeemRequest(
        idempotency_key=key(f"large-{member}"), member_id=member, unit="points", points=2_000,
    ))  # fmt: skip
    assert large.HasField("hold") and large.screening.verdict == ledger_pb2.SCREENING_VERDICT_REVIEW
    assert not large.screening.scored and large.screening.review_id
    earned = sum(u.points for u in bought.purchase.earned if u.unit == "points")
    now = await balance(screened.ledger.stub, member)
    assert now.balance_points == start.balance_points + earned - 500
    assert now.reserved_points == 2_000

    await screened.start_fraud()
    # Back up: the next purchase is scored again.
    later = await screened.ledger.stub.RecordPurchase(
        purchase_request(member, [("grocery", 2_000, 1)], at=NOW + timedelta(seconds=5), receipt=f"up-{member}")
    )
    assert later.purchase.screening.scored or later.purchase.screening.reasons[0].startswith("unscored")


async def _held_purchase(env: Screened) -> ledger_pb2.Purchase:
    """A member's tenth purchase within minutes: the velocity rule sends it to review."""
    held = (await _burst(env))[-1]
    assert held.screening.verdict == ledger_pb2.SCREENING_VERDICT_REVIEW
    return held


def _decide(review_id: str, approve: bool) -> ledger_pb2.DecideReviewRequest:
    return ledger_pb2.DecideReviewRequest(idempotency_key=key(), review_id=review_id, approve=approve,
                                          operator_id="ops-d")  # fmt: skip


@pytest.mark.parametrize("approve", [True, False])
async def test_a_review_of_a_purchase_returned_meanwhile_can_still_be_decided(
    screened: Screened, approve: bool
) -> None:
    held = await _held_purchase(screened)
    before = await balance(screened.ledger.stub, held.member_id)
    await screened.ledger.stub.RecordReturn(ledger_pb2.RecordReturnRequest(
        idempotency_key=key(), purchase_id=held.purchase_id, channel="pos", store_id="HEL-01",
        lines=[ledger_pb2.ReturnLine(line_index=0, quantity=1)],
    ))  # fmt: skip
    decided = await screened.ledger.stub.DecideReview(_decide(held.screening.review_id, approve))
    assert decided.review.outcome_transaction_ids == []  # nothing left to release or take back
    after = await balance(screened.ledger.stub, held.member_id)
    held_points = sum(u.points for u in held.earned if u.unit == "points")
    assert (after.balance_points, after.pending_points) == (before.balance_points, before.pending_points - held_points)
    listed = await screened.ledger.stub.ListReviews(ledger_pb2.ListReviewsRequest())
    assert held.screening.review_id not in {r.review_id for r in listed.reviews}


async def test_release_pending_does_not_bypass_a_fraud_review(screened: Screened) -> None:
    held = await _held_purchase(screened)
    before = await balance(screened.ledger.stub, held.member_id)
    error = await rpc_error(
        screened.ledger.stub.ReleasePending(
            ledger_pb2.ReleasePendingRequest(
                idempotency_key=key(),
                transaction_id=held.earn_transactions["points"],
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert f"held by fraud review {held.screening.review_id}" in error.details()
    after = await balance(screened.ledger.stub, held.member_id)
    assert (after.pending_points, after.balance_points) == (before.pending_points, before.balance_points)
    assert after.pending_points >= sum(u.points for u in held.earned if u.unit == "points")


async def test_an_approved_review_keeps_the_return_window(screened: Screened) -> None:
    """Approval clears the fraud hold, not the program's wait before points become spendable."""
    screened.clock.set(NOW - timedelta(days=1))  # publishing ahead of the purchases it prices
    document = PROGRAM.read_text().replace("policy:\n", "policy:\n  release_after_days: 14\n", 1)
    await screened.rules.stub.PublishProgram(rules_pb2.PublishProgramRequest(
        idempotency_key=key("two-week-window"), document=document, effective_from=ts(NOW - timedelta(hours=1)),
    ))  # fmt: skip
    held = await _held_purchase(screened)
    before = await balance(screened.ledger.stub, held.member_id)
    assert before.pending_points > 0 and before.balance_points == 0  # every purchase waits 14 days
    reviews = await screened.ledger.stub.ListReviews(ledger_pb2.ListReviewsRequest(member_id=held.member_id))
    assert held.screening.review_id in {r.review_id for r in reviews.reviews}
    for review in reviews.reviews:
        decided = await screened.ledger.stub.DecideReview(_decide(review.review_id, True))
        assert decided.review.outcome_transaction_ids == []  # released at the date, not now
    after = await balance(screened.ledger.stub, held.member_id)
    assert (after.pending_points, after.balance_points) == (before.pending_points, 0)
    screened.clock.set(NOW + timedelta(days=15))
    await screened.ledger.app.service.run_maintenance()  # the periodic job, run now
    released = await balance(screened.ledger.stub, held.member_id)
    assert (released.pending_points, released.balance_points) == (0, before.pending_points)


async def test_a_member_with_an_open_review_is_merged_only_after_the_decision(screened: Screened) -> None:
    """Deciding a review on a merged-away member would release or take back points it no longer holds."""
    held = await _held_purchase(screened)
    target = (await create_member(screened.ledger.stub)).member_id
    merge = ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=held.member_id,
                                           target_member_id=target)  # fmt: skip
    error = await rpc_error(screened.ledger.stub.MergeMembers(merge), grpc.StatusCode.FAILED_PRECONDITION)
    assert "open fraud reviews; decide them first" in error.details()
    reviews = await screened.ledger.stub.ListReviews(ledger_pb2.ListReviewsRequest(member_id=held.member_id))
    for review in reviews.reviews:
        await screened.ledger.stub.DecideReview(_decide(review.review_id, True))
    before = await balance(screened.ledger.stub, held.member_id)
    await screened.ledger.stub.MergeMembers(
        ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=held.member_id, target_member_id=target)
    )
    merged = await balance(screened.ledger.stub, target)
    assert (merged.balance_points, merged.pending_points) == (before.balance_points, before.pending_points)


async def test_a_redemption_with_the_longest_key_is_scored_and_leaves_screening_on_for_others(
    screened: Screened,
) -> None:
    member, other = await regular_member(screened), await regular_member(screened, visits=3)
    before = await balance(screened.ledger.stub, member)
    request = takeover(member, before.available_points - 100, "phone-new-2")
    request.idempotency_key.CopyFrom(key("k" * 128, namespace="pos-0123456789ab"))  # 150 characters as an event id

    held = await screened.ledger.stub.Redeem(request)
    bought = await screened.ledger.stub.RecordPurchase(
        purchase_request(other, [("grocery", 2_000, 1)], at=NOW + timedelta(seconds=1), receipt=f"after-{other}")
    )

    assert held.screening.scored and held.screening.verdict == ledger_pb2.SCREENING_VERDICT_REVIEW, held.screening
    assert bought.purchase.screening.scored, bought.purchase.screening


async def test_a_redemption_racing_the_earn_that_funds_it_is_never_posted_unscreened(screened: Screened) -> None:
    """With fraud_svc down, large redemptions fail closed to review; one whose balance looked
    short when it was screened and was enough when it was written must be held all the same."""
    await screened.stop_fraud()
    paid_unscreened = []
    for trial in range(30):
        member = (await create_member(screened.ledger.stub)).member_id
        redeem = screened.ledger.stub.Redeem(ledger_pb2.RedeemRequest(
            idempotency_key=key(f"race-r-{trial}"), member_id=member, unit="points", points=3_000,
        ))  # fmt: skip
        earn = screened.ledger.stub.Earn(ledger_pb2.EarnRequest(
            idempotency_key=key(f"race-e-{trial}"), member_id=member, unit="points", points=10_000,
        ))  # fmt: skip
        results = await asyncio.gather(redeem, earn, return_exceptions=True)
        redeemed = results[0]
        if isinstance(redeemed, ledger_pb2.RedeemResponse) and redeemed.HasField("transaction"):
            paid_unscreened.append((trial, redeemed.screening))
        elif not isinstance(redeemed, ledger_pb2.RedeemResponse):
            assert isinstance(redeemed, grpc.aio.AioRpcError)
            assert redeemed.code() == grpc.StatusCode.FAILED_PRECONDITION, redeemed

    assert paid_unscreened == []


async def test_fraud_svc_compares_purchases_in_the_programs_base_currency(screened: Screened) -> None:
    """A 100 KWD receipt is about 301 EUR (0.332 KWD per EUR): fraud_svc's velocity sums must
    hold that, not the 100,000 fils the receipt was written in."""
    member = (await create_member(screened.ledger.stub)).member_id
    for currency, amount in (("KWD", 100_000), ("EUR", 5_000)):
        got = await screened.ledger.stub.RecordPurchase(
            purchase_request(
                member, [("grocery", amount, 1)], at=NOW, currency=currency, receipt=f"{member}-{currency}"
            )
        )
        assert got.purchase.screening.scored, got.purchase.screening
    redis = Redis.from_url(screened.redis_url)
    try:  # a probe through fraud_svc's own feature code, on the state fraud_svc wrote
        probe = TxContext(f"probe-{member}", TxKind.PURCHASE, member, NOW + timedelta(seconds=1))
        features = await featurize(probe, RedisVelocity(redis))
    finally:
        await redis.aclose()

    assert features["member_purchase_amount_1h"] == 30_120 + 5_000  # 100 KWD = 301.20 EUR, floored


async def _features(env: Screened, probe: TxContext) -> FeatureRow:
    """A probe through fraud_svc's own feature code, on the velocity state fraud_svc wrote."""
    redis = Redis.from_url(env.redis_url)
    try:
        return await featurize(probe, RedisVelocity(redis))
    finally:
        await redis.aclose()


async def test_transfers_and_returns_reach_fraud_svc_so_the_redemption_that_cashes_in_knows_them(
    screened: Screened,
) -> None:
    collector = (await create_member(screened.ledger.stub)).member_id
    for i in range(5):  # a ring: five members pass points to one
        sender = (await create_member(screened.ledger.stub)).member_id
        await screened.ledger.stub.Earn(ledger_pb2.EarnRequest(idempotency_key=key(), member_id=sender, points=300))
        await screened.ledger.stub.Transfer(ledger_pb2.TransferRequest(
            idempotency_key=key(f"ring-{collector}-{i}"), source_member_id=sender, destination_member_id=collector,
            points=250,
        ))  # fmt: skip
    screened.clock.advance(timedelta(seconds=5))  # a client retrying the last transfer a little later
    await screened.ledger.stub.Transfer(ledger_pb2.TransferRequest(
        idempotency_key=key(f"ring-{collector}-4"), source_member_id=sender, destination_member_id=collector, points=250,
    ))  # fmt: skip
    bought = await screened.ledger.stub.RecordPurchase(
        purchase_request(collector, [("grocery", 100_000, 1)], at=NOW, currency="KWD", receipt=f"{collector}-r")
    )
    await screened.ledger.stub.RecordReturn(ledger_pb2.RecordReturnRequest(
        idempotency_key=key(f"ret-{collector}"), purchase_id=bought.purchase.purchase_id, channel="pos",
        store_id="HEL-01", refund=common_pb2.Money(amount_minor=50_000, currency="KWD"),
    ))  # fmt: skip

    cash_in = await _features(screened, TxContext(f"probe-{collector}", TxKind.REDEMPTION, collector,
                                                  screened.clock.now() + timedelta(seconds=1), points=1_000))  # fmt: skip

    sender_now = await _features(screened, TxContext(f"probe-{sender}", TxKind.REDEMPTION, sender,
                                                     screened.clock.now() + timedelta(seconds=1), points=10))  # fmt: skip
    assert sender_now["member_transfers_out_24h"] == 1  # the retried transfer is the same event
    assert cash_in["member_transfers_in_24h"] == 5
    assert cash_in["member_transfer_senders_7d"] == 5
    assert cash_in["member_returns_24h"] == 1
    assert cash_in["member_return_amount_30d"] == 15_060  # 50 KWD of the 100 KWD (301.20 EUR) receipt


async def _refused_purchase_paid_with_300_points(screened: Screened, member: str, device: str) -> ledger_pb2.Purchase:
    """A purchase paid partly with 300 of the member's points, from a device fraud_svc blocks."""
    assert screened.fraud is not None
    screened.fraud.service.configure({"blocked_devices": [device]})
    paid = await screened.ledger.stub.Redeem(ledger_pb2.RedeemRequest(idempotency_key=key(), member_id=member,
                                                                      points=300))  # fmt: skip
    request = purchase_request(member, [("grocery", 6_000, 1)], at=NOW, receipt=f"{device}-{member}",
                               tender=paid.transaction.transaction_id)  # fmt: skip
    request.context.device_id = device
    return (await screened.ledger.stub.RecordPurchase(request)).purchase


async def test_points_paid_for_a_purchase_fraud_refused_come_back_when_the_goods_do(screened: Screened) -> None:
    """The purchase earned nothing (its device is blocked) but the goods were sold for 300 of
    the member's points; returning them gives the 300 back, and only once."""
    member = await regular_member(screened, visits=4)
    refused = await _refused_purchase_paid_with_300_points(screened, member, "dv-refused-tender")
    assert refused.status == ledger_pb2.PURCHASE_STATUS_REFUSED and refused.tender_points == 300
    before = (await balance(screened.ledger.stub, member)).balance_points

    back = ledger_pb2.RecordReturnRequest(idempotency_key=key(), purchase_id=refused.purchase_id, channel="pos",
                                          store_id="HEL-01", lines=[ledger_pb2.ReturnLine(line_index=0, quantity=1)])  # fmt: skip
    returned = await screened.ledger.stub.RecordReturn(back)
    again = await screened.ledger.stub.RecordReturn(back)

    assert (returned.tender_recredited_points, list(returned.reversed)) == (300, [])
    assert again.replayed and again.tender_recredited_points == 300
    assert (await balance(screened.ledger.stub, member)).balance_points == before + 300


async def test_a_merge_refused_for_a_redemption_held_for_review_says_to_decide_the_review(screened: Screened) -> None:
    """The hold is the review's: VoidHold refuses it, so "capture or void them" was advice
    the caller could not follow."""
    member = await regular_member(screened)
    before = await balance(screened.ledger.stub, member)
    held = await screened.ledger.stub.Redeem(takeover(member, before.available_points - 100, "phone-new-3"))
    assert held.screening.verdict == ledger_pb2.SCREENING_VERDICT_REVIEW
    target = (await create_member(screened.ledger.stub)).member_id

    error = await rpc_error(screened.ledger.stub.MergeMembers(ledger_pb2.MergeMembersRequest(
        idempotency_key=key(), source_member_id=member, target_member_id=target)), grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip

    assert "1 open fraud reviews; decide them first" in error.details(), error.details()


async def test_a_review_opened_after_the_merge_checked_stops_the_merge_until_it_is_decided(screened: Screened) -> None:
    """The purchase passed its status check before the merge marked the member, and committed
    its review after the merge's own check: the write that moves the points finds it and stops
    (a decision on a member that holds nothing would strand the credit or leave it spendable).
    Decided, the merge sent again moves everything, the released credit included."""
    held = await _held_purchase(screened)
    source, svc = held.member_id, screened.ledger.app.service
    target = (await create_member(screened.ledger.stub)).member_id
    before = await balance(screened.ledger.stub, source)
    assert before.pending_points > 0

    with pytest.raises(FailedPrecondition, match="open fraud reviews"):
        await svc.sagas.complete_merge(source, target)  # the merge's move, past its own check

    assert (await balance(screened.ledger.stub, source)).pending_points == before.pending_points
    for review in (await screened.ledger.stub.ListReviews(ledger_pb2.ListReviewsRequest(member_id=source))).reviews:
        await screened.ledger.stub.DecideReview(_decide(review.review_id, True))
    await svc.sagas.complete_merge(source, target)
    after = await balance(screened.ledger.stub, target)
    assert (after.balance_points, after.pending_points) == (before.balance_points + before.pending_points, 0)


async def test_points_paid_for_a_refused_purchase_come_back_living_as_long_as_the_program_says(
    screened: Screened,
) -> None:
    """The DENY branch records the program's lifetime too: under `expiry_days: null` the tender
    given back never expires (it took the ledger's default, a year)."""
    never = PROGRAM.read_text().replace("  expiry_days: 365\n", "  expiry_days: null\n")
    assert never != PROGRAM.read_text()
    await screened.rules.stub.PublishProgram(rules_pb2.PublishProgramRequest(
        idempotency_key=common_pb2.IdempotencyKey(key="never-refused"), document=never))  # fmt: skip
    member = await regular_member(screened, visits=4)
    refused = await _refused_purchase_paid_with_300_points(screened, member, "dv-never")
    assert refused.status == ledger_pb2.PURCHASE_STATUS_REFUSED
    await screened.ledger.stub.RecordReturn(ledger_pb2.RecordReturnRequest(
        idempotency_key=key(), purchase_id=refused.purchase_id, channel="pos", store_id="HEL-01",
        lines=[ledger_pb2.ReturnLine(line_index=0, quantity=1)]))  # fmt: skip

    screened.clock.set(NOW + timedelta(days=800))
    await screened.ledger.app.service.run_maintenance()

    # The member's visits, dated by the program in force when they were bought, have expired;
    # the 300 given back never do.
    assert (await balance(screened.ledger.stub, member)).balance_points == 300


BAD_DEVICE = "device-fraud-svc-trips-on"


def fail_on_bad_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """fraud_svc fails (an internal error) on a transaction from BAD_DEVICE alone."""
    real_check = fraud_service.check

    def trips(ctx: TxContext, now: datetime, path: str = "transaction") -> TxContext:
        if ctx.device_id == BAD_DEVICE:  # a bug in fraud_svc that this one basket trips
            raise ZeroDivisionError("division by zero")
        return real_check(ctx, now, path)

    monkeypatch.setattr(fraud_service, "check", trips)


@pytest.mark.parametrize("path", ["unary", "batch"])
async def test_a_basket_fraud_svc_fails_on_leaves_the_others_scored(
    screened: Screened, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """As one by one, only the basket fraud_svc fails on is left to the unavailable policy; the
    batch's ScoreBatch failed whole, and every purchase of it went unscored."""
    fail_on_bad_device(monkeypatch)
    assert screened.fraud is not None
    screened.fraud.service.configure({"thresholds": {"purchase": {"review": 0.0, "deny": 1.0}}})  # review all scored
    screened.clock.set(NOW - timedelta(days=100))
    good_member = (await create_member(screened.ledger.stub)).member_id
    bad_member = (await create_member(screened.ledger.stub)).member_id
    screened.clock.set(NOW)
    at = NOW - timedelta(hours=2)
    good = purchase_request(good_member, [("grocery", 1_000, 1)], at=at, receipt=f"good-{path}", store="LIS-01")
    bad = purchase_request(bad_member, [("grocery", 1_000, 1)], at=at, receipt=f"bad-{path}", store="LIS-01")
    bad.context.device_id = BAD_DEVICE

    if path == "unary":
        got = [(await screened.ledger.stub.RecordPurchase(r)).purchase.screening for r in (good, bad)]
    else:
        response = await screened.ledger.stub.IngestBatch(
            aiter_of(ledger_pb2.IngestBatchRequest(purchase=p) for p in (good, bad))
        )
        got = []
        for p in sorted(response.purchases, key=lambda p: p.index):
            s = await screened.ledger.stub.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=p.purchase_id))
            got.append(s.purchase.screening)

    assert [(s.verdict, s.scored) for s in got] == [
        (ledger_pb2.SCREENING_VERDICT_REVIEW, True),  # scored: fraud_svc answers for this basket
        (ledger_pb2.SCREENING_VERDICT_ALLOW, False),  # the policy decides the one it fails on
    ]
    # Its fault, not a refusal of the request: the batch said "refused", and did not keep the
    # purchase for the maintenance pass to tell fraud_svc later, as the unary path does.
    screen = screened.ledger.app.service.fraud
    assert screen is not None and screen.backlog is not None
    kept = bool(await kept_for(screened.redis_url, screen.backlog, bad_member))
    assert (list(got[1].reasons), kept) == (["unscored:fraud_svc_unavailable:allow"], True)
