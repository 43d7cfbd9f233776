"""Time-driven behaviour over gRPC: lot expiry order, pending credits, hold timeouts and captures."""

from __future__ import annotations

import itertools
from datetime import timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from ledger_svc import commands as c
from ledger_svc.domain import Balance, IdemKey, InsufficientPoints
from pointmesh.v1 import common_pb2, ledger_pb2
from tests.conftest import LedgerUnderTest
from tests.ledger.helpers import (
    assert_books_balance,
    balance,
    create_member,
    detail,
    earn,
    error_field,
    figures,
    key,
    new_member,
    place_hold,
    redeem,
    rpc_error,
    ts,
)

_n = itertools.count()


def k() -> IdemKey:
    return IdemKey("expiry", f"k{next(_n)}")


def minutes(n: int) -> Duration:
    return Duration(seconds=n * 60)


async def run_expiry(ledger: LedgerUnderTest) -> ledger_pb2.RunExpiryResponse:
    return await ledger.stub.RunExpiry(ledger_pb2.RunExpiryRequest())


def expiry_counts(report: ledger_pb2.RunExpiryResponse) -> tuple[int, int, int, int]:
    return (report.expired_points, report.lots_expired, report.pending_released, report.holds_voided)


# Lots and expiry --------------------------------------------------------------------------


async def test_redeem_consumes_the_earliest_expiring_lot_first(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    now = ledger.clock.now()
    await earn(ledger.stub, member, 100, expires_at=ts(now + timedelta(days=10)))
    await earn(ledger.stub, member, 100, expires_at=ts(now + timedelta(days=40)))
    await earn(ledger.stub, member, 100)  # program policy: 365 days
    await redeem(ledger.stub, member, 150)

    ledger.clock.advance(timedelta(days=20))
    assert expiry_counts(await run_expiry(ledger)) == (0, 0, 0, 0)
    assert (await balance(ledger.stub, member)).balance_points == 150

    ledger.clock.advance(timedelta(days=21))
    assert expiry_counts(await run_expiry(ledger)) == (50, 1, 0, 0)
    assert (await balance(ledger.stub, member)).balance_points == 100

    ledger.clock.advance(timedelta(days=325))
    assert expiry_counts(await run_expiry(ledger)) == (100, 1, 0, 0)
    assert (await balance(ledger.stub, member)).balance_points == 0
    await assert_books_balance(ledger)


async def test_lots_are_consumed_by_expiry_date_not_by_earn_order(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    now = ledger.clock.now()
    await earn(ledger.stub, member, 100, expires_at=ts(now + timedelta(days=40)))
    await earn(ledger.stub, member, 100, expires_at=ts(now + timedelta(days=10)))
    await redeem(ledger.stub, member, 150)

    ledger.clock.advance(timedelta(days=11))
    assert expiry_counts(await run_expiry(ledger)) == (0, 0, 0, 0)
    ledger.clock.advance(timedelta(days=30))
    assert expiry_counts(await run_expiry(ledger)) == (50, 1, 0, 0)
    assert (await balance(ledger.stub, member)).balance_points == 0
    await assert_books_balance(ledger)


async def test_expiry_never_takes_points_reserved_by_an_open_hold(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 100, expires_at=ts(ledger.clock.now() + timedelta(days=1)))
    hold = (await place_hold(ledger.stub, member, 60, timeout=Duration(seconds=3 * 86400))).hold

    ledger.clock.advance(timedelta(days=2))
    assert expiry_counts(await run_expiry(ledger)) == (40, 1, 0, 0)
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 60, "reserved": 60, "available": 0, "pending": 0, "debt": 0,
    }  # fmt: skip
    captured = await ledger.stub.CaptureHold(ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=hold.hold_id))
    assert captured.hold.captured_points == 60
    assert (await balance(ledger.stub, member)).balance_points == 0
    await assert_books_balance(ledger)


async def _held_across_expiry(ledger: LedgerUnderTest) -> tuple[str, ledger_pb2.Hold]:
    """100 points due tomorrow, 500 in 100 days, a 60-point hold; two days later the expiry
    run takes the 40 due points beyond the hold."""
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 100, expires_at=ts(ledger.clock.now() + timedelta(days=1)))
    await earn(ledger.stub, member, 500, expires_at=ts(ledger.clock.now() + timedelta(days=100)))
    hold = (await place_hold(ledger.stub, member, 60, timeout=Duration(seconds=3 * 86400))).hold
    ledger.clock.advance(timedelta(days=2))
    assert expiry_counts(await run_expiry(ledger)) == (40, 1, 0, 0)
    return member, hold


