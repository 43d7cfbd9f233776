"""Every debit sees the account as the maintenance pass would have left it by now, whenever
the pass last ran: holds past their timeout reserve nothing, and points past their date pay
nothing (not a redemption, a reversal, nor debt paid from released points)."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from google.protobuf.duration_pb2 import Duration

from ledger_svc import commands as c
from ledger_svc.domain import HoldStatus, IdemKey, InsufficientPoints
from pointmesh.v1 import ledger_pb2
from tests.conftest import LedgerUnderTest
from tests.ledger.helpers import (
    assert_books_balance,
    balance,
    create_member,
    earn,
    figures,
    new_member,
    place_hold,
    points,
    redeem,
)

_n = itertools.count()


def k() -> IdemKey:
    return IdemKey("sweep-first", f"k{next(_n)}")


async def test_a_hold_past_its_timeout_no_longer_keeps_points_from_a_redemption(ledger: LedgerUnderTest) -> None:
    """It can never be captured; the till walked away and the pass has not run yet."""
    member_id = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member_id, 100)
    await place_hold(ledger.stub, member_id, 100, timeout=Duration(seconds=60))
    ledger.clock.advance(timedelta(seconds=61))
    spending = (await ledger.stub.GetBalance(
        ledger_pb2.GetBalanceRequest(member_id=member_id, for_spending=True))).balance  # fmt: skip

    paid = await redeem(ledger.stub, member_id, 100)

    assert (spending.reserved_points, spending.available_points) == (0, 100)
    assert paid.transaction.points == -100
    assert figures(await balance(ledger.stub, member_id)) == {
        "balance": 0, "reserved": 0, "available": 0, "pending": 0, "debt": 0,
    }  # fmt: skip
    await assert_books_balance(ledger)


async def test_the_pass_voids_each_timed_out_hold_once_when_paying_debt_swept_the_others(
    ledger: LedgerUnderTest,
) -> None:
    """Two holds reserve everything, a return is owed as debt; both time out. Voiding the first
    pays the debt, sweeping the second first; the pass then finds it voided already."""
    svc = ledger.app.service
    m = await new_member(svc, k)
    bought = await svc.earn(c.Earn(k(), m, "points", 100))
    await svc.earn(c.Earn(k(), m, "points", 100))
    holds = [await svc.place_hold(c.PlaceHold(k(), m, "points", 100, timeout=timedelta(seconds=60))) for _ in "ab"]
    await svc.reverse(c.Reverse(k(), bought.transaction.transaction_id, full=True, reason="return"))
    assert await points(svc, m) == (200, 0, 100)
    ledger.clock.advance(timedelta(seconds=61))

    report = await svc.run_maintenance()

    assert report.holds_voided == 2
    assert await points(svc, m) == (100, 0, 0)
    statuses = [await svc.store.read(svc.shard_of(m), lambda tx, h=h: tx.get_hold(h.hold.hold_id)) for h in holds]
    assert [h.status for h in statuses if h is not None] == [HoldStatus.EXPIRED, HoldStatus.EXPIRED]
    await assert_books_balance(ledger)


async def test_a_reversal_does_not_spend_points_past_their_date_before_the_job_runs(ledger: LedgerUnderTest) -> None:
    """docs/ledger.md (Jobs): points past their date "expire when any debit runs ... as the job
    would: between the date and the job's next pass a member's balance still shows them, but
    nothing spends them". A return of a purchase whose points were spent must not be paid with
    points that were already past their date: the outcome must not depend on when the job ran."""
    svc = ledger.app.service
    results = []
    for job_first in (True, False):
        m = await new_member(svc, k)
        bought = await svc.earn(c.Earn(k(), m, "points", 100))  # never expires (default policy aside)
        await svc.redeem(c.Redeem(k(), m, "points", 100))
        await svc.earn(c.Earn(k(), m, "points", 100, expires_at=svc.clock.now() + timedelta(days=1)))
        ledger.clock.advance(timedelta(days=2))
        if job_first:
            await svc.run_maintenance()
        await svc.reverse(c.Reverse(k(), bought.transaction.transaction_id, full=True, reason="return"))
        await svc.run_maintenance()
        results.append(await points(svc, m))
    assert results[0] == (0, 0, 100)  # the job first: the due 100 expired, the return is owed as debt
    assert results[1] == results[0]  # the return first must come out the same


@pytest.mark.parametrize("how", ["VoidHold", "hold timed out"])
async def test_releasing_a_hold_does_not_pay_debt_with_points_past_their_date(
    ledger: LedgerUnderTest, how: str
) -> None:
    """A hold kept the due lot from expiring; a reversal meanwhile recorded debt. Once the hold
    is voided (by its caller, or by the maintenance pass at its timeout) the due points expire
    ("void that one and they expire", docs/ledger.md Jobs): they must not pay the debt first,
    as no debit may spend points past their date."""
    svc = ledger.app.service
    m = await new_member(svc, k)
    now = svc.clock.now()
    await svc.earn(c.Earn(k(), m, "points", 100, expires_at=now + timedelta(days=1)))
    other = await svc.earn(c.Earn(k(), m, "points", 50, expires_at=now + timedelta(days=100)))
    hold = await svc.place_hold(c.PlaceHold(k(), m, "points", 150, timeout=timedelta(days=3)))
    await svc.reverse(c.Reverse(k(), other.transaction.transaction_id, full=True, reason="return"))
    assert await points(svc, m) == (150, 0, 50)  # all of it reserved: the return is owed
    if how == "VoidHold":
        ledger.clock.advance(timedelta(days=2))
        await svc.run_maintenance()  # the hold keeps the due lot
        await svc.void_hold(c.VoidHold(k(), hold.hold.hold_id))
    else:
        ledger.clock.advance(timedelta(days=4))  # one pass: voids the hold, then expires
    await svc.run_maintenance()
    # The due 100 expire; the debt of 50 is paid from the 50 still valid.
    assert await points(svc, m) == (0, 0, 0)
    assert (await assert_books_balance(ledger))["system:expired:points"] == 100


@pytest.mark.parametrize("job_first", [True, False])
async def test_points_a_timed_out_hold_released_pay_debt_before_a_redemption(
    ledger: LedgerUnderTest, job_first: bool
) -> None:
    """The pass's void pays the debt a return recorded while all was held; a redemption before
    the pass must find the same: 100 left, not 150 spendable with the debt still owed."""
    svc = ledger.app.service
    m = await new_member(svc, k)
    await svc.earn(c.Earn(k(), m, "points", 100))
    other = await svc.earn(c.Earn(k(), m, "points", 50))
    await svc.place_hold(c.PlaceHold(k(), m, "points", 150, timeout=timedelta(seconds=60)))
    await svc.reverse(c.Reverse(k(), other.transaction.transaction_id, full=True, reason="return"))
    ledger.clock.advance(timedelta(seconds=61))
    if job_first:
        await svc.run_maintenance()
    spending = await svc.spendable_balance(m, "points")

    with pytest.raises(InsufficientPoints):
        await svc.redeem(c.Redeem(k(), m, "points", 150))

    assert (spending.available_points, spending.debt_points) == (100, 0)
    await svc.run_maintenance()  # a refused redemption writes nothing; the pass then does it
    assert await points(svc, m) == (100, 0, 0)
    paid = await svc.redeem(c.Redeem(k(), m, "points", 100))
    assert paid.transaction.points == -100
    await assert_books_balance(ledger)


async def test_a_merge_voids_holds_placed_meanwhile_once_when_paying_debt_swept_a_timed_out_one(
    ledger: LedgerUnderTest,
) -> None:
    svc = ledger.app.service
    m, heir = await new_member(svc, k), await new_member(svc, k)
    await svc.earn(c.Earn(k(), m, "points", 100))
    other = await svc.earn(c.Earn(k(), m, "points", 50))
    await svc.place_hold(c.PlaceHold(k(), m, "points", 100, timeout=timedelta(seconds=3600)))
    await svc.place_hold(c.PlaceHold(k(), m, "points", 50, timeout=timedelta(seconds=60)))
    await svc.reverse(c.Reverse(k(), other.transaction.transaction_id, full=True, reason="return"))
    ledger.clock.advance(timedelta(seconds=61))

    await svc._book(svc.shard_of(m), lambda b: b.move_out_all(m, "points", heir, "mg_x"))

    assert await points(svc, m) == (0, 0, 0)
