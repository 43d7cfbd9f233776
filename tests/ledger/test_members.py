"""Members over gRPC: merge keeps lots and expiry, block, erase, and payment-card tokens."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from pointmesh.v1 import common_pb2, ledger_pb2
from tests.conftest import LedgerUnderTest
from tests.ledger.helpers import (
    assert_books_balance,
    balance,
    create_member,
    earn,
    entries,
    error_field,
    error_reason,
    figures,
    key,
    place_hold,
    redeem,
    rpc_error,
    ts,
)

CARD = "4111 1111 1111 1111"


def ext(kind: str, value: str) -> common_pb2.ExternalId:
    return common_pb2.ExternalId(kind=kind, value=value)


async def lookup(ledger: LedgerUnderTest, kind: str, value: str) -> ledger_pb2.Member:
    return (await ledger.stub.LookupMember(ledger_pb2.LookupMemberRequest(external_id=ext(kind, value)))).member


async def get_member(ledger: LedgerUnderTest, member_id: str) -> ledger_pb2.Member:
    return (await ledger.stub.GetMember(ledger_pb2.GetMemberRequest(member_id=member_id))).member


async def merge(ledger: LedgerUnderTest, source: str, target: str, name: str = "") -> ledger_pb2.MergeMembersResponse:
    return await ledger.stub.MergeMembers(
        ledger_pb2.MergeMembersRequest(idempotency_key=key(name), source_member_id=source, target_member_id=target)
    )


# Merge ------------------------------------------------------------------------------------


async def test_merge_moves_lots_with_their_expiry_and_keeps_ids_as_aliases(ledger: LedgerUnderTest) -> None:
    now = ledger.clock.now()
    source = (await create_member(ledger.stub, external_ids=[ext("card", "C-100")])).member_id
    target = (await create_member(ledger.stub, external_ids=[ext("card", "C-200")])).member_id
    await earn(ledger.stub, source, 100, expires_at=ts(now + timedelta(days=10)))
    await earn(ledger.stub, source, 200, expires_at=ts(now + timedelta(days=100)))
    await earn(ledger.stub, source, 50, release_at=ts(now + timedelta(days=14)))
    await earn(ledger.stub, target, 300, expires_at=ts(now + timedelta(days=200)))

    merged = await merge(ledger, source, target, "merge-1")
    assert dict(merged.moved_points) == {"points": 300}
    assert merged.target.member_id == target
    assert [(a.kind, a.value) for a in merged.target.aliases] == [("card", "C-100")]
    gone = await get_member(ledger, source)
    assert (gone.status, gone.merged_into_member_id) == (ledger_pb2.MEMBER_STATUS_MERGED, target)
    assert figures(await balance(ledger.stub, target)) == {
        "balance": 600, "reserved": 0, "available": 600, "pending": 50, "debt": 0,
    }  # fmt: skip
    assert figures(await balance(ledger.stub, source)) == {
        "balance": 0, "reserved": 0, "available": 0, "pending": 0, "debt": 0,
    }  # fmt: skip
    assert (await lookup(ledger, "card", "C-100")).member_id == target
    assert (await lookup(ledger, "card", "C-200")).member_id == target

    ledger.clock.advance(timedelta(days=11))
    report = await ledger.stub.RunExpiry(ledger_pb2.RunExpiryRequest())
    assert (report.expired_points, report.pending_released) == (100, 0)
    assert (await balance(ledger.stub, target)).balance_points == 500

    ledger.clock.advance(timedelta(days=4))
    report = await ledger.stub.RunExpiry(ledger_pb2.RunExpiryRequest())
    assert (report.expired_points, report.pending_released) == (0, 1)
    assert figures(await balance(ledger.stub, target)) == {
        "balance": 550, "reserved": 0, "available": 550, "pending": 0, "debt": 0,
    }  # fmt: skip

    ledger.clock.advance(timedelta(days=86))
    report = await ledger.stub.RunExpiry(ledger_pb2.RunExpiryRequest())
    assert report.expired_points == 200
    assert (await balance(ledger.stub, target)).balance_points == 350
    await assert_books_balance(ledger)


async def test_credit_under_review_can_still_be_released_after_a_merge(ledger: LedgerUnderTest) -> None:
    source = (await create_member(ledger.stub)).member_id
    target = (await create_member(ledger.stub)).member_id
    reviewed = await earn(ledger.stub, source, 80, pending_review=True)
    await merge(ledger, source, target)
    assert figures(await balance(ledger.stub, target))["pending"] == 80

    await ledger.stub.ReleasePending(
        ledger_pb2.ReleasePendingRequest(idempotency_key=key(), transaction_id=reviewed.transaction.transaction_id)
    )

    assert figures(await balance(ledger.stub, target)) == {
        "balance": 80, "reserved": 0, "available": 80, "pending": 0, "debt": 0,
    }  # fmt: skip


async def test_reversing_an_earn_made_before_a_merge_takes_the_points_back_from_the_target(
    ledger: LedgerUnderTest,
) -> None:
    source = (await create_member(ledger.stub)).member_id
    target = (await create_member(ledger.stub)).member_id
    posted = await earn(ledger.stub, source, 100)
    pending = await earn(ledger.stub, source, 80, release_at=ts(ledger.clock.now() + timedelta(days=14)))
    await merge(ledger, source, target)

    for earned in (posted, pending):
        request = ledger_pb2.ReverseRequest(
            idempotency_key=key(), transaction_id=earned.transaction.transaction_id, full=True
        )
        first = await ledger.stub.Reverse(request)
        assert (first.reversed_points, first.debt_points) == (earned.transaction.points, 0)
        assert await ledger.stub.Reverse(request) == first
    ledger.clock.advance(timedelta(days=15))
    await ledger.stub.RunExpiry(ledger_pb2.RunExpiryRequest())

    zero = {"balance": 0, "reserved": 0, "available": 0, "pending": 0, "debt": 0}
    assert figures(await balance(ledger.stub, source)) == zero
    assert figures(await balance(ledger.stub, target)) == zero


async def test_merge_replay_returns_the_same_result_and_moves_nothing_twice(ledger: LedgerUnderTest) -> None:
    source = (await create_member(ledger.stub)).member_id
    target = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, source, 70)

    first = await merge(ledger, source, target, "merge-r")
    second = await merge(ledger, source, target, "merge-r")
    assert dict(second.moved_points) == dict(first.moved_points) == {"points": 70}
    assert (await balance(ledger.stub, target)).balance_points == 70
    await assert_books_balance(ledger)


async def test_merged_source_no_longer_accepts_postings(ledger: LedgerUnderTest) -> None:
    source = (await create_member(ledger.stub)).member_id
    target = (await create_member(ledger.stub)).member_id
    await merge(ledger, source, target)

    error = await rpc_error(earn(ledger.stub, source, 10), grpc.StatusCode.FAILED_PRECONDITION)
    assert (error_reason(error), error_field(error)) == ("MEMBER_NOT_ACTIVE", "member_id")
    assert (await balance(ledger.stub, source)).balance_points == 0


async def test_merge_with_an_open_hold_on_the_source_fails_precondition(ledger: LedgerUnderTest) -> None:
    source = (await create_member(ledger.stub)).member_id
    target = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, source, 100)
    await place_hold(ledger.stub, source, 40, timeout=Duration(seconds=600))

    error = await rpc_error(merge(ledger, source, target), grpc.StatusCode.FAILED_PRECONDITION)
    assert error_field(error) == "source_member_id"
    assert (await get_member(ledger, source)).status == ledger_pb2.MEMBER_STATUS_ACTIVE
    assert figures(await balance(ledger.stub, source)) == {
        "balance": 100, "reserved": 40, "available": 60, "pending": 0, "debt": 0,
    }  # fmt: skip
    assert (await balance(ledger.stub, target)).balance_points == 0


async def test_member_cannot_be_merged_into_itself(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id

    error = await rpc_error(merge(ledger, member, member), grpc.StatusCode.INVALID_ARGUMENT)
    assert error_field(error) == "target_member_id"
    assert (await get_member(ledger, member)).status == ledger_pb2.MEMBER_STATUS_ACTIVE


# Block ------------------------------------------------------------------------------------


async def test_blocked_member_keeps_points_but_cannot_earn_or_redeem_until_unblocked(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, member, 100)

    blocked = await ledger.stub.BlockMember(
        ledger_pb2.BlockMemberRequest(idempotency_key=key(), member_id=member, reason="fraud review")
    )
    assert blocked.member.status == ledger_pb2.MEMBER_STATUS_BLOCKED
    for call in (earn(ledger.stub, member, 10), redeem(ledger.stub, member, 10)):
        error = await rpc_error(call, grpc.StatusCode.FAILED_PRECONDITION)
        assert (error_reason(error), error_field(error)) == ("MEMBER_NOT_ACTIVE", "member_id")
    assert (await balance(ledger.stub, member)).balance_points == 100

    unblocked = await ledger.stub.UnblockMember(
        ledger_pb2.UnblockMemberRequest(idempotency_key=key(), member_id=member, reason="cleared")
    )
    assert unblocked.member.status == ledger_pb2.MEMBER_STATUS_ACTIVE
    await earn(ledger.stub, member, 10)
    await redeem(ledger.stub, member, 30)
    assert (await balance(ledger.stub, member)).balance_points == 80


async def test_replay_after_a_block_still_returns_the_original_result(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    request = ledger_pb2.EarnRequest(idempotency_key=key("before-block"), member_id=member, points=60)
    first = await ledger.stub.Earn(request)
    await ledger.stub.BlockMember(ledger_pb2.BlockMemberRequest(idempotency_key=key(), member_id=member))

    assert await ledger.stub.Earn(request) == first
    refused = await rpc_error(earn(ledger.stub, member, 60), grpc.StatusCode.FAILED_PRECONDITION)
    assert error_reason(refused) == "MEMBER_NOT_ACTIVE"
    assert (await balance(ledger.stub, member)).balance_points == 60


async def test_replayed_block_request_does_not_block_again_after_an_unblock(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    block = ledger_pb2.BlockMemberRequest(idempotency_key=key("block-1"), member_id=member, reason="review")
    await ledger.stub.BlockMember(block)
    await ledger.stub.UnblockMember(
        ledger_pb2.UnblockMemberRequest(idempotency_key=key("unblock-1"), member_id=member, reason="cleared")
    )

    await ledger.stub.BlockMember(block)  # a late network retry of the first request

    assert (await get_member(ledger, member)).status == ledger_pb2.MEMBER_STATUS_ACTIVE
    await earn(ledger.stub, member, 10)


async def test_a_block_sent_again_after_the_member_was_erased_or_merged_answers_as_the_first_time(
    ledger: LedgerUnderTest,
) -> None:
    """The console's block, retried (its answer lost) after the member was erased or merged: it
    failed FAILED_PRECONDITION, checked before the replay. A new block is still refused."""
    s = ledger.stub
    erased, merged, target = [(await create_member(s)).member_id for _ in range(3)]
    blocks = {m: ledger_pb2.BlockMemberRequest(idempotency_key=key(f"block-{m}"), member_id=m, reason="takeover")
              for m in (erased, merged)}  # fmt: skip
    first = {m: await s.BlockMember(request) for m, request in blocks.items()}
    await s.UnblockMember(ledger_pb2.UnblockMemberRequest(idempotency_key=key(), member_id=merged, reason="ok"))
    await s.EraseMember(ledger_pb2.EraseMemberRequest(idempotency_key=key(), member_id=erased))
    await s.MergeMembers(ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=merged,
                                                        target_member_id=target))  # fmt: skip
    for m, request in blocks.items():
        again = await s.BlockMember(request)
        assert again.member.member_id == first[m].member.member_id == m
        refused = await rpc_error(
            s.BlockMember(ledger_pb2.BlockMemberRequest(idempotency_key=key(), member_id=m, reason="again")),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert error_field(refused) == "member_id"
    assert (await get_member(ledger, merged)).status == ledger_pb2.MEMBER_STATUS_MERGED


async def test_two_copies_of_a_new_block_of_a_merged_member_sent_at_once_are_both_refused(
    ledger: LedgerUnderTest,
) -> None:
    """The second copy found the first's claim (no answer in it yet) and answered success for
    a block never applied; the first was refused. Both are refused, and a later copy too."""
    s = ledger.stub
    merged, target = [(await create_member(s)).member_id for _ in range(2)]
    await s.MergeMembers(ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=merged,
                                                        target_member_id=target))  # fmt: skip
    request = ledger_pb2.BlockMemberRequest(idempotency_key=key("twins"), member_id=merged, reason="x")
    for _ in range(3):
        answers = await asyncio.gather(s.BlockMember(request), s.BlockMember(request), return_exceptions=True)
        assert [a.code() if isinstance(a, grpc.aio.AioRpcError) else a for a in answers] == [
            grpc.StatusCode.FAILED_PRECONDITION
        ] * 2
    assert (
        (await rpc_error(s.BlockMember(request), grpc.StatusCode.FAILED_PRECONDITION)).details().endswith("is MERGED")
    )


# Erase ------------------------------------------------------------------------------------


async def test_erase_wipes_profile_and_ids_but_keeps_balance_and_journal(ledger: LedgerUnderTest) -> None:
    member = (
        await create_member(
            ledger.stub,
            external_ids=[ext("card", "C-300"), ext("payment_card", CARD)],
            profile={"name": "Ada Lovelace", "email": "ada@example.com"},
        )
    ).member_id
    await earn(ledger.stub, member, 120)
    await redeem(ledger.stub, member, 20)

    erased = (
        await ledger.stub.EraseMember(ledger_pb2.EraseMemberRequest(idempotency_key=key(), member_id=member))
    ).member
    assert erased.status == ledger_pb2.MEMBER_STATUS_ERASED
    stored = await get_member(ledger, member)
    assert (dict(stored.profile), list(stored.external_ids), list(stored.aliases)) == ({}, [], [])
    for kind, value in (("card", "C-300"), ("payment_card", CARD)):
        error = await rpc_error(
            ledger.stub.LookupMember(ledger_pb2.LookupMemberRequest(external_id=ext(kind, value))),
            grpc.StatusCode.NOT_FOUND,
        )
        assert error_field(error) == "external_id"
    assert (await balance(ledger.stub, member)).balance_points == 100
    assert [e.points for e in await entries(ledger.stub, member)] == [-20, 120]
    await assert_books_balance(ledger)
    refused = await rpc_error(earn(ledger.stub, member, 5), grpc.StatusCode.FAILED_PRECONDITION)
    assert error_reason(refused) == "MEMBER_NOT_ACTIVE"


async def test_erased_members_ids_can_be_reused_by_a_new_member(ledger: LedgerUnderTest) -> None:
    old = (await create_member(ledger.stub, external_ids=[ext("card", "C-400")])).member_id
    await ledger.stub.EraseMember(ledger_pb2.EraseMemberRequest(idempotency_key=key(), member_id=old))

    new = (await create_member(ledger.stub, external_ids=[ext("card", "C-400")])).member_id
    assert new != old
    assert (await lookup(ledger, "card", "C-400")).member_id == new


# External ids -----------------------------------------------------------------------------


async def test_payment_card_is_stored_only_as_an_hmac_token_and_still_finds_the_member(
    ledger: LedgerUnderTest,
) -> None:
    member = (
        await create_member(ledger.stub, external_ids=[ext("payment_card", CARD), ext("web", "ada@web")])
    ).member_id

    stored = await get_member(ledger, member)
    ids = {e.kind: e.value for e in stored.external_ids}
    assert ids["web"] == "ada@web"
    token = ids["payment_card"]
    assert token.startswith("hmac:")
    assert len(token) == len("hmac:") + 64
    assert CARD.replace(" ", "") not in token
    assert (await lookup(ledger, "payment_card", CARD)).member_id == member
    assert (await lookup(ledger, "payment_card", CARD.replace(" ", ""))).member_id == member
    await rpc_error(
        ledger.stub.LookupMember(ledger_pb2.LookupMemberRequest(external_id=ext("payment_card", "4111111111111112"))),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_external_id_already_owned_by_another_member_is_refused(ledger: LedgerUnderTest) -> None:
    first = (await create_member(ledger.stub, external_ids=[ext("card", "C-500")])).member_id

    error = await rpc_error(
        create_member(ledger.stub, external_ids=[ext("web", "w-1"), ext("card", "C-500")]),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_field(error) == "external_ids[1]"
    assert (await lookup(ledger, "card", "C-500")).member_id == first
    await rpc_error(
        ledger.stub.LookupMember(ledger_pb2.LookupMemberRequest(external_id=ext("web", "w-1"))),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_a_merged_member_cannot_be_adjusted(ledger: LedgerUnderTest) -> None:
    source = (await create_member(ledger.stub)).member_id
    target = (await create_member(ledger.stub)).member_id
    await ledger.stub.MergeMembers(
        ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=source, target_member_id=target)
    )
    adjust = ledger.stub.Adjust(
        ledger_pb2.AdjustRequest(idempotency_key=key(), member_id=source, points=10, reason="goodwill")
    )
    error = await rpc_error(adjust, grpc.StatusCode.FAILED_PRECONDITION)
    assert (error_reason(error), error_field(error)) == ("MEMBER_NOT_ACTIVE", "member_id")
    assert (await balance(ledger.stub, source)).balance_points == 0


async def test_a_block_or_merge_made_through_one_replica_reaches_another_replicas_checks(
    ledger: LedgerUnderTest,
) -> None:
    """Two ledger processes share one store; the second had read the member as ACTIVE. Once its
    cached status is older than its bound (shortened here), the block made through the first
    stops it earning, and a merge stops it posting to the merged-away member."""
    from ledger_svc import commands as c
    from ledger_svc.domain import IdemKey, MemberNotActive
    from ledger_svc.service import LedgerService

    first = ledger.app.service
    second = LedgerService(ledger.app.store, ledger.clock, first.policy, card_secret="replica")
    second._status_cache.seconds = 0.05
    blocked, merged, heir = [await create_member(ledger.stub) for _ in range(3)]
    for member in (blocked.member_id, merged.member_id):
        await second.earn(c.Earn(IdemKey("replica", f"warm-{member}"), member, "points", 10))
    await first.set_blocked(c.SetMemberBlocked(IdemKey("replica", "block"), blocked.member_id, True, "stolen card"))
    await first.merge_members(c.MergeMembers(IdemKey("replica", "merge"), merged.member_id, heir.member_id))
    await asyncio.sleep(0.1)

    for member in (blocked.member_id, merged.member_id):
        with pytest.raises(MemberNotActive):
            await second.earn(c.Earn(IdemKey("replica", f"after-{member}"), member, "points", 1000))
    assert figures(await balance(ledger.stub, blocked.member_id))["balance"] == 10


async def test_one_payment_card_written_two_ways_is_one_card(ledger: LedgerUnderTest) -> None:
    """Only its digits make the token: a card a till sends with dashes is the card an app sent
    with spaces, found by either, and nobody else can register it."""
    owner = (await create_member(ledger.stub, external_ids=[ext("payment_card", "4111-1111-1111-1111")])).member_id

    assert (await lookup(ledger, "payment_card", "4111 1111 1111 1111")).member_id == owner
    await rpc_error(
        create_member(ledger.stub, external_ids=[ext("payment_card", "4111111111111111")]),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


async def test_a_payment_card_value_that_is_not_a_card_number_is_refused_not_matched(ledger: LedgerUnderTest) -> None:
    """Only a card's digits are hashed: a value with none ("n/a", "VISA-ending-????") became the
    hash of nothing, so any other such value looked up (or enrolled) found that member."""
    owner = (await create_member(ledger.stub, external_ids=[ext("payment_card", "4111 1111 1111 1111")])).member_id
    for value in (
        "n/a",
        "VISA-ending-????",
        "4111111",
        "4111 1111 1111 1111 1111",
        "4111.1111.1111.1111",
    ):
        error = await rpc_error(
            ledger.stub.LookupMember(ledger_pb2.LookupMemberRequest(external_id=ext("payment_card", value))),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert error_field(error) == "external_id.value", value
        error = await rpc_error(
            create_member(ledger.stub, external_ids=[ext("web", "x@web"), ext("payment_card", value)]),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert error_field(error) == "external_ids[1].value", value
    assert (await lookup(ledger, "payment_card", "4111-1111-1111-1111")).member_id == owner
    # The same digits in another script, or with other spaces, are the same card.
    for same in (
        "٤١١١١١١١١١١١١١١١",
        "4111\u00a01111\u00a01111\u00a01111",
        "4111 1111 1111 1111\n",
        "4111\u20131111\u20131111\u20131111",
    ):
        assert (await lookup(ledger, "payment_card", same)).member_id == owner