async def test_a_hold_keeps_the_due_points_it_will_capture_and_later_lots_stay_whole(ledger: LedgerUnderTest) -> None:
    """A capture takes the earliest-expiring points, so those are the ones the hold keeps from
    expiring: expiry takes the due points beyond the hold, and the long-dated lot is untouched."""
    member, hold = await _held_across_expiry(ledger)
    await ledger.stub.CaptureHold(ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=hold.hold_id))
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 500, "reserved": 0, "available": 500, "pending": 0, "debt": 0,
    }  # fmt: skip
    assert expiry_counts(await run_expiry(ledger)) == (0, 0, 0, 0)
    ledger.clock.advance(timedelta(days=99))
    assert expiry_counts(await run_expiry(ledger)) == (500, 1, 0, 0)
    await assert_books_balance(ledger)


async def test_points_a_voided_hold_protected_from_expiry_expire_on_the_next_run(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 100, expires_at=ts(ledger.clock.now() + timedelta(days=1)))
    hold = (await place_hold(ledger.stub, member, 60, timeout=Duration(seconds=3 * 86400))).hold
    ledger.clock.advance(timedelta(days=2))
    await run_expiry(ledger)

    await ledger.stub.VoidHold(ledger_pb2.VoidHoldRequest(idempotency_key=key(), hold_id=hold.hold_id))
    assert expiry_counts(await run_expiry(ledger)) == (60, 1, 0, 0)
    assert (await balance(ledger.stub, member)).balance_points == 0
    await assert_books_balance(ledger)


async def test_a_hold_past_its_timeout_keeps_nothing_from_expiring_in_the_same_run(ledger: LedgerUnderTest) -> None:
    """A hold that timed out can no longer be captured, so the points it reserved are no longer
    kept: one run voids it and expires its due points, leaving nothing to spend."""
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 100, expires_at=ts(ledger.clock.now() + timedelta(hours=1)))
    await place_hold(ledger.stub, member, 100, timeout=minutes(15))
    ledger.clock.advance(timedelta(hours=2))

    assert expiry_counts(await run_expiry(ledger)) == (100, 1, 0, 1)
    assert figures(await balance(ledger.stub, member))["balance"] == 0
    await rpc_error(redeem(ledger.stub, member, 100), grpc.StatusCode.FAILED_PRECONDITION)
    await assert_books_balance(ledger)


async def test_lots_a_hold_keeps_from_expiring_do_not_hide_other_members_due_lots(ledger: LedgerUnderTest) -> None:
    """The job reads due lots a page at a time; a page full of lots it cannot expire (points
    reserved by a hold that waits on a fraud review, say) must not stop it there."""
    ledger.app.service.expiry_page = 2
    held = (await create_member(ledger.stub)).member_id
    other = (await create_member(ledger.stub)).member_id
    while ledger.app.service.shard_of(other) != ledger.app.service.shard_of(held):
        other = (await create_member(ledger.stub)).member_id
    soon = ts(ledger.clock.now() + timedelta(days=1))
    for _ in range(5):
        await earn(ledger.stub, held, 10, expires_at=soon)
    await place_hold(ledger.stub, held, 50, timeout=Duration(seconds=6 * 86400))
    await earn(ledger.stub, other, 7, expires_at=ts(ledger.clock.now() + timedelta(days=1, seconds=1)))

    ledger.clock.advance(timedelta(days=2))
    assert expiry_counts(await run_expiry(ledger)) == (7, 1, 0, 0)
    assert (await balance(ledger.stub, other)).balance_points == 0
    assert figures(await balance(ledger.stub, held))["reserved"] == 50
    await assert_books_balance(ledger)


# Pending credits --------------------------------------------------------------------------


