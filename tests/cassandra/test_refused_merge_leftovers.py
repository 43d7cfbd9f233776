"""Directory units on Cassandra are several writes, not one transaction: the `merges` row a merge
refused at its status write leaves behind must not change what later, unrelated requests do."""

from __future__ import annotations

import pytest

from ledger_svc import commands as c
from ledger_svc.domain import ExternalId, IdemKey, MemberNotActive, MemberStatus, Unavailable
from tests.cassandra.faults import WatchedSession
from tests.cassandra.test_store_failures import directory_service
from tests.conftest import CassandraSession


async def test_erasing_a_member_never_erases_an_active_member_a_refused_merge_named(
    cassandra_session: CassandraSession,
) -> None:
    """A merge of A into B whose status write was refused (UNAVAILABLE) left its `merges` row:
    A stays ACTIVE, not merged (get_member says so), and the merge retried is refused (B was
    blocked meanwhile). Erasing B later must erase B only; on Cassandra it erased A too (its
    profile, its card), because the erasure finds "the accounts merged into B" by that row."""
    store, service = directory_service(cassandra_session)
    card = ExternalId("email", "alice@example.com")
    try:
        a = await service.create_member(c.CreateMember(IdemKey("", "signup-a"), (card,), {"name": "Alice"}))
        b = await service.create_member(c.CreateMember(IdemKey("", "signup-b"), (), {"name": "Bob"}))
        WatchedSession.on(store).refuse_next = "member_status"
        merge = c.MergeMembers(IdemKey("", "merge-ab"), a.member_id, b.member_id)
        with pytest.raises(Unavailable):
            await service.merge_members(merge)
        assert (await service.get_member(a.member_id)).status == MemberStatus.ACTIVE  # not merged

        await service.set_blocked(c.SetMemberBlocked(IdemKey("", "block-b"), b.member_id, True, "fraud check"))
        with pytest.raises(MemberNotActive):
            await service.merge_members(merge)  # the client's retry, refused: nothing merged

        await service.erase_member(c.EraseMember(IdemKey("", "erase-b"), b.member_id))

        alice = await service.get_member(a.member_id)
        assert (alice.status, alice.profile) == (MemberStatus.ACTIVE, {"name": "Alice"})
        assert (await service.lookup_member(card)).member_id == a.member_id
    finally:
        await store.close()


async def test_start_up_recovery_leaves_an_active_member_a_refused_merge_named_alone(
    cassandra_session: CassandraSession,
) -> None:
    """The same leftover `merges` row of a merge that never happened: the start-up pass that
    finishes "merges that died after marking the source MERGED" must not touch A (ACTIVE)."""
    store, service = directory_service(cassandra_session)
    try:
        a = await service.create_member(c.CreateMember(IdemKey("", "signup-a"), (), {"name": "Alice"}))
        b = await service.create_member(c.CreateMember(IdemKey("", "signup-b"), (), {"name": "Bob"}))
        await service.earn(c.Earn(IdemKey("pos", "earn-a"), a.member_id, "points", 100))
        WatchedSession.on(store).refuse_next = "member_status"
        with pytest.raises(Unavailable):
            await service.merge_members(c.MergeMembers(IdemKey("", "merge-ab"), a.member_id, b.member_id))
        assert (await service.get_member(a.member_id)).status == MemberStatus.ACTIVE

        await service.sagas.recover(at_startup=True)

        assert (await service.get_member(a.member_id)).status == MemberStatus.ACTIVE
        assert (await service.get_balance(a.member_id, "points")).balance_points == 100
    finally:
        await store.close()
