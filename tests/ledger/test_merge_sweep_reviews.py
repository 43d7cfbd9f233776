"""Fraud reviews of a merged-away member, opened by a purchase in flight after its merge had
checked it (the merge's own check refuses a member with open reviews): a sweep must leave the
review's credit where the decision will act on it, the decision must work, and its outcome must
reach the member the source was merged into (down a chain), with nothing lost or paid twice.
Each test runs on SQLite and on Cassandra (tests/ledger)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from datetime import timedelta

import pytest

from ledger_svc import commands as c
from ledger_svc import reviews
from ledger_svc.domain import ExternalId, FailedPrecondition, IdemKey, LedgerError, MemberStatus
from ledger_svc.postings import ShardBook
from ledger_svc.reviews import ReviewStatus
from ledger_svc.screening import Screening, Verdict
from ledger_svc.service import LedgerService
from tests.conftest import LedgerUnderTest
from tests.ledger.helpers import assert_books_balance, new_member, points

_n = itertools.count()


def k() -> IdemKey:
    return IdemKey("sweep-reviews", f"k{next(_n)}")


def reviewed_earn(member_id: str, points: int) -> Callable[[ShardBook], str]:
    """A purchase's write under a REVIEW verdict, as accrue makes it: the pending credit and
    its review item together. Run directly, it lands after the member's merge, as a purchase
    that passed its status check just before the merge marked the member MERGED does."""

    def write(book: ShardBook) -> str:
        earned = book.earn(
            member_id, "points", points, funding_source="program", business_time=None, expires_at=None,
            release_at=None, pending_review=True, purchase=None, reference="late purchase",
        )  # fmt: skip
        review = reviews.open_review(
            book, reviews.new_review_id(member_id), reviews.ReviewKind.EARN, member_id, "points", points,
            (earned.transaction.transaction_id,), Screening(Verdict.REVIEW, True, 0.91, ("burst",)),
        )  # fmt: skip
        return review.review_id

    return write


async def decide(svc: LedgerService, review_id: str, approve: bool) -> reviews.Review:
    return await svc.decide_review(c.DecideReview(k(), review_id, approve, "ops-anna"))


async def _transfer_on_its_way(svc: LedgerService) -> tuple[str, str, str]:
    """A member holding 100 with 60 on their way to it from a sender (a
    transfer saga started, not driven), and a member to merge it into: (source, heir, saga)."""
    sender, source = await new_member(svc, k), await new_member(svc, k)
    heir = await new_member(svc, k, shard_of=source)
    await svc.earn(c.Earn(k(), sender, "points", 60))
    await svc.earn(c.Earn(k(), source, "points", 100))
    transfer = c.Transfer(k(), sender, source, "points", 60)
    saga_id = await svc._book(svc.shard_of(sender), lambda b: svc.sagas.start_transfer(b, transfer))
    return source, heir, saga_id


@pytest.mark.parametrize("approve", [True, False])
async def test_a_transfer_sweep_leaves_a_late_review_to_its_decision_whose_outcome_reaches_the_heir(
    ledger: LedgerUnderTest, approve: bool
) -> None:
    """A transfer credited to the merged-away member sweeps it: before, the sweep took the
    review's credit to the heir, so approval released nothing (40 pending on the heir for ever)
    and rejection reversed 40 from the source's emptied credit (-40 pending on it, the heir's
    40 still there)."""
    svc = ledger.app.service
    source, heir, saga_id = await _transfer_on_its_way(svc)
    await svc.merge_members(c.MergeMembers(k(), source, heir))
    review_id = await svc._book(svc.shard_of(source), reviewed_earn(source, 40))

    await svc.sagas.drive_transfer(saga_id)  # credits the source, then sweeps it

    # Nothing moves while the review is open: the decision must find its credit.
    assert (await points(svc, source), await points(svc, heir)) == ((60, 40, 0), (100, 0, 0))
    decision = c.DecideReview(k(), review_id, approve, "ops-anna")
    decided = await svc.decide_review(decision)
    assert decided.status is (ReviewStatus.APPROVED if approve else ReviewStatus.REJECTED)
    assert len(decided.outcome_transaction_ids) == 1

    # The decision carries its outcome to the heir itself (no maintenance pass in between:
    # reconciliation finds no saga left open).
    assert await points(svc, source) == (0, 0, 0)
    assert await points(svc, heir) == ((200 if approve else 160), 0, 0)
    await assert_books_balance(ledger)
    # A replay of the decision answers as the first time and moves nothing again.
    assert await svc.decide_review(decision) == decided
    await svc.sagas.recover(at_startup=True)
    assert await points(svc, heir) == ((200 if approve else 160), 0, 0)
    await assert_books_balance(ledger)


async def test_reviews_left_by_start_up_recovery_settle_down_a_merge_chain_after_the_last_decision(
    ledger: LedgerUnderTest,
) -> None:
    """Two late reviews on a member merged into one merged on in turn (a chain): the start-up
    sweep leaves both, the first decision moves nothing yet (the other still holds its credit
    there), and the last sends everything decided to the end of the chain."""
    svc = ledger.app.service
    source = await new_member(svc, k)
    middle = await new_member(svc, k, shard_of=source, same_shard=True)
    heir = await new_member(svc, k, shard_of=source)
    await svc.earn(c.Earn(k(), source, "points", 100))
    await svc.merge_members(c.MergeMembers(k(), source, middle))
    await svc.merge_members(c.MergeMembers(k(), middle, heir))
    rejected = await svc._book(svc.shard_of(source), reviewed_earn(source, 40))
    approved = await svc._book(svc.shard_of(source), reviewed_earn(source, 25))

    await svc.sagas.recover(at_startup=True)
    assert await points(svc, source) == (0, 65, 0)

    await decide(svc, rejected, False)
    assert await points(svc, source) == (0, 25, 0)

    await decide(svc, approved, True)
    assert [await points(svc, m) for m in (source, middle, heir)] == [(0, 0, 0), (0, 0, 0), (125, 0, 0)]
    await assert_books_balance(ledger)


async def test_a_sweep_never_runs_ahead_of_a_merge_that_stopped_short_of_a_review(
    ledger: LedgerUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge found the review in the write that moves the points and stopped short. A
    transfer credited to the member then swept it: before, everything went to the heir around
    the merge's check (the review's credit with it, stranding the decision, and the member's
    purchase count and tier credits left behind). Now nothing moves until the review is
    decided, and the decision completes the merge."""
    svc = ledger.app.service
    source, heir, saga_id = await _transfer_on_its_way(svc)
    review_id = await _merge_stopped_by_a_late_review(svc, monkeypatch, source, heir)

    await svc.sagas.drive_transfer(saga_id)
    assert (await points(svc, source), await points(svc, heir)) == ((160, 40, 0), (0, 0, 0))
    await decide(svc, review_id, True)  # the last thing the merge waited for: it completes now
    assert (await points(svc, source), await points(svc, heir)) == ((0, 0, 0), (200, 0, 0))
    await assert_books_balance(ledger)

    moved = await svc.merge_members(c.MergeMembers(k(), source, heir))  # sent again: moves nothing twice
    assert moved.moved_points == {"points": 200}
    assert (await points(svc, source), await points(svc, heir)) == ((0, 0, 0), (200, 0, 0))
    await assert_books_balance(ledger)


