"""Merges meeting other work: holds, reversals by batch, replays and same-shard pending lots."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from ledger_svc import commands as c
from ledger_svc.domain import FailedPrecondition, HoldStatus, IdemKey, MemberNotActive, MemberStatus
from ledger_svc.reconcile import reconcile
from ledger_svc.service import LedgerService
from pointmesh.redis_server import RedisServer
from tests.conftest import LedgerUnderTest, start_ledger, stop_ledger, store_settings
from tests.ledger.helpers import new_member

_n = itertools.count()


def k() -> IdemKey:
    return IdemKey("edges", f"k{next(_n)}")


async def members_on_same_shard(svc: LedgerService) -> tuple[str, str]:
    seen: dict[int, str] = {}
    while True:
        m = await new_member(svc, k)
        shard = svc.shard_of(m)
        if shard in seen:
            return seen[shard], m
        seen[shard] = m


async def test_a_hold_caught_by_a_merge_is_voided_so_its_capture_cannot_overdraw(ledger: LedgerUnderTest) -> None:
    svc = ledger.app.service
    source, target = await new_member(svc, k), await new_member(svc, k)
    await svc.earn(c.Earn(k(), source, "points", 1000))
    hold = await svc.place_hold(c.PlaceHold(k(), source, "points", 1000))
    # The hold lands after the merge's own open-hold check: drive the merge's move directly.
    await svc.sagas.complete_merge(source, target)
    with pytest.raises(FailedPrecondition):
        await svc.capture_hold(c.CaptureHold(k(), hold.hold.hold_id, 0))
    assert (await svc.get_hold(hold.hold.hold_id)).status == HoldStatus.VOIDED
    assert (await svc.get_balance(source, "points")).balance_points == 0
    assert (await svc.get_balance(target, "points")).balance_points == 1000
    assert (await reconcile(ledger.app.store, ledger.clock.now())).ok


async def test_batch_reversal_of_a_pre_merge_earn_takes_points_from_the_target(ledger: LedgerUnderTest) -> None:
    svc = ledger.app.service
    source, target = await new_member(svc, k), await new_member(svc, k)
    earned = await svc.earn(c.Earn(k(), source, "points", 1000))
    await svc.merge_members(c.MergeMembers(k(), source, target))
    [outcome] = await svc.ingest([c.Reverse(k(), earned.transaction.transaction_id, full=True)])
    result, replayed = outcome
    assert (result.reversed_points, result.debt_points, replayed) == (1000, 0, False)
    src, tgt = await svc.get_balance(source, "points"), await svc.get_balance(target, "points")
    assert (src.balance_points, src.debt_points, tgt.balance_points, tgt.debt_points) == (0, 0, 0, 0)
    [adjust] = await svc.ingest([c.Adjust(k(), source, "points", 5, "goodwill")])
    assert isinstance(adjust, MemberNotActive)
    assert (await reconcile(ledger.app.store, ledger.clock.now())).ok


async def test_replaying_a_reversal_after_the_member_was_merged_returns_the_original(ledger: LedgerUnderTest) -> None:
    svc = ledger.app.service
    source, target = await new_member(svc, k), await new_member(svc, k)
    earned = await svc.earn(c.Earn(k(), source, "points", 1000))
    reverse = c.Reverse(k(), earned.transaction.transaction_id, points=100)
    first = await svc.reverse(reverse)
    await svc.merge_members(c.MergeMembers(k(), source, target))
    again = await svc.reverse(reverse)
    assert again == first
    assert (await svc.get_balance(target, "points")).balance_points == 900


async def test_pending_review_credit_merged_within_one_shard_can_be_released(ledger: LedgerUnderTest) -> None:
    svc = ledger.app.service
    source, target = await members_on_same_shard(svc)
    earned = await svc.earn(c.Earn(k(), source, "points", 500, pending_review=True))
    await svc.merge_members(c.MergeMembers(k(), source, target))
    released = await svc.release_pending(c.ReleasePending(k(), earned.transaction.transaction_id))
    assert released.member_id == target
    balance = await svc.get_balance(target, "points")
    assert (balance.balance_points, balance.pending_points) == (500, 0)
    assert (await reconcile(ledger.app.store, ledger.clock.now())).ok


async def test_points_that_landed_on_a_member_after_it_was_merged_are_flagged_then_swept(
    ledger: LedgerUnderTest,
) -> None:
    svc = ledger.app.service
    source, target = await new_member(svc, k), await new_member(svc, k)
    await svc.earn(c.Earn(k(), source, "points", 100))
    await svc.merge_members(c.MergeMembers(k(), source, target))
    assert (await reconcile(ledger.app.store, ledger.clock.now())).ok
    # An earn that passed the status check just before the merge commits after it.
    await svc._book(svc.shard_of(source), lambda b: b.earn(
        source, "points", 7, funding_source="program", business_time=None, expires_at=None, release_at=None,
        pending_review=False, purchase=None, reference="late",
    ))  # fmt: skip
    report = await reconcile(ledger.app.store, ledger.clock.now())
    assert [(d.kind, d.subject, d.actual) for d in report.differences] == [
        ("points left on a merged member", f"member:{source}:points", 7)
    ]
    # The next start-up's recovery sweeps them on to the target.
    await svc.sagas.recover(at_startup=True)
    assert (await reconcile(ledger.app.store, ledger.clock.now())).ok
    assert (await svc.get_balance(target, "points")).balance_points == 107


async def test_a_transfer_credited_after_its_destination_was_merged_follows_the_merge(ledger: LedgerUnderTest) -> None:
    svc = ledger.app.service
    source, destination = await new_member(svc, k), await new_member(svc, k)
    while svc.shard_of(destination) == svc.shard_of(source):
        destination = await new_member(svc, k)
    target = await new_member(svc, k)
    await svc.earn(c.Earn(k(), source, "points", 100))
    cmd = c.Transfer(k(), source, destination, "points", 60)
    # Step one (the source's hold) done, then the destination is merged before the credit.
    saga_id = await svc._book(svc.shard_of(source), lambda b: svc.sagas.start_transfer(b, cmd))
    await svc.merge_members(c.MergeMembers(k(), destination, target))
    await svc.sagas.drive_transfer(saga_id)
    balances = [(await svc.get_balance(m, "points")).balance_points for m in (source, destination, target)]
    assert balances == [40, 0, 60]
    assert (await reconcile(ledger.app.store, ledger.clock.now())).ok


@pytest.mark.parametrize("store", ["sqlite", "cassandra"])
async def test_members_at_the_negative_limit_merged_into_one_leave_it_at_the_limit_with_debt(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer, store: str
) -> None:
    """Each source sits at -100 (earned, spent, then the earn was reversed) with a limit of 100;
    the target has a 60-point hold open on its 60 points. The moved negative balances stop at
    the target's floor and the rest is debt: the target stayed at 60 with its hold funded, not
    at -140 with a hold that captured into the limit."""
    ledger = await start_ledger(tmp_path / "data", redis_server.url, negative_limit_points=100,
                                **store_settings(request, store))  # fmt: skip
    try:
        svc = ledger.app.service
        sources = []
        for _ in range(2):
            m = await new_member(svc, k)
            earned = await svc.earn(c.Earn(k(), m, "points", 100))
            await svc.redeem(c.Redeem(k(), m, "points", 100))
            await svc.reverse(c.Reverse(k(), earned.transaction.transaction_id, full=True))
            assert (await svc.get_balance(m, "points")).balance_points == -100
            sources.append(m)
        target = await new_member(svc, k)
        await svc.earn(c.Earn(k(), target, "points", 60))
        hold = await svc.place_hold(c.PlaceHold(k(), target, "points", 60))

        for source in sources:
            await svc.merge_members(c.MergeMembers(k(), source, target))

        after = await svc.get_balance(target, "points")
        assert (after.balance_points, after.reserved_points, after.debt_points) == (60, 60, 200)
        captured = await svc.capture_hold(c.CaptureHold(k(), hold.hold.hold_id, 0))
        assert captured.transaction.points == -60
        assert (await svc.get_balance(target, "points")).balance_points == 0
        assert (await reconcile(ledger.app.store, ledger.clock.now())).ok
    finally:
        await stop_ledger(ledger)


async def test_an_adjustment_never_reaches_a_merged_away_member_erased_since(ledger: LedgerUnderTest) -> None:
    """Erasure replaces the MERGED status but not where the points went: an adjustment must go
    to the member it was merged into, before and after the erasure alike."""
    svc = ledger.app.service
    source, target = await new_member(svc, k), await new_member(svc, k)
    await svc.merge_members(c.MergeMembers(k(), source, target))
    await svc.erase_member(c.EraseMember(k(), source))

    with pytest.raises(MemberNotActive):
        await svc.adjust(c.Adjust(k(), source, "points", 50, "goodwill", "ops-anna"))
    assert (await svc.get_balance(source, "points")).balance_points == 0


async def test_erasing_a_member_erases_the_accounts_merged_into_it(ledger: LedgerUnderTest) -> None:
    """Two accounts of one person were merged; erasing the survivor must not leave the other
    account's profile behind (the merge keeps where its points went, not who it was)."""
    svc = ledger.app.service
    old = await svc.create_member(c.CreateMember(k(), (), {"name": "Ann Example", "email": "ann@mail.test"}))
    survivor = await new_member(svc, k)
    await svc.merge_members(c.MergeMembers(k(), old.member_id, survivor))

    await svc.erase_member(c.EraseMember(k(), survivor))

    for erased in (old.member_id, survivor):
        found = await svc.member(erased)
        assert (found.status, found.profile) == (MemberStatus.ERASED, {}), erased
    assert (await svc.member(old.member_id)).merged_into == survivor  # where its points went stays


