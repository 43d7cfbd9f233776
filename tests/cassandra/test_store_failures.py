"""What a client sees when Cassandra does not answer: UNAVAILABLE (retried by the client with
the same idempotency key), and a retry that finishes what the failed attempt began."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from cassandra import OperationTimedOut, ReadTimeout, WriteTimeout
from cassandra import Unavailable as DriverUnavailable
from cassandra.cluster import NoHostAvailable

from ledger_svc import commands as c
from ledger_svc.app import policy_from
from ledger_svc.domain import ExternalId, FailedPrecondition, IdemKey, MemberStatus, NotFound, Unavailable
from ledger_svc.server import grpc_code
from ledger_svc.service import LedgerService
from ledger_svc.store import cassandra as cassandra_store
from ledger_svc.store.cassandra import Conflict, UnknownOutcome
from pointmesh.clock import ManualClock
from pointmesh.config import load_settings
from tests.cassandra.faults import WatchedSession
from tests.conftest import CassandraSession

DRIVER_FAILURES = [
    OperationTimedOut("timed out"),
    NoHostAvailable("no host", {}),
    ReadTimeout("read timeout"),
    WriteTimeout("write timeout", write_type=0),
    DriverUnavailable("too few replicas"),
]


@pytest.mark.parametrize("failure", DRIVER_FAILURES, ids=lambda e: type(e).__name__)
async def test_a_driver_failure_reaches_clients_as_unavailable(
    cassandra_session: CassandraSession, failure: Exception
) -> None:
    store = cassandra_session.open_store("f" + uuid.uuid4().hex[:12], 1)
    watched = WatchedSession.on(store)
    watched.fault = lambda name, _: failure if name == "live" else None
    try:
        with pytest.raises(Unavailable) as raised:
            await store.write(0, lambda tx: tx.put_member_state("m1", "{}"))
        assert grpc_code(raised.value) == grpc.StatusCode.UNAVAILABLE
    finally:
        await store.close()


async def test_a_unit_that_never_wins_its_condition_is_unavailable(
    cassandra_session: CassandraSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cassandra_store, "MAX_ATTEMPTS", 3)
    store = cassandra_session.open_store("f" + uuid.uuid4().hex[:12], 1)

    def always_raced(_tx: Any) -> None:
        raise Conflict("changed since it was read")

    try:
        with pytest.raises(Unavailable) as raised:
            await store.write(0, always_raced)
        assert grpc_code(raised.value) == grpc.StatusCode.UNAVAILABLE
        assert grpc_code(UnknownOutcome("a later write hides whether it applied")) == grpc.StatusCode.UNAVAILABLE
    finally:
        await store.close()


@pytest.mark.parametrize("failing", ["ext_claim", "member_put"])
async def test_create_member_retried_after_a_timeout_creates_it_and_keeps_the_email_usable(
    cassandra_session: CassandraSession, failing: str
) -> None:
    """The member row's write times out after the email was claimed for it (`member_put`), or
    the email's claim after the member's claim named it (`ext_claim`): the retry with the same
    key must finish the member."""
    store = cassandra_session.open_store("f" + uuid.uuid4().hex[:12], 1)
    service = LedgerService(store, ManualClock(), policy_from(load_settings({})), card_secret="secret")
    email = ExternalId("email", "ada@example.com")
    cmd = c.CreateMember(IdemKey("", "signup-1"), (email,), {"name": "Ada"})
    watched = WatchedSession.on(store)

    def member_row_times_out(name: str, params: tuple[Any, ...]) -> Exception | None:
        if name == failing:
            watched.fault = None  # once
            return OperationTimedOut(f"{name} timed out")
        return None

    watched.fault = member_row_times_out
    try:
        with pytest.raises((Unavailable, OperationTimedOut)):
            await service.create_member(cmd)
        member = await service.create_member(cmd)
        assert member.external_ids == (email,)
        assert (await service.lookup_member(email)).member_id == member.member_id
        assert (await service.get_member(member.member_id)).profile == {"name": "Ada"}
        assert (await service.create_member(cmd)).member_id == member.member_id  # replays
        with pytest.raises(FailedPrecondition):  # the email is the member's now, not free
            await service.create_member(c.CreateMember(IdemKey("", "signup-2"), (email,), {}))
    finally:
        await store.close()


def directory_service(cassandra_session: CassandraSession) -> tuple[Any, LedgerService]:
    """A ledger on a fresh keyspace of one shard, for tests that refuse its directory writes."""
    store = cassandra_session.open_store("p" + uuid.uuid4().hex[:12], 1)
    return store, LedgerService(store, ManualClock(), policy_from(load_settings({})), card_secret="secret")


async def test_a_block_retried_after_its_status_write_was_refused_blocks_the_member(
    cassandra_session: CassandraSession,
) -> None:
    """The status write was refused while the claim's result, sent beside it, landed: the
    retry answered "done" and the member stayed ACTIVE (free to earn and redeem). The block's
    conditional status write now goes before the claim's result."""
    store, service = directory_service(cassandra_session)
    try:
        member = await service.create_member(c.CreateMember(IdemKey("", "signup-b"), (), {}))
        WatchedSession.on(store).refuse_next = "member_block"
        block = c.SetMemberBlocked(IdemKey("", "block-b"), member.member_id, True, "card stolen")
        with pytest.raises(Unavailable):
            await service.set_blocked(block)

        await service.set_blocked(block)  # the client's retry, same key

        assert (await service.get_member(member.member_id)).status == MemberStatus.BLOCKED
    finally:
        await store.close()


async def test_a_merge_retried_after_its_merges_row_was_refused_is_listed_as_a_merge(
    cassandra_session: CassandraSession,
) -> None:
    """Start-up recovery, the merged-member sweep and reconcile find merges by that row."""
    store, service = directory_service(cassandra_session)
    try:
        source = await service.create_member(c.CreateMember(IdemKey("", "signup-s"), (), {}))
        target = await service.create_member(c.CreateMember(IdemKey("", "signup-t"), (), {}))
        WatchedSession.on(store).refuse_next = "merge_put"
        merge = c.MergeMembers(IdemKey("", "merge-m"), source.member_id, target.member_id)
        with pytest.raises(Unavailable):
            await service.merge_members(merge)

        await service.merge_members(merge)

        assert (await service.get_member(source.member_id)).status == MemberStatus.MERGED
        assert (source.member_id, target.member_id) in await store.read_directory(lambda d: d.merged_members())
    finally:
        await store.close()


async def test_an_alias_a_refused_merge_write_left_half_moved_goes_with_the_targets_erasure(
    cassandra_session: CassandraSession,
) -> None:
    """The target's alias row was refused while the source's was deleted beside it: the email
    pointed at the target without either member listing it, so erasing the target left that
    personal data claimed for good."""
    store, service = directory_service(cassandra_session)
    email = ExternalId("email", "ada@example.com")
    try:
        source = await service.create_member(c.CreateMember(IdemKey("", "signup-s"), (email,), {}))
        target = await service.create_member(c.CreateMember(IdemKey("", "signup-t"), (), {}))
        WatchedSession.on(store).refuse_next = "ext_member_put"
        merge = c.MergeMembers(IdemKey("", "merge-a"), source.member_id, target.member_id)
        with pytest.raises(Unavailable):
            await service.merge_members(merge)
        await service.merge_members(merge)
        assert email in (await service.get_member(target.member_id)).aliases

        await service.erase_member(c.EraseMember(IdemKey("", "erase-t"), target.member_id))

        with pytest.raises(NotFound):
            await service.lookup_member(email)
    finally:
        await store.close()