async def test_reversing_an_earn_whose_points_expired_takes_them_from_breakage_not_the_member(
    ledger: LedgerUnderTest,
) -> None:
    """A purchase whose points expired unspent is returned: those points left the member at
    expiry, so the return must not take other, still valid points for them. Spent points are
    taken back as before (decision 0007); each reversal takes its share of the expired ones."""
    member = (await create_member(ledger.stub)).member_id
    old = await earn(ledger.stub, member, 100, expires_at=ts(ledger.clock.now() + timedelta(days=1)))
    await redeem(ledger.stub, member, 40)
    ledger.clock.advance(timedelta(days=2))
    assert expiry_counts(await run_expiry(ledger)) == (60, 1, 0, 0)
    await earn(ledger.stub, member, 100, expires_at=ts(ledger.clock.now() + timedelta(days=100)))
    totals = await assert_books_balance(ledger)

    def reverse(points: int) -> ledger_pb2.ReverseRequest:
        return ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=old.transaction.transaction_id,
                                         points=points)  # fmt: skip

    await ledger.stub.Reverse(reverse(50))  # 30 of the 60 expired come back from breakage, 20 from the member
    assert figures(await balance(ledger.stub, member))["balance"] == 80
    await ledger.stub.Reverse(reverse(50))  # the other 30 expired, and 20
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 60, "reserved": 0, "available": 60, "pending": 0, "debt": 0,
    }  # fmt: skip
    after = await assert_books_balance(ledger)
    expired = "system:expired:points"
    assert (totals[expired], after[expired]) == (60, 0)  # breakage gave the 60 expired points back


async def test_a_reversal_never_takes_back_more_expired_points_than_it_reverses(ledger: LedgerUnderTest) -> None:
    """Half of an earn reversed as debt while a hold reserved everything, the debt paid from
    another lot, then the earn's whole lot expired: its lot counts 100 expired against 50 left
    to reverse. The last reversal takes 50 from breakage, not 100 (which would leave debt
    negative and hand the member 50 points with their next credit)."""
    stub = ledger.stub
    member = (await create_member(stub)).member_id
    await earn(stub, member, 100, expires_at=ts(ledger.clock.now() + timedelta(days=1)))
    bought = await earn(stub, member, 100, expires_at=ts(ledger.clock.now() + timedelta(days=2)))
    hold = await place_hold(stub, member, 200, timeout=minutes(60))
    tx = bought.transaction.transaction_id
    await stub.Reverse(ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=tx, points=50))
    await stub.VoidHold(ledger_pb2.VoidHoldRequest(idempotency_key=key(), hold_id=hold.hold.hold_id))
    ledger.clock.advance(timedelta(days=3))
    assert expiry_counts(await run_expiry(ledger)) == (150, 2, 0, 0)

    last = await stub.Reverse(ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=tx, full=True))
    assert (last.transaction.points, last.debt_points) == (-50, 0)
    await earn(stub, member, 10)
    assert figures(await balance(stub, member)) == {
        "balance": 10, "reserved": 0, "available": 10, "pending": 0, "debt": 0,
    }  # fmt: skip
    assert (await assert_books_balance(ledger))["system:expired:points"] == 100


async def test_pending_earn_is_not_spendable_until_its_release_date(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    earned = await earn(ledger.stub, member, 250, release_at=ts(ledger.clock.now() + timedelta(days=14)))
    assert earned.pending
    assert earned.transaction.points == 250
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 0, "reserved": 0, "available": 0, "pending": 250, "debt": 0,
    }  # fmt: skip

    refused = await rpc_error(redeem(ledger.stub, member, 1), grpc.StatusCode.FAILED_PRECONDITION)
    assert detail(refused, common_pb2.InsufficientPoints).available_points == 0

    ledger.clock.advance(timedelta(days=13))
    assert expiry_counts(await run_expiry(ledger)) == (0, 0, 0, 0)
    ledger.clock.advance(timedelta(days=2))
    assert expiry_counts(await run_expiry(ledger)) == (0, 0, 1, 0)
    after = await balance(ledger.stub, member)
    assert figures(after) == {"balance": 250, "reserved": 0, "available": 250, "pending": 0, "debt": 0}
    assert after.lifetime_earned_points == 250
    await redeem(ledger.stub, member, 250)
    await assert_books_balance(ledger)


