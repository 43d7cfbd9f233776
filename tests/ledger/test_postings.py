"""Postings over gRPC: idempotent replays, concurrent redeems, reversal policies and double entry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from ledger_svc.domain import bucket_of, member_account
from ledger_svc.store.base import AccountRow
from pointmesh.redis_server import RedisServer
from pointmesh.v1 import common_pb2, ledger_pb2
from tests.conftest import LedgerUnderTest, start_ledger, stop_ledger
from tests.ledger.helpers import (
    assert_books_balance,
    balance,
    create_member,
    detail,
    earn,
    entries,
    error_field,
    figures,
    key,
    place_hold,
    redeem,
    rpc_error,
    ts,
)

EUR = "EUR"


def eur(amount_minor: int, currency: str = EUR) -> common_pb2.Money:
    return common_pb2.Money(amount_minor=amount_minor, currency=currency)


@pytest.fixture
async def lenient_ledger(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[LedgerUnderTest]:
    """A ledger whose reversals may take a balance down to -100 before recording debt."""
    running = await start_ledger(tmp_path / "data", redis_server.url, negative_limit_points=100)
    yield running
    await stop_ledger(running)


async def member_pair(ledger: LedgerUnderTest, *, same_shard: bool) -> tuple[str, str]:
    """Two members whose accounts live in the same shard, or in different ones."""
    shards = ledger.app.store.shard_count
    seen: list[str] = []
    for _ in range(40):
        candidate = (await create_member(ledger.stub)).member_id
        for other in seen:
            if (bucket_of(other) % shards == bucket_of(candidate) % shards) == same_shard:
                return other, candidate
        seen.append(candidate)
    raise AssertionError("could not place two members as asked")


# Idempotency ------------------------------------------------------------------------------


async def test_earn_replay_returns_identical_response_and_posts_once(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    request = ledger_pb2.EarnRequest(
        idempotency_key=key("receipt-1", "pos"), member_id=member, points=120, reference="r-1"
    )
    first = await ledger.stub.Earn(request)
    second = await ledger.stub.Earn(request)

    assert second == first
    assert second.transaction.transaction_id == first.transaction.transaction_id
    assert second.transaction.balance_after.balance_points == 120
    assert second.transaction.balance_after.version == first.transaction.balance_after.version
    after = await balance(ledger.stub, member)
    assert (after.balance_points, after.version) == (120, first.transaction.balance_after.version)
    assert len(await entries(ledger.stub, member)) == 1


async def test_concurrent_duplicate_earns_post_once(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    request = ledger_pb2.EarnRequest(idempotency_key=key("dup"), member_id=member, points=40)
    responses = await asyncio.gather(*(ledger.stub.Earn(request) for _ in range(10)))

    assert len({r.transaction.transaction_id for r in responses}) == 1
    assert (await balance(ledger.stub, member)).balance_points == 40


async def test_reused_key_with_other_payload_fails_already_exists_naming_original_operation(
    ledger: LedgerUnderTest,
) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 100, idempotency_key=key("once", "pos"))

    other_points = await rpc_error(
        earn(ledger.stub, member, 101, idempotency_key=key("once", "pos")), grpc.StatusCode.ALREADY_EXISTS
    )
    conflict = detail(other_points, common_pb2.IdempotencyConflict)
    assert (conflict.namespace, conflict.key, conflict.original_operation) == ("pos", "once", "Earn")
    assert error_field(other_points) == "idempotency_key.key"

    other_operation = await rpc_error(
        redeem(ledger.stub, member, 10, idempotency_key=key("once", "pos")), grpc.StatusCode.ALREADY_EXISTS
    )
    assert detail(other_operation, common_pb2.IdempotencyConflict).original_operation == "Earn"
    assert figures(await balance(ledger.stub, member))["balance"] == 100


async def test_same_key_in_another_namespace_is_a_separate_request(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    pos = await earn(ledger.stub, member, 30, idempotency_key=key("shared", "pos"))
    web = await earn(ledger.stub, member, 50, idempotency_key=key("shared", "web"))
    default = await earn(ledger.stub, member, 70, idempotency_key=key("shared"))

    assert (
        len({pos.transaction.transaction_id, web.transaction.transaction_id, default.transaction.transaction_id}) == 3
    )
    assert (await balance(ledger.stub, member)).balance_points == 150


async def test_create_member_replay_returns_the_same_member_without_external_ids(ledger: LedgerUnderTest) -> None:
    request = ledger_pb2.CreateMemberRequest(idempotency_key=key("signup-1", "web"))
    first = (await ledger.stub.CreateMember(request)).member
    second = (await ledger.stub.CreateMember(request)).member
    other = await create_member(ledger.stub, idempotency_key=key("signup-2", "web"))

    assert second.member_id == first.member_id
    assert other.member_id != first.member_id
    conflict = await rpc_error(
        ledger.stub.CreateMember(
            ledger_pb2.CreateMemberRequest(idempotency_key=key("signup-1", "web"), profile={"a": "b"})
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert detail(conflict, common_pb2.IdempotencyConflict).original_operation == "CreateMember"


async def test_place_and_capture_hold_replays_reserve_and_debit_once(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 500)
    place = ledger_pb2.PlaceHoldRequest(idempotency_key=key("hold-1"), member_id=member, points=200)
    placed = await ledger.stub.PlaceHold(place)
    placed_again = await ledger.stub.PlaceHold(place)
    assert placed_again.hold.hold_id == placed.hold.hold_id
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 500, "reserved": 200, "available": 300, "pending": 0, "debt": 0,
    }  # fmt: skip

    capture = ledger_pb2.CaptureHoldRequest(idempotency_key=key("cap-1"), hold_id=placed.hold.hold_id, points=150)
    captured = await ledger.stub.CaptureHold(capture)
    captured_again = await ledger.stub.CaptureHold(capture)
    assert captured_again.transaction.transaction_id == captured.transaction.transaction_id
    assert captured_again.hold.captured_points == 150
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 350, "reserved": 0, "available": 350, "pending": 0, "debt": 0,
    }  # fmt: skip
    conflict = await rpc_error(
        ledger.stub.CaptureHold(
            ledger_pb2.CaptureHoldRequest(idempotency_key=key("cap-1"), hold_id=placed.hold.hold_id, points=100)
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert detail(conflict, common_pb2.IdempotencyConflict).original_operation == "CaptureHold"


@pytest.mark.parametrize("same_shard", [True, False], ids=["same-shard", "cross-shard"])
async def test_transfer_replay_returns_the_same_transfer_and_moves_points_once(
    ledger: LedgerUnderTest, same_shard: bool
) -> None:
    source, destination = await member_pair(ledger, same_shard=same_shard)
    await earn(ledger.stub, source, 300)
    request = ledger_pb2.TransferRequest(
        idempotency_key=key("gift-1"), source_member_id=source, destination_member_id=destination, points=120
    )
    first = await ledger.stub.Transfer(request)
    second = await ledger.stub.Transfer(request)

    assert second.transfer_id == first.transfer_id
    assert (second.debit.transaction_id, second.credit.transaction_id) == (
        first.debit.transaction_id,
        first.credit.transaction_id,
    )
    assert (first.debit.points, first.credit.points) == (-120, 120)
    assert (await balance(ledger.stub, source)).balance_points == 180
    assert (await balance(ledger.stub, destination)).balance_points == 120
    conflict = await rpc_error(
        ledger.stub.Transfer(
            ledger_pb2.TransferRequest(
                idempotency_key=key("gift-1"), source_member_id=source, destination_member_id=destination, points=1
            )
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert detail(conflict, common_pb2.IdempotencyConflict).original_operation == "Transfer"
    await assert_books_balance(ledger)


async def test_reverse_replay_reverses_once(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    earned = await earn(ledger.stub, member, 400)
    request = ledger_pb2.ReverseRequest(
        idempotency_key=key("refund-1"), transaction_id=earned.transaction.transaction_id, points=150
    )
    first = await ledger.stub.Reverse(request)
    second = await ledger.stub.Reverse(request)

    assert second == first
    assert first.reversed_points == 150
    assert (await balance(ledger.stub, member)).balance_points == 250


async def test_empty_namespace_is_the_default_namespace(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    first = await earn(ledger.stub, member, 25, idempotency_key=key("same"))
    second = await earn(ledger.stub, member, 25, idempotency_key=key("same", "default"))

    assert second.transaction.transaction_id == first.transaction.transaction_id
    assert (await balance(ledger.stub, member)).balance_points == 25


# Transfers --------------------------------------------------------------------------------


@pytest.mark.parametrize("same_shard", [True, False], ids=["same-shard", "cross-shard"])
async def test_transfer_moves_the_earliest_expiring_points_with_their_expiry(
    ledger: LedgerUnderTest, same_shard: bool
) -> None:
    source, destination = await member_pair(ledger, same_shard=same_shard)
    now = ledger.clock.now()
    await earn(ledger.stub, source, 100, expires_at=ts(now + timedelta(days=100)))
    await earn(ledger.stub, source, 100, expires_at=ts(now + timedelta(days=10)))
    await ledger.stub.Transfer(
        ledger_pb2.TransferRequest(
            idempotency_key=key(), source_member_id=source, destination_member_id=destination, points=150
        )
    )

    ledger.clock.advance(timedelta(days=11))
    report = await ledger.stub.RunExpiry(ledger_pb2.RunExpiryRequest())
    assert (report.expired_points, report.lots_expired) == (100, 1)
    assert (await balance(ledger.stub, source)).balance_points == 50
    assert (await balance(ledger.stub, destination)).balance_points == 50
    ledger.clock.advance(timedelta(days=90))
    report = await ledger.stub.RunExpiry(ledger_pb2.RunExpiryRequest())
    assert (report.expired_points, report.lots_expired) == (100, 2)
    await assert_books_balance(ledger)


async def test_transfer_cannot_send_more_than_available(ledger: LedgerUnderTest) -> None:
    source, destination = await member_pair(ledger, same_shard=False)
    await earn(ledger.stub, source, 100)
    await place_hold(ledger.stub, source, 30)

    error = await rpc_error(
        ledger.stub.Transfer(
            ledger_pb2.TransferRequest(
                idempotency_key=key(), source_member_id=source, destination_member_id=destination, points=71
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert detail(error, common_pb2.InsufficientPoints).available_points == 70
    assert (await balance(ledger.stub, destination)).balance_points == 0
    assert figures(await balance(ledger.stub, source))["reserved"] == 30
    await assert_books_balance(ledger)


async def test_units_are_separate_accounts(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 100)
    await earn(ledger.stub, member, 7, unit="tier_credits")

    refused = await rpc_error(redeem(ledger.stub, member, 8, unit="tier_credits"), grpc.StatusCode.FAILED_PRECONDITION)
    assert detail(refused, common_pb2.InsufficientPoints).unit == "tier_credits"
    assert (await balance(ledger.stub, member)).balance_points == 100
    assert (await balance(ledger.stub, member, "tier_credits")).balance_points == 7
    totals = await assert_books_balance(ledger)
    assert (totals["member:points"], totals["member:tier_credits"]) == (100, 7)


# Concurrency ------------------------------------------------------------------------------


async def test_redeem_never_overdraws_under_50_concurrent_calls(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 235)

    outcomes = await asyncio.gather(
        *(redeem(ledger.stub, member, 10, idempotency_key=key(f"burst-{i}")) for i in range(50)),
        return_exceptions=True,
    )

    successes = [o for o in outcomes if isinstance(o, ledger_pb2.RedeemResponse)]
    failures = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert (len(successes), len(failures)) == (23, 27)
    assert sum(-s.transaction.points for s in successes) == 230
    for failure in failures:
        assert failure.code() == grpc.StatusCode.FAILED_PRECONDITION
        shortfall = detail(failure, common_pb2.InsufficientPoints)
        assert (shortfall.member_id, shortfall.available_points, shortfall.requested_points) == (member, 5, 10)
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 5, "reserved": 0, "available": 5, "pending": 0, "debt": 0,
    }  # fmt: skip
    await assert_books_balance(ledger)


# Service robustness -----------------------------------------------------------------------


@pytest.fixture
async def fsync_ledger(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[LedgerUnderTest]:
    """A ledger with synchronous=FULL, whose store commits on worker threads instead of the event loop."""
    running = await start_ledger(tmp_path / "data", redis_server.url, sqlite_synchronous="FULL")
    yield running
    await stop_ledger(running)


async def test_a_call_cancelled_by_its_deadline_leaves_its_shard_writable(fsync_ledger: LedgerUnderTest) -> None:
    ledger = fsync_ledger
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 10)
    request = ledger_pb2.EarnRequest(idempotency_key=key("slow-disk"), member_id=member, points=5)
    # Keep the member's shard writer busy, as a slow fsync would, so the call below queues and times out.
    shard = bucket_of(member) % ledger.app.store.shard_count
    busy = asyncio.ensure_future(ledger.app.store.write(shard, lambda _tx: time.sleep(0.5)))
    await asyncio.sleep(0.05)
    await rpc_error(ledger.stub.Earn(request, timeout=0.2), grpc.StatusCode.DEADLINE_EXCEEDED)
    await busy

    retried = await ledger.stub.Earn(request, timeout=1.5)
    assert retried.transaction.balance_after.balance_points == 15
    later = ledger_pb2.EarnRequest(idempotency_key=key("after-slow-disk"), member_id=member, points=1)
    assert (await ledger.stub.Earn(later, timeout=1.5)).transaction.balance_after.balance_points == 16
    assert (await balance(ledger.stub, member)).balance_points == 16


@pytest.fixture
async def idle_relay_ledger(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[LedgerUnderTest]:
    """A ledger whose outbox relay, once drained, sleeps until woken (no short poll)."""
    running = await start_ledger(tmp_path / "data", redis_server.url, outbox_poll_seconds=30.0)
    yield running
    await stop_ledger(running)


async def test_relay_stops_when_cancelled_in_the_turn_a_posting_wakes_it(idle_relay_ledger: LedgerUnderTest) -> None:
    ledger = idle_relay_ledger
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 10)
    await asyncio.sleep(0.3)  # the relay has published and now waits to be woken
    relay = next(t for t in ledger.app.tasks if t.get_name() == "outbox-relay")

    ledger.app.service.outbox_wakeup.set()  # a posting commits ...
    relay.cancel()  # ... in the same loop turn as LedgerApp._cleanup cancels the relay
    done, _ = await asyncio.wait([relay], timeout=2)

    assert relay in done
    assert relay.cancelled()


# Reversals --------------------------------------------------------------------------------


async def test_full_refund_after_redemption_records_debt_that_the_next_earn_pays(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    earned = await earn(ledger.stub, member, 1000, purchase_amount=eur(10000))
    await redeem(ledger.stub, member, 800)

    reversed_ = await ledger.stub.Reverse(
        ledger_pb2.ReverseRequest(
            idempotency_key=key(), transaction_id=earned.transaction.transaction_id, refund_amount=eur(10000)
        )
    )
    assert (reversed_.reversed_points, reversed_.debt_points) == (1000, 800)
    assert reversed_.transaction.points == -1000
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 0, "reserved": 0, "available": 0, "pending": 0, "debt": 800,
    }  # fmt: skip

    await earn(ledger.stub, member, 500)
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 0, "reserved": 0, "available": 0, "pending": 0, "debt": 300,
    }  # fmt: skip
    await earn(ledger.stub, member, 450)
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 150, "reserved": 0, "available": 150, "pending": 0, "debt": 0,
    }  # fmt: skip
    await assert_books_balance(ledger)


async def test_full_refund_with_negative_limit_goes_to_minus_limit_then_debt(
    lenient_ledger: LedgerUnderTest,
) -> None:
    stub = lenient_ledger.stub
    member = (await create_member(stub)).member_id
    earned = await earn(stub, member, 1000, purchase_amount=eur(10000))
    await redeem(stub, member, 800)

    reversed_ = await stub.Reverse(
        ledger_pb2.ReverseRequest(
            idempotency_key=key(), transaction_id=earned.transaction.transaction_id, refund_amount=eur(10000)
        )
    )
    assert (reversed_.reversed_points, reversed_.debt_points) == (1000, 700)
    assert figures(await balance(stub, member)) == {
        "balance": -100, "reserved": 0, "available": 0, "pending": 0, "debt": 700,
    }  # fmt: skip
    await rpc_error(redeem(stub, member, 1), grpc.StatusCode.FAILED_PRECONDITION)

    await earn(stub, member, 500)
    assert figures(await balance(stub, member)) == {
        "balance": -100, "reserved": 0, "available": 0, "pending": 0, "debt": 200,
    }  # fmt: skip
    await earn(stub, member, 350)
    assert figures(await balance(stub, member)) == {
        "balance": 50, "reserved": 0, "available": 50, "pending": 0, "debt": 0,
    }  # fmt: skip
    await assert_books_balance(lenient_ledger)


async def test_refund_while_a_hold_is_open_never_takes_the_balance_below_the_reserved_points(
    lenient_ledger: LedgerUnderTest,
) -> None:
    stub = lenient_ledger.stub
    member = (await create_member(stub)).member_id
    earned = await earn(stub, member, 1000)
    await place_hold(stub, member, 300)
    await redeem(stub, member, 500)

    reversed_ = await stub.Reverse(
        ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=earned.transaction.transaction_id, full=True)
    )
    assert (reversed_.reversed_points, reversed_.debt_points) == (1000, 800)
    assert figures(await balance(stub, member)) == {
        "balance": 300, "reserved": 300, "available": 0, "pending": 0, "debt": 800,
    }  # fmt: skip
    await assert_books_balance(lenient_ledger)


async def hold_then_refund_everything(ledger: LedgerUnderTest) -> tuple[str, str]:
    """Earn 1000, hold 300, redeem 500, then a full reversal: 300 posted and reserved, 800 debt."""
    member = (await create_member(ledger.stub)).member_id
    earned = await earn(ledger.stub, member, 1000)
    hold_id = (await place_hold(ledger.stub, member, 300)).hold.hold_id
    await redeem(ledger.stub, member, 500)
    await ledger.stub.Reverse(
        ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=earned.transaction.transaction_id, full=True)
    )
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 300, "reserved": 300, "available": 0, "pending": 0, "debt": 800,
    }  # fmt: skip
    return member, hold_id


async def test_voiding_a_hold_pays_debt_recorded_while_it_was_open(ledger: LedgerUnderTest) -> None:
    member, hold_id = await hold_then_refund_everything(ledger)

    voided = await ledger.stub.VoidHold(ledger_pb2.VoidHoldRequest(idempotency_key=key(), hold_id=hold_id))

    expected = {"balance": 0, "reserved": 0, "available": 0, "pending": 0, "debt": 500}
    assert figures(voided.balance_after) == expected
    assert figures(await balance(ledger.stub, member)) == expected
    newest = (await entries(ledger.stub, member))[0]
    assert (newest.kind, newest.points) == (ledger_pb2.TRANSACTION_KIND_DEBT_SETTLEMENT, -300)
    await assert_books_balance(ledger)


async def test_expired_hold_pays_debt_recorded_while_it_was_open(ledger: LedgerUnderTest) -> None:
    member, _hold_id = await hold_then_refund_everything(ledger)

    ledger.clock.advance(timedelta(minutes=16))
    assert (await ledger.stub.RunExpiry(ledger_pb2.RunExpiryRequest())).holds_voided == 1

    assert figures(await balance(ledger.stub, member)) == {
        "balance": 0, "reserved": 0, "available": 0, "pending": 0, "debt": 500,
    }  # fmt: skip
    await assert_books_balance(ledger)


async def test_partial_capture_pays_debt_with_the_points_it_releases(ledger: LedgerUnderTest) -> None:
    member, hold_id = await hold_then_refund_everything(ledger)

    await ledger.stub.CaptureHold(ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=hold_id, points=100))

    assert figures(await balance(ledger.stub, member)) == {
        "balance": 0, "reserved": 0, "available": 0, "pending": 0, "debt": 600,
    }  # fmt: skip
    await assert_books_balance(ledger)


async def test_partial_refunds_reverse_proportionally_with_cumulative_floor(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    earned = await earn(ledger.stub, member, 1000, purchase_amount=eur(3000))
    tx_id = earned.transaction.transaction_id

    def refund(amount_minor: int) -> ledger_pb2.ReverseRequest:
        return ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=tx_id, refund_amount=eur(amount_minor))

    assert (await ledger.stub.Reverse(refund(1000))).reversed_points == 333
    assert (await ledger.stub.Reverse(refund(1000))).reversed_points == 333
    assert (await balance(ledger.stub, member)).balance_points == 334
    assert (await ledger.stub.Reverse(refund(1000))).reversed_points == 334
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 0, "reserved": 0, "available": 0, "pending": 0, "debt": 0,
    }  # fmt: skip
    await assert_books_balance(ledger)


async def test_tiny_refund_reverses_nothing_until_refunds_add_up_to_a_point(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    earned = await earn(ledger.stub, member, 10, purchase_amount=eur(1000))
    tx_id = earned.transaction.transaction_id

    first = await ledger.stub.Reverse(
        ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=tx_id, refund_amount=eur(99))
    )
    second = await ledger.stub.Reverse(
        ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=tx_id, refund_amount=eur(1))
    )
    assert (first.reversed_points, second.reversed_points) == (0, 1)
    assert (await balance(ledger.stub, member)).balance_points == 9


async def test_refund_in_another_currency_is_rejected_on_refund_amount_currency(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    earned = await earn(ledger.stub, member, 1000, purchase_amount=eur(3000))

    error = await rpc_error(
        ledger.stub.Reverse(
            ledger_pb2.ReverseRequest(
                idempotency_key=key(),
                transaction_id=earned.transaction.transaction_id,
                refund_amount=eur(1000, "USD"),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error_field(error) == "refund_amount.currency"
    assert (await balance(ledger.stub, member)).balance_points == 1000


async def test_reversing_more_than_remains_fails_precondition(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    earned = await earn(ledger.stub, member, 1000, purchase_amount=eur(3000))
    tx_id = earned.transaction.transaction_id
    await ledger.stub.Reverse(ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=tx_id, points=400))

    too_many = await rpc_error(
        ledger.stub.Reverse(ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=tx_id, points=601)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_field(too_many) == "points"
    rest = await ledger.stub.Reverse(ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=tx_id, full=True))
    assert rest.reversed_points == 600
    again = await rpc_error(
        ledger.stub.Reverse(ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=tx_id, full=True)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_field(again) == "transaction_id"
    assert (await balance(ledger.stub, member)).balance_points == 0


async def test_only_earns_can_be_reversed(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 100)
    redeemed = await redeem(ledger.stub, member, 40)

    error = await rpc_error(
        ledger.stub.Reverse(
            ledger_pb2.ReverseRequest(
                idempotency_key=key(), transaction_id=redeemed.transaction.transaction_id, full=True
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_field(error) == "transaction_id"
    assert (await balance(ledger.stub, member)).balance_points == 60


# Double entry and the journal -------------------------------------------------------------


async def test_mixed_postings_keep_the_books_balanced_by_account_class(ledger: LedgerUnderTest) -> None:
    alice = (await create_member(ledger.stub)).member_id
    bob = (await create_member(ledger.stub)).member_id
    first = await earn(ledger.stub, alice, 1000, funding_source="spring-promo")
    await earn(ledger.stub, bob, 200)
    await redeem(ledger.stub, alice, 150)
    hold = (await place_hold(ledger.stub, alice, 100)).hold
    await ledger.stub.CaptureHold(ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=hold.hold_id, points=70))
    await ledger.stub.Transfer(
        ledger_pb2.TransferRequest(idempotency_key=key(), source_member_id=alice, destination_member_id=bob, points=80)
    )
    await ledger.stub.Adjust(
        ledger_pb2.AdjustRequest(idempotency_key=key(), member_id=bob, points=-30, reason="goodwill correction")
    )
    await ledger.stub.Reverse(
        ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=first.transaction.transaction_id, points=100)
    )

    totals = await assert_books_balance(ledger)
    assert totals["member:points"] == 1000 - 150 - 70 - 80 - 100 + 200 + 80 - 30
    assert totals["funding:spring-promo:points"] == -900
    assert totals["funding:program:points"] == -200
    assert totals["system:redeemed:points"] == 220
    assert totals["system:adjustments:points"] == 30
    assert totals.get("system:transit:points", 0) == 0
    assert (await balance(ledger.stub, alice)).balance_points == 600
    assert (await balance(ledger.stub, bob)).balance_points == 250


async def test_list_entries_pages_newest_first_with_page_size_and_token(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    for points in (10, 20, 30, 40, 50):
        await earn(ledger.stub, member, points)
    await redeem(ledger.stub, member, 5)

    def page(token: str = "") -> ledger_pb2.ListEntriesRequest:
        return ledger_pb2.ListEntriesRequest(
            member_id=member, page=common_pb2.PageRequest(page_size=4, page_token=token)
        )

    first = await ledger.stub.ListEntries(page())
    assert [e.points for e in first.entries] == [-5, 50, 40, 30]
    assert first.entries[0].kind == ledger_pb2.TRANSACTION_KIND_REDEEM
    assert {e.account for e in first.entries} == {f"member:{member}:points"}
    assert first.next_page_token
    second = await ledger.stub.ListEntries(page(first.next_page_token))
    assert [e.points for e in second.entries] == [20, 10]
    assert second.next_page_token == ""
    ids = [e.entry_id for e in [*first.entries, *second.entries]]
    assert ids == sorted(ids, reverse=True)


async def test_list_entries_with_an_exactly_full_last_page_has_no_next_token(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    for points in (1, 2, 3, 4):
        await earn(ledger.stub, member, points)

    first = await ledger.stub.ListEntries(
        ledger_pb2.ListEntriesRequest(member_id=member, page=common_pb2.PageRequest(page_size=2))
    )
    second = await ledger.stub.ListEntries(
        ledger_pb2.ListEntriesRequest(
            member_id=member, page=common_pb2.PageRequest(page_size=2, page_token=first.next_page_token)
        )
    )
    assert [e.points for e in first.entries] == [4, 3]
    assert [e.points for e in second.entries] == [2, 1]
    assert second.next_page_token == ""


async def test_a_refused_spend_leaves_its_key_free_for_a_corrected_retry(ledger: LedgerUnderTest) -> None:
    """Refused before anything was written (too few points, a capture over the hold): the same
    key then carries the corrected request, where it answered ALREADY_EXISTS for good."""
    s = ledger.stub
    member = (await create_member(s)).member_id
    await earn(s, member, 100)
    spend = key()
    await rpc_error(redeem(s, member, 5000, idempotency_key=spend), grpc.StatusCode.FAILED_PRECONDITION)
    corrected = await redeem(s, member, 50, idempotency_key=spend)
    assert corrected.transaction.points == -50
    assert (await redeem(s, member, 50, idempotency_key=spend)).transaction == corrected.transaction

    hold = await place_hold(s, member, 10)
    capture = key()
    await rpc_error(
        s.CaptureHold(ledger_pb2.CaptureHoldRequest(idempotency_key=capture, hold_id=hold.hold.hold_id, points=11)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    captured = await s.CaptureHold(
        ledger_pb2.CaptureHoldRequest(idempotency_key=capture, hold_id=hold.hold.hold_id, points=10)
    )
    assert captured.transaction.points == -10
    assert figures(await balance(s, member))["balance"] == 40
    await assert_books_balance(ledger)


async def test_a_key_stored_in_the_shard_with_another_payload_is_a_conflict_even_without_its_claim(
    ledger: LedgerUnderTest,
) -> None:
    """The directory claim is the guard; the shard's record is its backstop. A claim can be gone
    while the shard holds a result under the key (a refused attempt gave it back as a retry of it
    went through): another payload under that key must still be refused, not answered with the
    stored result."""
    from ledger_svc import commands as c
    from ledger_svc.domain import IdemKey

    svc = ledger.app.service
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 100)
    first = c.Redeem(IdemKey("backstop", "k-1"), member, "points", 50)
    await svc.redeem(first)
    await svc.store.write_directory(lambda d: d.release_claim("backstop", "k-1", c.fingerprint(first)))

    await rpc_error(
        redeem(ledger.stub, member, 10, idempotency_key=key("k-1", "backstop")), grpc.StatusCode.ALREADY_EXISTS
    )
    assert figures(await balance(ledger.stub, member))["balance"] == 50


async def test_a_retry_that_posts_after_its_refused_first_attempt_keeps_the_key(ledger: LedgerUnderTest) -> None:
    """A till retries a redemption while the first attempt is still in flight; the first is
    refused (no points yet) and gives the key back, the retry meets the points an earn brought
    meanwhile and posts. The key must stay taken: another body under it is refused (even on
    another shard, where the shard's own record cannot see it) and the retry replays."""
    from ledger_svc import commands as c
    from ledger_svc.domain import IdemKey, IdempotencyConflict, LedgerError

    svc = ledger.app.service
    member = (await create_member(ledger.stub)).member_id
    others = [(await create_member(ledger.stub)).member_id for _ in range(8)]
    elsewhere = next(m for m in others if svc.shard_of(m) != svc.shard_of(member))
    spend = c.Redeem(IdemKey("race", "spend-1"), member, "points", 100)
    outcomes = await asyncio.gather(
        svc.redeem(spend), svc.redeem(spend), svc.earn(c.Earn(IdemKey("race", "earn-1"), member, "points", 100)),
        return_exceptions=True,
    )  # fmt: skip
    posted = [o for o in outcomes[:2] if not isinstance(o, BaseException)]
    assert all(isinstance(o, LedgerError) for o in outcomes[:2] if isinstance(o, BaseException)), outcomes
    if not posted:
        # Both attempts came before the earn's points this time (a busy box): both were refused
        # and gave the key back, so the till's next retry posts under it. Then the same checks.
        assert figures(await balance(ledger.stub, member))["balance"] == 100
        posted = [await svc.redeem(spend)]
    assert figures(await balance(ledger.stub, member))["balance"] == 0

    with pytest.raises(IdempotencyConflict):
        await svc.earn(c.Earn(IdemKey("race", "spend-1"), elsewhere, "points", 5))
    assert figures(await balance(ledger.stub, elsewhere))["balance"] == 0
    assert (await svc.redeem(spend)).transaction == posted[0].transaction
    await assert_books_balance(ledger)


async def test_a_spend_refused_in_a_batch_leaves_its_key_free_for_a_corrected_retry(ledger: LedgerUnderTest) -> None:
    """As for a single request: the redemption refused for want of points posted nothing, so the
    corrected one may come again under its key, through the batch too."""
    from ledger_svc import commands as c
    from ledger_svc.domain import IdemKey, InsufficientPoints

    svc = ledger.app.service
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 100)
    [refused] = await svc.ingest([c.Redeem(IdemKey("batch", "spend-1"), member, "points", 5000)])
    assert isinstance(refused, InsufficientPoints)

    [(_result, replayed)] = await svc.ingest([c.Redeem(IdemKey("batch", "spend-1"), member, "points", 50)])

    assert not replayed and figures(await balance(ledger.stub, member))["balance"] == 50


async def test_a_posting_past_int64_is_refused_and_leaves_its_key_free(ledger: LedgerUnderTest) -> None:
    """An account ~9,200 maximal postings in (set here directly) cannot take one more: the earn
    is refused naming `points`, nothing is written, and its key carries a corrected retry,
    where the store's commit failed as an internal error and kept the key."""
    s, svc = ledger.stub, ledger.app.service
    member = (await create_member(s)).member_id
    near = 2**63 - 10**15
    row = AccountRow(member_account(member, "points"), balance=near, lifetime_earned=near)
    await ledger.app.store.write(svc.shard_of(member), lambda tx: tx.put_account(row))
    first = key()
    error = await rpc_error(earn(s, member, 10**15, idempotency_key=first), grpc.StatusCode.FAILED_PRECONDITION)
    assert error_field(error) == "points" and "64-bit" in (error.details() or "")
    assert figures(await balance(s, member))["balance"] == near
    retried = await earn(s, member, 1, idempotency_key=first)
    assert retried.transaction.points == 1
    assert figures(await balance(s, member))["balance"] == near + 1
