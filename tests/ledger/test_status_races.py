"""A block (or unblock) racing a merge or an erasure of the same member, on each store. Before,
the block checked the status on a read before its write and then wrote BLOCKED with no merge
target: a merge that landed in between was undone (the source BLOCKED, `merged_into` empty, so
a later reversal of a pre-merge earn came off the emptied source as debt while the target kept
the points, and an unblock revived the source as an account of its own); an erased member came
back BLOCKED, then ACTIVE on unblock. Now the block reads the status again under its write and
changes only ACTIVE <-> BLOCKED: whichever lands second, the merge or erasure stands."""

from __future__ import annotations

import asyncio

import grpc

from pointmesh.v1 import ledger_pb2
from tests.conftest import LedgerUnderTest
from tests.ledger.helpers import balance, create_member, earn, error_field, key

ROUNDS = 30


async def _member(ledger: LedgerUnderTest, member_id: str) -> ledger_pb2.Member:
    return (await ledger.stub.GetMember(ledger_pb2.GetMemberRequest(member_id=member_id))).member


def _block(ledger: LedgerUnderTest, member_id: str) -> object:
    return ledger.stub.BlockMember(
        ledger_pb2.BlockMemberRequest(idempotency_key=key(), member_id=member_id, reason="x")
    )


def _refused_precisely(outcome: object) -> None:
    """A block that lost the race is refused on member_id (or was applied before the other)."""
    if isinstance(outcome, grpc.aio.AioRpcError):
        assert outcome.code() == grpc.StatusCode.FAILED_PRECONDITION, outcome.details()
        assert error_field(outcome) == "member_id"
    else:
        assert not isinstance(outcome, BaseException), outcome


async def test_a_block_racing_a_merge_never_undoes_it(ledger: LedgerUnderTest) -> None:
    s = ledger.stub
    for _ in range(ROUNDS):
        source, target = (await create_member(s)).member_id, (await create_member(s)).member_id
        earned = (await earn(s, source, 100)).transaction.transaction_id
        merge = s.MergeMembers(ledger_pb2.MergeMembersRequest(
            idempotency_key=key(), source_member_id=source, target_member_id=target))  # fmt: skip
        merged, blocked = await asyncio.gather(merge, _block(ledger, source), return_exceptions=True)
        assert not isinstance(merged, BaseException), merged  # a blocked member may still be merged away
        _refused_precisely(blocked)
        found = await _member(ledger, source)
        assert (found.status, found.merged_into_member_id) == (ledger_pb2.MEMBER_STATUS_MERGED, target)

        # Unblocking the merged-away member is refused; a reversal of its earn comes off the target.
        unblock = s.UnblockMember(ledger_pb2.UnblockMemberRequest(idempotency_key=key(), member_id=source, reason="x"))
        (unblocked,) = await asyncio.gather(unblock, return_exceptions=True)
        assert isinstance(unblocked, grpc.aio.AioRpcError), unblocked
        _refused_precisely(unblocked)
        assert (await _member(ledger, source)).status == ledger_pb2.MEMBER_STATUS_MERGED
        await s.Reverse(ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=earned, reason="x", full=True))
        assert ((await balance(s, target)).balance_points, (await balance(s, source)).debt_points) == (0, 0)


async def test_a_block_racing_an_erasure_never_revives_the_member(ledger: LedgerUnderTest) -> None:
    s = ledger.stub
    for _ in range(ROUNDS):
        member = (await create_member(s)).member_id
        erase = s.EraseMember(ledger_pb2.EraseMemberRequest(idempotency_key=key(), member_id=member))
        erased, blocked = await asyncio.gather(erase, _block(ledger, member), return_exceptions=True)
        assert not isinstance(erased, BaseException), erased
        _refused_precisely(blocked)
        assert (await _member(ledger, member)).status == ledger_pb2.MEMBER_STATUS_ERASED