async def test_earn_under_review_waits_for_release_pending_not_for_time(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    earned = await earn(ledger.stub, member, 90, pending_review=True)
    assert earned.pending

    ledger.clock.advance(timedelta(days=60))
    assert expiry_counts(await run_expiry(ledger)) == (0, 0, 0, 0)
    assert figures(await balance(ledger.stub, member))["pending"] == 90

    released = await ledger.stub.ReleasePending(
        ledger_pb2.ReleasePendingRequest(idempotency_key=key(), transaction_id=earned.transaction.transaction_id)
    )
    assert released.transaction.kind == ledger_pb2.TRANSACTION_KIND_PENDING_RELEASE
    assert released.transaction.points == 90
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 90, "reserved": 0, "available": 90, "pending": 0, "debt": 0,
    }  # fmt: skip
    again = await rpc_error(
        ledger.stub.ReleasePending(
            ledger_pb2.ReleasePendingRequest(idempotency_key=key(), transaction_id=earned.transaction.transaction_id)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_field(again) == "transaction_id"
    await assert_books_balance(ledger)


async def test_reversing_a_pending_earn_reduces_pending_and_leaves_available_alone(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 300)
    pending = await earn(ledger.stub, member, 200, release_at=ts(ledger.clock.now() + timedelta(days=14)))

    reversed_ = await ledger.stub.Reverse(
        ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=pending.transaction.transaction_id, points=50)
    )
    assert (reversed_.reversed_points, reversed_.debt_points) == (50, 0)
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 300, "reserved": 0, "available": 300, "pending": 150, "debt": 0,
    }  # fmt: skip

    ledger.clock.advance(timedelta(days=15))
    assert expiry_counts(await run_expiry(ledger)) == (0, 0, 1, 0)
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 450, "reserved": 0, "available": 450, "pending": 0, "debt": 0,
    }  # fmt: skip
    await assert_books_balance(ledger)


# Holds ------------------------------------------------------------------------------------


