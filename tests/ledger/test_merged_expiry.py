"""A reversal of an earn whose points expired on a member later merged away takes them back
from breakage, as without the merge, not a second time from the heir's points."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest

from ledger_svc import commands as c
from ledger_svc.domain import IdemKey
from ledger_svc.service import LedgerService
from tests.conftest import LedgerUnderTest
from tests.ledger.helpers import assert_books_balance, new_member, points

_n = itertools.count()


def k() -> IdemKey:
    return IdemKey("merged-expiry", f"k{next(_n)}")


async def _expiring(svc: LedgerService, member: str) -> str:
    """An earn of 100 points for the member that expire in a day."""
    now = svc.clock.now()
    return (
        await svc.earn(c.Earn(k(), member, "points", 100, expires_at=now + timedelta(days=1)))
    ).transaction.transaction_id


async def _returned_from_breakage(ledger: LedgerUnderTest, earn_tx: str, heir: str, heir_points: int) -> None:
    """The purchase returned: its 100 come back from breakage, the heir keeps `heir_points`."""
    svc = ledger.app.service
    back = await svc.reverse(c.Reverse(k(), earn_tx, full=True, reason="return"))
    assert back.reversed_points == 100
    assert await points(svc, heir) == (heir_points, 0, 0)  # the 100 left the person at expiry already
    assert (await assert_books_balance(ledger)).get("system:expired:points", 0) == 0


@pytest.mark.parametrize("same_shard", [True, False])
@pytest.mark.parametrize("job_ran", [True, False])
async def test_reversing_an_earn_that_expired_before_its_member_was_merged_takes_nothing_from_the_heir(
    ledger: LedgerUnderTest, same_shard: bool, job_ran: bool
) -> None:
    """An earn's 100 points expired unspent on the source (breakage), or were past their date
    when the source was merged into the heir. A return of that purchase takes them back from
    breakage, as it does when no merge happened (test_reversing_an_earn_whose_points_expired_
    takes_them_from_breakage_not_the_member), not a second time from the heir's points."""
    svc = ledger.app.service
    source = await new_member(svc, k)
    heir = await new_member(svc, k, shard_of=source, same_shard=same_shard)
    await svc.earn(c.Earn(k(), heir, "points", 500))
    old = await _expiring(svc, source)
    await svc.earn(c.Earn(k(), source, "points", 50))
    ledger.clock.advance(timedelta(days=2))
    if job_ran:  # else the merge finds the 100 past their date and expires them on the source
        assert (await svc.run_maintenance()).expired_points == 100
    await svc.merge_members(c.MergeMembers(k(), source, heir))
    assert await points(svc, heir) == (550, 0, 0)

    await _returned_from_breakage(ledger, old, heir, 550)


@pytest.mark.parametrize("same_shard", [True, False])
@pytest.mark.parametrize("job_ran", [True, False])
async def test_reversing_an_earn_whose_points_expired_on_the_heir_takes_nothing_from_the_heirs_other_points(
    ledger: LedgerUnderTest, same_shard: bool, job_ran: bool
) -> None:
    """The merge moves the earn's 100 points to the heir with their date; they expire there
    unspent (the maintenance pass, or the reversal finding them past their date). The return
    of that purchase takes them back from breakage, not from the heir's own 500."""
    svc = ledger.app.service
    source = await new_member(svc, k)
    heir = await new_member(svc, k, shard_of=source, same_shard=same_shard)
    await svc.earn(c.Earn(k(), heir, "points", 500))
    old = await _expiring(svc, source)
    await svc.merge_members(c.MergeMembers(k(), source, heir))
    assert await points(svc, heir) == (600, 0, 0)
    ledger.clock.advance(timedelta(days=2))
    if job_ran:
        assert (await svc.run_maintenance()).expired_points == 100
        assert await points(svc, heir) == (500, 0, 0)

    await _returned_from_breakage(ledger, old, heir, 500)


@pytest.mark.parametrize("same_shard", [True, False])
@pytest.mark.parametrize("job_ran", [True, False])
async def test_reversing_an_earn_whose_points_expired_on_a_middle_heir_takes_nothing_from_the_last_heir(
    ledger: LedgerUnderTest, same_shard: bool, job_ran: bool
) -> None:
    """A into B, B into C. The earn's 100 moved from A to B with their date, expired there
    unspent (the pass, or B's merge finding them past their date), then B was merged into C.
    A return of that purchase takes them back from breakage, as when the points expire on A or
    on C, not from C's own 500: the claim on them went on with B's lots."""
    svc = ledger.app.service
    a = await new_member(svc, k)
    b = await new_member(svc, k, shard_of=a, same_shard=same_shard)
    heir = await new_member(svc, k, shard_of=b, same_shard=same_shard)
    await svc.earn(c.Earn(k(), heir, "points", 500))
    await svc.earn(c.Earn(k(), b, "points", 20))
    old = await _expiring(svc, a)
    await svc.merge_members(c.MergeMembers(k(), a, b))
    assert await points(svc, b) == (120, 0, 0)
    ledger.clock.advance(timedelta(days=2))
    if job_ran:
        assert (await svc.run_maintenance()).expired_points == 100
        assert await points(svc, b) == (20, 0, 0)
    await svc.merge_members(c.MergeMembers(k(), b, heir))
    assert await points(svc, heir) == (520, 0, 0)

    await _returned_from_breakage(ledger, old, heir, 520)