async def test_an_erasure_racing_a_merge_into_the_member_erases_the_merged_account_too(
    ledger: LedgerUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge commits while the erasure is on its way (here: once the erasure looked for the
    accounts merged into the survivor, if it looks before its write). The erasure must still
    take the merged account's profile, or refuse the merge; it looked them up before its write,
    found none, and left Ann's profile on a member merged into an erased one."""
    svc = ledger.app.service
    old = await svc.create_member(c.CreateMember(k(), (), {"name": "Ann Example", "email": "ann@mail.test"}))
    survivor = await new_member(svc, k)
    merged = asyncio.Event()
    lookup = svc.merged_into_member

    async def looked_up_before_the_merge(member_id: str) -> list[str]:
        found = await lookup(member_id)
        await merged.wait()
        return found

    monkeypatch.setattr(svc, "merged_into_member", looked_up_before_the_merge)

    async def merge() -> None:
        try:
            await svc.merge_members(c.MergeMembers(k(), old.member_id, survivor))
        finally:
            merged.set()

    outcomes = await asyncio.gather(merge(), svc.erase_member(c.EraseMember(k(), survivor)), return_exceptions=True)
    assert not isinstance(outcomes[1], BaseException), outcomes[1]
    found = await svc.member(old.member_id)
    if isinstance(outcomes[0], MemberNotActive):  # the erasure came first: nothing merged
        assert found.status == MemberStatus.ACTIVE
    else:
        assert outcomes[0] is None, outcomes[0]
        assert (found.status, found.profile, found.merged_into) == (MemberStatus.ERASED, {}, survivor)


async def test_an_adjustment_replayed_through_ingest_after_a_merge_answers_as_the_first_time(
    ledger: LedgerUnderTest,
) -> None:
    """A back-office file sent again after the member was merged: the adjustment it already
    posted is answered as posted (unary Adjust did so; the batch refused it as merged)."""
    svc = ledger.app.service
    source, target = await new_member(svc, k), await new_member(svc, k)
    adjust = c.Adjust(k(), source, "points", 5, "goodwill", "ops-anna")
    [(first, replayed)] = await svc.ingest([adjust])
    assert not replayed
    await svc.merge_members(c.MergeMembers(k(), source, target))

    [again] = await svc.ingest([adjust])

    assert again == (first, True)
    [fresh] = await svc.ingest([c.Adjust(k(), source, "points", 5, "goodwill", "ops-anna")])
    assert isinstance(fresh, MemberNotActive)


async def test_a_refused_merge_gives_its_key_back_for_the_corrected_request(ledger: LedgerUnderTest) -> None:
    """Refused with nothing written (an open hold on the source), the merge frees its key, as a
    refused posting does: asked again once the hold is settled, or into another member, the
    key is the same request's, not a conflict."""
    svc = ledger.app.service
    source, first_target, other_target = await new_member(svc, k), await new_member(svc, k), await new_member(svc, k)
    await svc.earn(c.Earn(k(), source, "points", 1000))
    hold = await svc.place_hold(c.PlaceHold(k(), source, "points", 400))
    key = k()
    with pytest.raises(FailedPrecondition, match="open holds"):
        await svc.merge_members(c.MergeMembers(key, source, first_target))
    await svc.void_hold(c.VoidHold(k(), hold.hold.hold_id))

    merged = await svc.merge_members(c.MergeMembers(key, source, other_target))
    assert merged.target.member_id == other_target
    assert (await svc.get_balance(other_target, "points")).balance_points == 1000
    assert (await svc.member(source, "source_member_id")).merged_into == other_target