async def test_hold_times_out_into_expired_and_gives_points_back(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 500)
    placed = await place_hold(ledger.stub, member, 200, timeout=minutes(10))
    assert placed.hold.status == ledger_pb2.HOLD_STATUS_PLACED
    assert figures(placed.balance_after) == {
        "balance": 500, "reserved": 200, "available": 300, "pending": 0, "debt": 0,
    }  # fmt: skip
    assert figures(await balance(ledger.stub, member))["available"] == 300

    ledger.clock.advance(timedelta(minutes=9))
    assert expiry_counts(await run_expiry(ledger)) == (0, 0, 0, 0)
    ledger.clock.advance(timedelta(minutes=2))
    assert expiry_counts(await run_expiry(ledger)) == (0, 0, 0, 1)

    hold = (await ledger.stub.GetHold(ledger_pb2.GetHoldRequest(hold_id=placed.hold.hold_id))).hold
    assert (hold.status, hold.captured_points) == (ledger_pb2.HOLD_STATUS_EXPIRED, 0)
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 500, "reserved": 0, "available": 500, "pending": 0, "debt": 0,
    }  # fmt: skip
    late = await rpc_error(
        ledger.stub.CaptureHold(ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=placed.hold.hold_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_field(late) == "hold_id"
    assert (await balance(ledger.stub, member)).balance_points == 500
    await assert_books_balance(ledger)


async def test_hold_past_its_timeout_cannot_be_captured_before_the_expiry_run(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 500)
    placed = await place_hold(ledger.stub, member, 200, timeout=minutes(10))
    ledger.clock.advance(timedelta(minutes=11))

    late = await rpc_error(
        ledger.stub.CaptureHold(ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=placed.hold.hold_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_field(late) == "hold_id"
    assert figures(await balance(ledger.stub, member))["balance"] == 500


async def test_partial_capture_debits_the_captured_points_and_releases_the_rest(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 300)
    placed = await place_hold(ledger.stub, member, 100)

    captured = await ledger.stub.CaptureHold(
        ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=placed.hold.hold_id, points=60)
    )
    assert (captured.hold.status, captured.hold.points, captured.hold.captured_points) == (
        ledger_pb2.HOLD_STATUS_CAPTURED,
        100,
        60,
    )
    assert captured.transaction.kind == ledger_pb2.TRANSACTION_KIND_HOLD_CAPTURE
    assert captured.transaction.points == -60
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 240, "reserved": 0, "available": 240, "pending": 0, "debt": 0,
    }  # fmt: skip
    stored = (await ledger.stub.GetHold(ledger_pb2.GetHoldRequest(hold_id=placed.hold.hold_id))).hold
    assert (stored.status, stored.captured_points) == (ledger_pb2.HOLD_STATUS_CAPTURED, 60)
    await assert_books_balance(ledger)


async def test_void_releases_all_held_points(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 300)
    placed = await place_hold(ledger.stub, member, 100)

    voided = await ledger.stub.VoidHold(ledger_pb2.VoidHoldRequest(idempotency_key=key(), hold_id=placed.hold.hold_id))
    assert voided.hold.status == ledger_pb2.HOLD_STATUS_VOIDED
    assert figures(voided.balance_after) == {"balance": 300, "reserved": 0, "available": 300, "pending": 0, "debt": 0}
    await rpc_error(
        ledger.stub.CaptureHold(ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=placed.hold.hold_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert figures(await balance(ledger.stub, member))["balance"] == 300
    await assert_books_balance(ledger)


async def test_capturing_more_than_held_is_invalid_on_points(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 300)
    placed = await place_hold(ledger.stub, member, 100)

    error = await rpc_error(
        ledger.stub.CaptureHold(
            ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=placed.hold.hold_id, points=101)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error_field(error) == "points"
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 300, "reserved": 100, "available": 200, "pending": 0, "debt": 0,
    }  # fmt: skip
    hold = (await ledger.stub.GetHold(ledger_pb2.GetHoldRequest(hold_id=placed.hold.hold_id))).hold
    assert hold.status == ledger_pb2.HOLD_STATUS_PLACED


async def test_redeem_cannot_spend_held_points(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 100)
    await place_hold(ledger.stub, member, 70)

    refused = await rpc_error(redeem(ledger.stub, member, 40), grpc.StatusCode.FAILED_PRECONDITION)
    shortfall = detail(refused, common_pb2.InsufficientPoints)
    assert (shortfall.available_points, shortfall.requested_points) == (30, 40)
    await rpc_error(place_hold(ledger.stub, member, 31), grpc.StatusCode.FAILED_PRECONDITION)
    await redeem(ledger.stub, member, 30)
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 70, "reserved": 70, "available": 0, "pending": 0, "debt": 0,
    }  # fmt: skip


async def test_hold_timeout_above_seven_days_is_invalid(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 100)

    error = await rpc_error(
        place_hold(ledger.stub, member, 10, timeout=Duration(seconds=7 * 86400 + 1)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert error_field(error) == "timeout"
    assert figures(await balance(ledger.stub, member))["reserved"] == 0


async def test_due_points_a_hold_keeps_cannot_be_spent_around_it_and_expire_once_it_is_voided(
    ledger: LedgerUnderTest,
) -> None:
    """A redemption while the hold is open takes the long-dated points, not the due ones the
    hold keeps; voided, the hold gives those back to expiry."""
    member, hold = await _held_across_expiry(ledger)
    await redeem(ledger.stub, member, 100)
    await ledger.stub.VoidHold(ledger_pb2.VoidHoldRequest(idempotency_key=key(), hold_id=hold.hold_id))
    assert expiry_counts(await run_expiry(ledger)) == (60, 1, 0, 0)
    assert (await balance(ledger.stub, member)).balance_points == 400
    await assert_books_balance(ledger)


async def test_a_hold_is_counted_once_when_the_due_lots_fill_several_pages(ledger: LedgerUnderTest) -> None:
    ledger.app.service.expiry_page = 2
    member = (await create_member(ledger.stub)).member_id
    for _ in range(4):
        await earn(ledger.stub, member, 10, expires_at=ts(ledger.clock.now() + timedelta(days=1)))
    await place_hold(ledger.stub, member, 15, timeout=Duration(seconds=3 * 86400))
    ledger.clock.advance(timedelta(days=2))
    assert (await run_expiry(ledger)).expired_points == 25
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 15, "reserved": 15, "available": 0, "pending": 0, "debt": 0,
    }  # fmt: skip
    await assert_books_balance(ledger)


async def test_one_maintenance_pass_voids_every_due_hold_and_releases_every_due_credit(ledger: LedgerUnderTest) -> None:
    """More due than one page (shortened here to 2): none is left for the next pass, where a
    hold past its timeout kept reserving points and a due credit stayed pending."""
    ledger.app.service.maintenance_page = 2
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 100)
    for _ in range(5):
        await place_hold(ledger.stub, member, 10, timeout=Duration(seconds=60))
        await earn(ledger.stub, member, 7, release_at=ts(ledger.clock.now() + timedelta(hours=1)))
    ledger.clock.advance(timedelta(hours=2))

    done = await run_expiry(ledger)

    assert (done.pending_released, done.holds_voided) == (5, 5)
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 135, "reserved": 0, "available": 135, "pending": 0, "debt": 0,
    }  # fmt: skip
    await assert_books_balance(ledger)


async def test_a_second_hold_does_not_take_over_the_due_points_a_voided_hold_kept(ledger: LedgerUnderTest) -> None:
    """A hold keeps the lots that were free when it was placed. Placed while the due lot was the
    first hold's, the second keeps the long-dated lot: voiding the first lets the due lot expire,
    and capturing the second spends the long-dated one. When holds were one pool of the
    earliest-expiring points, the second took the due lot over, nothing expired, and the member
    kept 100 points past their date."""
    member = (await create_member(ledger.stub)).member_id
    now = ledger.clock.now()
    await earn(ledger.stub, member, 100, expires_at=ts(now + timedelta(days=10)))
    await earn(ledger.stub, member, 100, expires_at=ts(now + timedelta(days=100)))
    ledger.clock.advance(timedelta(days=9))
    week = Duration(seconds=7 * 86400)
    first = (await place_hold(ledger.stub, member, 100, timeout=week)).hold
    ledger.clock.advance(timedelta(days=2))  # the first lot is due, kept by the open hold
    assert expiry_counts(await run_expiry(ledger)) == (0, 0, 0, 0)
    second = (await place_hold(ledger.stub, member, 100, timeout=week)).hold
    await ledger.stub.VoidHold(ledger_pb2.VoidHoldRequest(idempotency_key=key(), hold_id=first.hold_id))

    assert expiry_counts(await run_expiry(ledger)) == (100, 1, 0, 0)
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 100, "reserved": 100, "available": 0, "pending": 0, "debt": 0,
    }  # fmt: skip
    await ledger.stub.CaptureHold(ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=second.hold_id))
    assert figures(await balance(ledger.stub, member))["balance"] == 0
    await assert_books_balance(ledger)