async def _merge_stopped_by_a_late_review(
    svc: LedgerService, monkeypatch: pytest.MonkeyPatch, source: str, target: str, points_held: int = 40
) -> str:
    """Merges source into target with a review opened in flight, found by the write that moves
    the points: the merge stops short (source MERGED, nothing moved). Returns the review id."""
    complete_merge = svc.sagas.complete_merge
    opened: list[str] = []

    async def review_lands_first(src: str, dst: str, merge_id: str = "") -> dict[str, int]:
        opened.append(await svc._book(svc.shard_of(src), reviewed_earn(src, points_held)))
        return await complete_merge(src, dst, merge_id)

    with monkeypatch.context() as patched:
        patched.setattr(svc.sagas, "complete_merge", review_lands_first)
        with pytest.raises(FailedPrecondition, match="1 open fraud reviews"):
            await svc.merge_members(c.MergeMembers(k(), source, target))
    return opened[0]


async def test_a_stopped_merge_of_a_member_with_no_points_completes_on_its_last_decision(
    ledger: LedgerUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The everyday duplicate: an empty new account merged into the main one. Its review is
    rejected, so it holds nothing: the merge must complete all the same (its card becomes the
    heir's alias). Before, the sweep saw no points and returned before completing the merge."""
    svc = ledger.app.service
    card = ExternalId("card", f"DUP-{next(_n)}")
    source = (await svc.create_member(c.CreateMember(k(), (card,)))).member_id
    heir = await new_member(svc, k, shard_of=source)
    review_id = await _merge_stopped_by_a_late_review(svc, monkeypatch, source, heir)
    assert (await svc.lookup_member(card)).member_id == source

    await decide(svc, review_id, False)

    assert await svc.sagas._saga(source, svc.sagas.merge_id(source)) is not None
    assert (await svc.lookup_member(card)).member_id == heir
    assert await points(svc, source) == await points(svc, heir) == (0, 0, 0)
    await assert_books_balance(ledger)


async def test_a_stopped_merge_completes_to_the_end_of_the_chain_its_target_joined_since(
    ledger: LedgerUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's merge into B stopped short; B was then merged into C. Approving A's review completes
    A's merge: points, purchase history and card go to C, where B's went, not to B (merged away)."""
    svc = ledger.app.service
    card = ExternalId("card", f"CHAIN-{next(_n)}")
    a = (await svc.create_member(c.CreateMember(k(), (card,)))).member_id
    b, c_ = await new_member(svc, k, shard_of=a), await new_member(svc, k, shard_of=a)
    await svc.earn(c.Earn(k(), a, "points", 100))
    review_id = await _merge_stopped_by_a_late_review(svc, monkeypatch, a, b)
    await svc.merge_members(c.MergeMembers(k(), b, c_))

    await decide(svc, review_id, True)

    assert [await points(svc, m) for m in (a, b, c_)] == [(0, 0, 0), (0, 0, 0), (140, 0, 0)]
    assert (await svc.lookup_member(card)).member_id == c_
    merge = await svc.sagas._saga(a, svc.sagas.merge_id(a))
    assert merge is not None and merge.dest_member == c_
    await assert_books_balance(ledger)


async def test_two_members_merged_into_each_other_at_once_leave_one_of_them_active(ledger: LedgerUnderTest) -> None:
    """A into B and B into A, sent together: both passed their status checks before either
    marked its source MERGED, and both went through, leaving every point on two MERGED members.
    The write that marks the source reads the statuses again: one merge wins. On SQLite that
    write is serialised with every other directory write; Cassandra's lightweight transactions
    cover one partition, not the source and the target together, so merges take a lease there
    (LedgerStore.one_at_a_time)."""
    svc = ledger.app.service
    a = await new_member(svc, k)
    b = await new_member(svc, k, shard_of=a)
    await svc.earn(c.Earn(k(), a, "points", 100))
    await svc.earn(c.Earn(k(), b, "points", 50))

    outcomes = await asyncio.gather(
        svc.merge_members(c.MergeMembers(k(), a, b)), svc.merge_members(c.MergeMembers(k(), b, a)),
        return_exceptions=True,
    )  # fmt: skip

    refused = [o for o in outcomes if isinstance(o, LedgerError)]
    assert len(refused) == 1, outcomes
    statuses = {m: (await svc.member(m)).status for m in (a, b)}
    assert sorted(s.value for s in statuses.values()) == ["ACTIVE", "MERGED"]
    survivor = next(m for m, s in statuses.items() if s is MemberStatus.ACTIVE)
    assert await points(svc, survivor) == (150, 0, 0)
    await assert_books_balance(ledger)


async def test_three_members_merged_in_a_ring_at_once_leave_one_active_with_every_point(
    ledger: LedgerUnderTest,
) -> None:
    """A into B, B into C and C into A, sent together: without merges one at a time on Cassandra,
    each read its target active and all three went MERGED, every point on no active member."""
    svc = ledger.app.service
    ring = [await new_member(svc, k) for _ in range(3)]
    for n, m in enumerate(ring):
        await svc.earn(c.Earn(k(), m, "points", 10**n))

    outcomes = await asyncio.gather(
        *(svc.merge_members(c.MergeMembers(k(), ring[n], ring[(n + 1) % 3])) for n in range(3)),
        return_exceptions=True,
    )

    assert all(isinstance(o, LedgerError) for o in outcomes if isinstance(o, BaseException)), outcomes
    active = [m for m in ring if (await svc.member(m)).status is MemberStatus.ACTIVE]
    assert len(active) == 1, outcomes
    assert await points(svc, active[0]) == (111, 0, 0)
    await assert_books_balance(ledger)


class _PowerCut(Exception):
    pass


async def test_a_merge_replayed_after_its_target_merged_on_credits_the_points_once(
    ledger: LedgerUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's merge into B died after moving A's points out (its saga names B); B was then merged
    into C. The client sends A's merge again while the maintenance pass recovers the saga:
    the replay named C, recovery B, and each moved the points in, so both were credited (and
    transit went negative). Now a started saga's destination decides, and what reaches B goes
    on to C."""
    svc = ledger.app.service
    a = await new_member(svc, k)
    b, c_ = await new_member(svc, k, shard_of=a), await new_member(svc, k, shard_of=a)
    await svc.earn(c.Earn(k(), a, "points", 100))
    await svc.earn(c.Earn(k(), b, "points", 10))
    merge = c.MergeMembers(k(), a, b)

    def cut(point: str) -> None:
        if point == "merge_after_move_out":
            raise _PowerCut(point)

    with monkeypatch.context() as patched:
        patched.setattr(svc, "_fault", cut)
        with pytest.raises(_PowerCut):
            await svc.merge_members(merge)
    await svc.merge_members(c.MergeMembers(k(), b, c_))

    await asyncio.gather(svc.merge_members(merge), svc.sagas.recover())

    assert [await points(svc, m) for m in (a, b, c_)] == [(0, 0, 0), (0, 0, 0), (110, 0, 0)]
    await assert_books_balance(ledger)


async def _late_review_beside_a_heir_holding_500(
    svc: LedgerService, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str, str, str]:
    """A source merged into a heir (another shard, 500 points of its own) with a 40-point credit
    under a late review left on the source: (source, heir, review id, the credit's earn)."""
    source = await new_member(svc, k)
    heir = await new_member(svc, k, shard_of=source, same_shard=False)
    await svc.earn(c.Earn(k(), heir, "points", 500))
    review_id = await _merge_stopped_by_a_late_review(svc, monkeypatch, source, heir)
    review = await svc.store.read(
        svc.shard_of(source), lambda tx: reviews.load(ShardBook(tx, svc.clock.now(), svc.policy), review_id)
    )
    [earn_tx] = review.subject_ids
    return source, heir, review_id, earn_tx


@pytest.mark.parametrize("approve", [True, False])
async def test_a_reversal_of_a_late_reviews_credit_takes_it_from_the_pending_credit_not_the_heir(
    ledger: LedgerUnderTest, monkeypatch: pytest.MonkeyPatch, approve: bool
) -> None:
    """The credit of a review opened after its member's merge waits on that member until the
    decision. Reversing part of it (a return, ops) must take it from there: before, it was taken
    from the heir's own points, and a rejection then left the rest pending for good."""
    svc = ledger.app.service
    source, heir, review_id, earn_tx = await _late_review_beside_a_heir_holding_500(svc, monkeypatch)

    reversed_ = await svc.reverse(c.Reverse(k(), earn_tx, points=15, reason="return"))
    assert reversed_.reversed_points == 15
    assert (await points(svc, source), await points(svc, heir)) == ((0, 25, 0), (500, 0, 0))

    await decide(svc, review_id, approve)
    await svc.run_maintenance()
    kept = 25 if approve else 0
    assert (await points(svc, source), await points(svc, heir)) == ((0, 0, 0), (500 + kept, 0, 0))
    await assert_books_balance(ledger)


@pytest.mark.parametrize("approve", [True, False])
async def test_a_review_decided_while_a_reversal_is_on_its_way_leaves_nothing_stranded(
    ledger: LedgerUnderTest, monkeypatch: pytest.MonkeyPatch, approve: bool
) -> None:
    """Where a reversal takes its points from (the late review's pending credit, or the heir)
    is decided in its own write: a decision landing just before it moves the credit to the
    heir, and the reversal must follow, not take them from a credit that is gone."""
    svc = ledger.app.service
    source, heir, review_id, earn_tx = await _late_review_beside_a_heir_holding_500(svc, monkeypatch)
    mutate = svc._mutate

    async def decision_lands_first(command: object, *args: object, **kwargs: object) -> object:
        if isinstance(command, c.Reverse):
            await decide(svc, review_id, approve)
        return await mutate(command, *args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patched:
        patched.setattr(svc, "_mutate", decision_lands_first)
        reversal = c.Reverse(k(), earn_tx, points=15, reason="return")
        if approve:
            assert (await svc.reverse(reversal)).reversed_points == 15
        else:  # rejected: the credit is gone, nothing left to reverse
            with pytest.raises(FailedPrecondition, match="fully reversed"):
                await svc.reverse(reversal)
    await svc.run_maintenance()
    assert (await points(svc, source), await points(svc, heir)) == ((0, 0, 0), (525 if approve else 500, 0, 0))
    await assert_books_balance(ledger)


async def test_a_reversal_reaching_the_heir_takes_back_points_that_expired_there_from_breakage(
    ledger: LedgerUnderTest,
) -> None:
    """A pending credit moved to the heir by the merge, released and then expired there: the
    heir lost those points at expiry, and the return must not take them a second time."""
    svc = ledger.app.service
    source = await new_member(svc, k)
    heir = await new_member(svc, k, shard_of=source, same_shard=False)
    await svc.earn(c.Earn(k(), heir, "points", 500))
    now = svc.clock.now()
    earned = await svc.earn(c.Earn(k(), source, "points", 100, release_at=now + timedelta(days=1),
                                   expires_at=now + timedelta(days=5)))  # fmt: skip
    await svc.merge_members(c.MergeMembers(k(), source, heir))
    ledger.clock.advance(timedelta(days=2))
    await svc.run_maintenance()
    ledger.clock.advance(timedelta(days=5))
    await svc.run_maintenance()
    assert await points(svc, heir) == (500, 0, 0)

    reversed_ = await svc.reverse(c.Reverse(k(), earned.transaction.transaction_id, full=True, reason="return"))
    assert (reversed_.reversed_points, reversed_.debt_points) == (100, 0)
    assert await points(svc, heir) == (500, 0, 0)
    assert (await assert_books_balance(ledger)).get("system:expired:points", 0) == 0


@pytest.mark.parametrize("same_shard", [True, False])
async def test_release_pending_of_a_late_review_credit_is_refused_around_the_review_as_for_any_member(
    ledger: LedgerUnderTest, same_shard: bool
) -> None:
    """The late review's credit waits on the merged-away source. ReleasePending of it is refused
    with the review named, as for a member never merged, and nothing moves (before, SQLite
    released it on the source around the review, and the other layouts said "no pending points")."""
    svc = ledger.app.service
    source = await new_member(svc, k)
    heir = await new_member(svc, k, shard_of=source, same_shard=same_shard)
    await svc.earn(c.Earn(k(), source, "points", 100))
    await svc.merge_members(c.MergeMembers(k(), source, heir))
    review_id = await svc._book(svc.shard_of(source), reviewed_earn(source, 40))
    (earn_tx,) = (await svc.store.read(svc.shard_of(source), lambda tx: reviews.load(ShardBook(
        tx, svc.clock.now(), svc.policy), review_id))).subject_ids  # fmt: skip
    assert (await points(svc, source), await points(svc, heir)) == ((0, 40, 0), (100, 0, 0))

    with pytest.raises(FailedPrecondition, match="held by fraud review"):
        await svc.release_pending(c.ReleasePending(k(), earn_tx))
    assert (await points(svc, source), await points(svc, heir)) == ((0, 40, 0), (100, 0, 0))


async def test_release_pending_of_a_late_credit_without_a_review_item_releases_it_to_the_heir(
    ledger: LedgerUnderTest,
) -> None:
    """A credit posted pending_review with no review item (an Earn of before review items) on
    the merged-away source: ReleasePending releases it and the points go on to the heir."""
    svc = ledger.app.service
    source = await new_member(svc, k)
    heir = await new_member(svc, k, shard_of=source, same_shard=False)
    await svc.earn(c.Earn(k(), source, "points", 100))
    await svc.merge_members(c.MergeMembers(k(), source, heir))

    def write(book: ShardBook) -> str:
        earned = book.earn(
            source, "points", 40, funding_source="program", business_time=None, expires_at=None,
            release_at=None, pending_review=True, purchase=None, reference="late purchase",
        )  # fmt: skip
        return earned.transaction.transaction_id

    earn_tx = await svc._book(svc.shard_of(source), write)
    await svc.release_pending(c.ReleasePending(k(), earn_tx))
    assert (await points(svc, source), await points(svc, heir)) == ((0, 0, 0), (140, 0, 0))
    await assert_books_balance(ledger)
