"""Transfers are fraud-screened like redemptions, since points leave the member: a ring
funnelling points to one collector is held for review (the points reserved on the sender, an
ops alert), and the decision completes or cancels the transfer. A transfer from a blocked
device is denied and nothing moves. On SQLite a transfer within one shard and one across
shards take different paths (one write, or a saga); Cassandra always takes the saga."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from fraud_svc.domain import TxContext, TxKind
from pointmesh.redis_server import RedisServer
from pointmesh.v1 import ledger_pb2
from tests.conftest import store_settings
from tests.ledger.helpers import assert_books_balance, balance, create_member, error_field, error_reason, key, rpc_error
from tests.screening.test_fraud_on_the_path import Screened, _features, alerts_for, screened_mesh, tell_until_told

SENT = 250


@pytest.fixture(params=["sqlite", "cassandra"])
async def mesh(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer, fraud_models: Path
) -> AsyncIterator[Screened]:
    async with screened_mesh(tmp_path, redis_server, fraud_models, **store_settings(request, request.param)) as env:
        yield env


def _transfer(source: str, destination: str, name: str, device: str = "") -> ledger_pb2.TransferRequest:
    return ledger_pb2.TransferRequest(
        idempotency_key=key(name), source_member_id=source, destination_member_id=destination, points=SENT,
        context=ledger_pb2.ScreeningContext(channel="app", device_id=device),
    )  # fmt: skip


async def _funded(env: Screened, near: str = "", same_shard: bool = True) -> str:
    """A new member with 300 points; when `near` is given, in (or not in) its shard."""
    service = env.ledger.app.service
    while True:
        member = (await create_member(env.ledger.stub)).member_id
        if not near or (service.shard_of(member) == service.shard_of(near)) == same_shard:
            break
    await env.ledger.stub.Earn(ledger_pb2.EarnRequest(idempotency_key=key(), member_id=member, points=300))
    return member


async def _ring(env: Screened, same_shard: bool = True) -> tuple[str, str, ledger_pb2.TransferResponse]:
    """Four members pass points to a collector; the fifth sender makes it a ring the rule sees
    (`velocity_recipient_senders_7d`: points from more than 4 members in a week, this one included). The model's
    transfer thresholds are put out of reach so the rule alone decides: the model itself
    reviews a brand-new member sending most of its balance at once, which every sender here is."""
    assert env.fraud is not None
    env.fraud.service.configure({"thresholds": {"transfer": {"review": 1.0, "deny": 1.0}}})
    collector = (await create_member(env.ledger.stub)).member_id
    for i in range(4):
        sender = await _funded(env)
        moved = await env.ledger.stub.Transfer(_transfer(sender, collector, f"ring-{collector}-{i}"))
        assert moved.HasField("debit") and moved.credit.points == SENT, moved
    fifth = await _funded(env, near=collector, same_shard=same_shard)
    held = await env.ledger.stub.Transfer(_transfer(fifth, collector, f"ring-{collector}-5"))
    return fifth, collector, held


@pytest.mark.parametrize("same_shard", [True, False], ids=["same-shard", "cross-shard"])
async def test_a_transfer_to_a_ring_collector_is_held_for_review_then_approved_and_moved(
    mesh: Screened, same_shard: bool
) -> None:
    sender, collector, held = await _ring(mesh, same_shard)
    assert held.screening.verdict == ledger_pb2.SCREENING_VERDICT_REVIEW, held.screening
    assert "rule:velocity_recipient_senders_7d" in held.screening.reasons
    assert not held.HasField("debit") and not held.HasField("credit")
    assert held.hold.points == SENT and held.hold.status == ledger_pb2.HOLD_STATUS_PLACED
    review_id = held.screening.review_id
    reserved = await balance(mesh.ledger.stub, sender)
    assert (reserved.balance_points, reserved.reserved_points, reserved.available_points) == (300, SENT, 50)
    assert (await balance(mesh.ledger.stub, collector)).balance_points == 4 * SENT
    listed = (await mesh.ledger.stub.ListReviews(ledger_pb2.ListReviewsRequest(member_id=sender))).reviews
    assert [(r.review_id, r.kind, r.transfer_id, r.counterparty_member_id, r.points) for r in listed] == [
        (review_id, ledger_pb2.REVIEW_KIND_TRANSFER, held.transfer_id, collector, SENT)
    ]
    assert [(a.subject_id, a.kind) for a in await alerts_for(mesh, review_id)] == [(review_id, "transfer_held")]
    again = await mesh.ledger.stub.Transfer(_transfer(sender, collector, f"ring-{collector}-5"))
    assert again.transfer_id == held.transfer_id and again.hold.status == ledger_pb2.HOLD_STATUS_PLACED
    # The sender's own app cannot spend the reserved points meanwhile.
    await rpc_error(mesh.ledger.stub.Redeem(ledger_pb2.RedeemRequest(
        idempotency_key=key(), member_id=sender, points=100,
    )), grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip

    decided = await mesh.ledger.stub.DecideReview(ledger_pb2.DecideReviewRequest(
        idempotency_key=key(), review_id=review_id, approve=True, operator_id="ops-anna",
    ))  # fmt: skip
    assert decided.review.status == ledger_pb2.REVIEW_STATUS_APPROVED
    assert (await balance(mesh.ledger.stub, collector)).balance_points == 5 * SENT
    after = await balance(mesh.ledger.stub, sender)
    assert (after.balance_points, after.reserved_points, after.available_points) == (50, 0, 50)
    moved = await mesh.ledger.stub.Transfer(_transfer(sender, collector, f"ring-{collector}-5"))
    assert moved.transfer_id == held.transfer_id and moved.credit.points == SENT and moved.debit.points == -SENT
    assert sorted(decided.review.outcome_transaction_ids) == sorted(
        [moved.debit.transaction_id, moved.credit.transaction_id]
    )
    if mesh.ledger.app.settings.store == "sqlite":
        await assert_books_balance(mesh.ledger)


async def test_a_rejected_transfer_voids_the_hold_and_moves_nothing(mesh: Screened) -> None:
    sender, collector, held = await _ring(mesh, same_shard=False)
    assert held.screening.verdict == ledger_pb2.SCREENING_VERDICT_REVIEW, held.screening
    decided = await mesh.ledger.stub.DecideReview(ledger_pb2.DecideReviewRequest(
        idempotency_key=key(), review_id=held.screening.review_id, approve=False, operator_id="ops-ben",
    ))  # fmt: skip
    assert decided.review.status == ledger_pb2.REVIEW_STATUS_REJECTED and not decided.review.outcome_transaction_ids
    await mesh.ledger.app.service.run_maintenance()  # the cancelled saga is not open work
    back = await balance(mesh.ledger.stub, sender)
    assert (back.balance_points, back.reserved_points, back.available_points) == (300, 0, 300)
    assert (await balance(mesh.ledger.stub, collector)).balance_points == 4 * SENT
    replay = await mesh.ledger.stub.Transfer(_transfer(sender, collector, f"ring-{collector}-5"))
    assert replay.hold.status == ledger_pb2.HOLD_STATUS_VOIDED and not replay.HasField("credit")


@pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)
@pytest.mark.parametrize("blocked", ["recipient", "sender"])
async def test_a_transfer_whose_sender_or_recipient_was_blocked_meanwhile_is_not_approved(
    mesh: Screened, blocked: str
) -> None:
    """A ring collector found, or a takeover confirmed, while the transfer waited: the points
    must not move. The review stays open, the points reserved, and ops rejects it instead."""
    sender, collector, held = await _ring(mesh)
    member = collector if blocked == "recipient" else sender
    await mesh.ledger.stub.BlockMember(ledger_pb2.BlockMemberRequest(
        idempotency_key=key(), member_id=member, reason="fraud ring",
    ))  # fmt: skip
    refused = await rpc_error(mesh.ledger.stub.DecideReview(ledger_pb2.DecideReviewRequest(
        idempotency_key=key(), review_id=held.screening.review_id, approve=True, operator_id="ops-anna",
    )), grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    assert f"{blocked} {member} is BLOCKED" in (refused.details() or "")
    listed = (await mesh.ledger.stub.ListReviews(ledger_pb2.ListReviewsRequest(member_id=sender))).reviews
    assert [r.status for r in listed] == [ledger_pb2.REVIEW_STATUS_OPEN]
    assert (await balance(mesh.ledger.stub, sender)).reserved_points == SENT
    assert (await balance(mesh.ledger.stub, collector)).balance_points == 4 * SENT
    rejected = await mesh.ledger.stub.DecideReview(ledger_pb2.DecideReviewRequest(
        idempotency_key=key(), review_id=held.screening.review_id, approve=False, operator_id="ops-anna",
    ))  # fmt: skip
    assert rejected.review.status == ledger_pb2.REVIEW_STATUS_REJECTED


@pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)
async def test_a_transfer_from_a_blocked_device_is_denied_and_nothing_moves(mesh: Screened) -> None:
    assert mesh.fraud is not None
    mesh.fraud.service.configure({"blocked_devices": ["dv-mule-01"]})
    sender, receiver = await _funded(mesh), (await create_member(mesh.ledger.stub)).member_id
    denied = await rpc_error(
        mesh.ledger.stub.Transfer(_transfer(sender, receiver, "from-mule", device="dv-mule-01")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_reason(denied) == "FRAUD_DENIED" and error_field(denied) == "source_member_id", denied.details()
    assert (await balance(mesh.ledger.stub, sender)).available_points == 300
    assert (await balance(mesh.ledger.stub, receiver)).balance_points == 0
    assert not (await mesh.ledger.stub.ListReviews(ledger_pb2.ListReviewsRequest(member_id=sender))).reviews


@pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)
async def test_a_transfer_held_without_a_score_reaches_fraud_svc_once_approval_moves_it(mesh: Screened) -> None:
    """fraud_svc is away when the transfer comes: the fail-closed policy holds it (2,000 points
    or more) unscored. Back by the time ops approves, fraud_svc then learns of the transfer,
    so the velocity state of both members holds it, once."""
    sender = await _funded(mesh)
    await mesh.ledger.stub.Earn(ledger_pb2.EarnRequest(idempotency_key=key(), member_id=sender, points=3_000))
    recipient = (await create_member(mesh.ledger.stub)).member_id
    await mesh.stop_fraud()
    request = ledger_pb2.TransferRequest(idempotency_key=key("unscored"), source_member_id=sender,
                                         destination_member_id=recipient, points=2_500)  # fmt: skip
    held = await mesh.ledger.stub.Transfer(request)
    assert not held.screening.scored and held.screening.verdict == ledger_pb2.SCREENING_VERDICT_REVIEW
    await mesh.start_fraud()
    await mesh.ledger.stub.DecideReview(ledger_pb2.DecideReviewRequest(
        idempotency_key=key(), review_id=held.screening.review_id, approve=True, operator_id="ops-anna",
    ))  # fmt: skip
    assert (await mesh.ledger.stub.Transfer(request)).credit.points == 2_500  # a replay drives it again
    await tell_until_told(mesh, sender, recipient)  # if fraud_svc was not reached yet, kept for it
    later = mesh.clock.now() + timedelta(seconds=1)
    sent = await _features(mesh, TxContext(f"probe-{sender}", TxKind.REDEMPTION, sender, later, points=10))
    got = await _features(mesh, TxContext(f"probe-{recipient}", TxKind.REDEMPTION, recipient, later, points=10))
    assert (sent["member_transfers_out_24h"], got["member_transfers_in_24h"]) == (1, 1)


@pytest.mark.parametrize("same_shard", [True, False], ids=["same-shard", "cross-shard"])
async def test_a_transfer_replayed_with_its_key_answers_with_the_screening_it_had(
    mesh: Screened, same_shard: bool
) -> None:
    """fraud_svc scored and allowed it; the replay must say so too (a cross-shard one answered
    with no screening at all, as if nothing had been screened)."""
    sender = await _funded(mesh)
    recipient = await _funded(mesh, near=sender, same_shard=same_shard)
    request = _transfer(sender, recipient, f"replayed-{sender}")

    first = await mesh.ledger.stub.Transfer(request)
    again = await mesh.ledger.stub.Transfer(request)

    assert first.screening.verdict == ledger_pb2.SCREENING_VERDICT_ALLOW and first.screening.scored, first
    assert again == first


@pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)
@pytest.mark.parametrize("end", ["blocked", "erased"])
async def test_approval_refuses_a_recipient_merged_into_a_member_who_may_not_receive(mesh: Screened, end: str) -> None:
    """The ring's collector was merged into another account, which was then blocked (or
    erased): its points would land there, so approval is refused as for the collector itself."""
    sender, collector, held = await _ring(mesh)
    heir = (await create_member(mesh.ledger.stub)).member_id
    s = mesh.ledger.stub
    await s.MergeMembers(ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=collector,
                                                        target_member_id=heir))  # fmt: skip
    if end == "blocked":
        await s.BlockMember(ledger_pb2.BlockMemberRequest(idempotency_key=key(), member_id=heir, reason="ring"))
    else:
        await s.EraseMember(ledger_pb2.EraseMemberRequest(idempotency_key=key(), member_id=heir))
    before = (await balance(s, heir)).balance_points

    refused = await rpc_error(s.DecideReview(ledger_pb2.DecideReviewRequest(
        idempotency_key=key(), review_id=held.screening.review_id, approve=True, operator_id="ops-anna",
    )), grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip

    assert heir in refused.details() and end.upper() in refused.details(), refused.details()
    assert (await balance(s, heir)).balance_points == before
    assert (await balance(s, sender)).reserved_points == SENT


@pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)
@pytest.mark.parametrize("same_shard", [True, False], ids=["same-shard", "cross-shard"])
async def test_a_transfer_fraud_svc_missed_while_away_reaches_it_on_the_next_maintenance_pass(
    mesh: Screened, same_shard: bool
) -> None:
    """fraud_svc is down for the whole transfer (allowed by the fail-open policy, and moved at
    once): the observation it could not be told is kept, and the maintenance pass after it is
    back tells it, once, so both members' velocity holds the transfer."""
    sender = await _funded(mesh)
    recipient = await _funded(mesh, near=sender, same_shard=same_shard)
    await mesh.stop_fraud()
    moved = await mesh.ledger.stub.Transfer(ledger_pb2.TransferRequest(
        idempotency_key=key(), source_member_id=sender, destination_member_id=recipient, points=100))  # fmt: skip
    assert moved.credit.points == 100 and not moved.screening.scored
    await mesh.start_fraud()
    await tell_until_told(mesh, sender, recipient)
    await mesh.ledger.app.service.run_maintenance()  # told once, however often the pass runs

    later = mesh.clock.now() + timedelta(seconds=1)
    sent = await _features(mesh, TxContext(f"probe-{sender}", TxKind.REDEMPTION, sender, later, points=10))
    got = await _features(mesh, TxContext(f"probe-{recipient}", TxKind.REDEMPTION, recipient, later, points=10))
    assert (sent["member_transfers_out_24h"], got["member_transfers_in_24h"]) == (1, 1)


@pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)
async def test_merging_a_sender_whose_transfer_is_under_review_names_the_review_not_its_hold(mesh: Screened) -> None:
    """The saga's hold is not the caller's to capture or void; what ops must do is decide."""
    sender, _collector, held = await _ring(mesh)
    heir = (await create_member(mesh.ledger.stub)).member_id
    refused = await rpc_error(mesh.ledger.stub.MergeMembers(ledger_pb2.MergeMembersRequest(
        idempotency_key=key(), source_member_id=sender, target_member_id=heir,
    )), grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    assert f"member {sender} has 1 open fraud reviews; decide them first" in (refused.details() or "")
    await rpc_error(mesh.ledger.stub.VoidHold(ledger_pb2.VoidHoldRequest(
        idempotency_key=key(), hold_id=held.hold.hold_id,
    )), grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