async def test_a_hold_placed_after_points_fell_due_does_not_keep_them(ledger: LedgerUnderTest) -> None:
    """Void, then place again before the expiry job runs: the new hold named the lot past its
    date, the job left it alone, and rotating holds kept it for ever. Points past their date
    that no hold keeps expire when the hold is placed, as the job would have expired them."""
    member = (await create_member(ledger.stub)).member_id
    now = ledger.clock.now()
    await earn(ledger.stub, member, 100, expires_at=ts(now + timedelta(days=1)))
    await earn(ledger.stub, member, 100, expires_at=ts(now + timedelta(days=100)))
    week = Duration(seconds=7 * 86400)
    hold = (await place_hold(ledger.stub, member, 100, timeout=week)).hold  # keeps the day-1 lot
    ledger.clock.advance(timedelta(days=2))
    for _ in range(3):  # void and place again, no expiry run between
        await ledger.stub.VoidHold(ledger_pb2.VoidHoldRequest(idempotency_key=key(), hold_id=hold.hold_id))
        hold = (await place_hold(ledger.stub, member, 100, timeout=week)).hold
    assert figures(await balance(ledger.stub, member)) == {
        "balance": 100, "reserved": 100, "available": 0, "pending": 0, "debt": 0,
    }  # fmt: skip
    assert expiry_counts(await run_expiry(ledger)) == (0, 0, 0, 0)  # expired already, when placed
    await ledger.stub.CaptureHold(ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=hold.hold_id))
    assert figures(await balance(ledger.stub, member))["balance"] == 0
    await assert_books_balance(ledger)


async def test_a_partial_capture_takes_the_earliest_of_the_hold_s_lots(ledger: LedgerUnderTest) -> None:
    """60 of a 100-point hold over a lot due in 10 days and one in 100: the capture takes 60 of
    the first; voided on capture, the other 40 of it expire on their date, the later lot whole."""
    member = (await create_member(ledger.stub)).member_id
    now = ledger.clock.now()
    await earn(ledger.stub, member, 50, expires_at=ts(now + timedelta(days=10)))
    await earn(ledger.stub, member, 50, expires_at=ts(now + timedelta(days=100)))
    hold = (await place_hold(ledger.stub, member, 100, timeout=Duration(seconds=86400))).hold
    await ledger.stub.CaptureHold(ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=hold.hold_id, points=60))
    ledger.clock.advance(timedelta(days=11))
    assert expiry_counts(await run_expiry(ledger)) == (0, 0, 0, 0)  # the 10-day lot was spent first
    assert figures(await balance(ledger.stub, member))["balance"] == 40
    ledger.clock.advance(timedelta(days=90))
    assert expiry_counts(await run_expiry(ledger)) == (40, 1, 0, 0)
    await assert_books_balance(ledger)


async def test_one_pass_voids_a_due_hold_behind_holds_settled_before_it(ledger: LedgerUnderTest) -> None:
    """Settled holds leave their timeout pointers on Cassandra until pruned a minute later; a
    page of them read as "nothing more due", and the due hold kept its points reserved."""
    ledger.app.service.maintenance_page = 2
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 1000)
    for _ in range(14):  # captured at the till, well before their timeout
        hold = (await place_hold(ledger.stub, member, 10, timeout=Duration(seconds=60))).hold
        await ledger.stub.CaptureHold(ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=hold.hold_id))
    await place_hold(ledger.stub, member, 50, timeout=Duration(seconds=120))  # never settled
    ledger.clock.advance(timedelta(minutes=5))
    assert (await run_expiry(ledger)).holds_voided == 1
    assert figures(await balance(ledger.stub, member))["reserved"] == 0


async def test_one_pass_releases_a_due_credit_behind_credits_released_by_hand(ledger: LedgerUnderTest) -> None:
    ledger.app.service.maintenance_page = 2
    member = (await create_member(ledger.stub)).member_id
    soon = ts(ledger.clock.now() + timedelta(hours=1))
    for _ in range(14):
        tx = (await earn(ledger.stub, member, 10, release_at=soon)).transaction
        await ledger.stub.ReleasePending(
            ledger_pb2.ReleasePendingRequest(idempotency_key=key(), transaction_id=tx.transaction_id)
        )
    await earn(ledger.stub, member, 7, release_at=ts(ledger.clock.now() + timedelta(hours=2)))
    ledger.clock.advance(timedelta(hours=3))
    assert (await run_expiry(ledger)).pending_released == 1
    assert figures(await balance(ledger.stub, member))["pending"] == 0


async def test_no_debit_spends_points_past_their_date_before_the_expiry_job_runs(ledger: LedgerUnderTest) -> None:
    """Each member has 100 points due yesterday and 50 due in 100 days, and the expiry job has
    not run: a redemption, a negative adjustment and a transfer to a member on the same shard
    or another one all see 50 available, and are refused alike for more, writing nothing.
    Holds expired due points first while the others spent them, so a transfer's outcome
    depended on the shard its recipient lived on."""
    svc = ledger.app.service
    now = ledger.clock.now()
    members = [await new_member(svc, k) for _ in range(8)]
    by_shard: dict[int, list[str]] = {}
    for m in members:
        by_shard.setdefault(svc.shard_of(m), []).append(m)
    source = next(ms[0] for ms in by_shard.values() if len(ms) > 1)
    same = next(m for m in by_shard[svc.shard_of(source)] if m != source)
    other = next(m for m in members if svc.shard_of(m) != svc.shard_of(source))
    debits = {
        "redeem": lambda m, p: svc.redeem(c.Redeem(k(), m, "points", p)),
        "adjust": lambda m, p: svc.adjust(c.Adjust(k(), m, "points", -p, reason="correction")),
        "hold": lambda m, p: svc.place_hold(c.PlaceHold(k(), m, "points", p)),
        "cross-shard transfer": lambda m, p: svc.transfer(c.Transfer(k(), m, other, "points", p)),
        "same-shard transfer": lambda m, p: svc.transfer(c.Transfer(k(), m, same, "points", p)),
    }
    spenders = {"redeem": await new_member(svc, k), "adjust": await new_member(svc, k), "hold": await new_member(svc, k),
                "cross-shard transfer": same, "same-shard transfer": source}  # fmt: skip
    for m in spenders.values():
        await svc.earn(c.Earn(k(), m, "points", 100, expires_at=now + timedelta(days=1)))
        await svc.earn(c.Earn(k(), m, "points", 50, expires_at=now + timedelta(days=100)))
    ledger.clock.advance(timedelta(days=2))

    for what, debit in debits.items():
        m = spenders[what]
        shown = await svc.get_balance(m, "points")
        assert shown.available_points == 150, what  # the job has not run
        with pytest.raises(InsufficientPoints) as refused:
            await debit(m, 51)
        assert (what, refused.value.available) == (what, 50)
        assert await svc.get_balance(m, "points") == shown, what  # the refusal wrote nothing
    for what, debit in debits.items():
        await debit(spenders[what], 50)
    assert expiry_counts(await run_expiry(ledger)) == (0, 0, 0, 0)  # expired when each debit ran
    assert {what: figures_of(await svc.get_balance(m, "points")) for what, m in spenders.items()} == {
        "redeem": (0, 0), "adjust": (0, 0), "hold": (50, 50), "cross-shard transfer": (50, 0),
        "same-shard transfer": (0, 0),
    }  # fmt: skip
    assert (await svc.get_balance(other, "points")).balance_points == 50
    await assert_books_balance(ledger)


def figures_of(b: Balance) -> tuple[int, int]:
    return b.balance_points, b.reserved_points


async def test_a_reversal_past_its_earns_lot_takes_the_rest_from_points_no_hold_keeps(ledger: LedgerUnderTest) -> None:
    """The earn's own lot, mostly spent, gives what it has; the rest came from the earliest lot
    whoever kept it, here the one a hold keeps: voided, the hold then left less due to expire."""
    stub, now = ledger.stub, ledger.clock.now()
    member = (await create_member(stub)).member_id
    own = (await earn(stub, member, 100, expires_at=ts(now + timedelta(days=100)))).transaction.transaction_id
    await redeem(stub, member, 80)  # from the day-100 lot: the only one yet
    await earn(stub, member, 100, expires_at=ts(now + timedelta(days=1)))
    await earn(stub, member, 100, expires_at=ts(now + timedelta(days=200)))
    hold = (await place_hold(stub, member, 100, timeout=Duration(seconds=3600))).hold  # keeps the day-1 lot

    back = await stub.Reverse(ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=own, full=True))
    await stub.VoidHold(ledger_pb2.VoidHoldRequest(idempotency_key=key(), hold_id=hold.hold_id))
    ledger.clock.advance(timedelta(days=2))
    done = await stub.RunExpiry(ledger_pb2.RunExpiryRequest())

    assert back.reversed_points == 100
    assert done.expired_points == 100  # the day-1 lot, untouched by the reversal
    assert figures(await balance(stub, member))["balance"] == 20


async def test_a_reversal_of_a_merged_away_earn_leaves_the_heirs_held_points_to_expire(
    ledger: LedgerUnderTest,
) -> None:
    """The earn's lot is the merged-away member's (SQLite found it, Cassandra did not): the
    reversal then took the heir's points whoever kept them, on SQLite only."""
    stub, svc, now = ledger.stub, ledger.app.service, ledger.clock.now()
    heir = (await create_member(stub)).member_id
    source = (await create_member(stub)).member_id
    while svc.shard_of(source) != svc.shard_of(heir):  # a same-shard merge
        source = (await create_member(stub)).member_id
    await earn(stub, heir, 100, expires_at=ts(now + timedelta(days=1)))
    gone = (await earn(stub, source, 100, expires_at=ts(now + timedelta(days=100)))).transaction.transaction_id
    hold = (await place_hold(stub, heir, 100, timeout=Duration(seconds=3600))).hold  # keeps the day-1 lot
    await stub.MergeMembers(ledger_pb2.MergeMembersRequest(
        idempotency_key=key(), source_member_id=source, target_member_id=heir))  # fmt: skip

    back = await stub.Reverse(ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=gone, full=True))
    await stub.VoidHold(ledger_pb2.VoidHoldRequest(idempotency_key=key(), hold_id=hold.hold_id))
    ledger.clock.advance(timedelta(days=2))
    done = await stub.RunExpiry(ledger_pb2.RunExpiryRequest())

    assert back.reversed_points == 100
    assert done.expired_points == 100  # the heir's own day-1 points; the merged ones were reversed
    assert figures(await balance(stub, heir))["balance"] == 0
