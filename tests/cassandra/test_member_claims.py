"""CreateMember on Cassandra, where a claim, the member's external ids and its row are separate
writes: a retry (or a racing duplicate) with the same key always ends with the member the first
attempt named, a key given up by a failed signup keeps a later claim for its full retention,
every claim is found by retention, and an external id of a signup nobody finished is free again
once no replay can finish it."""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cassandra import OperationTimedOut

from ledger_svc import commands as c
from ledger_svc.app import policy_from
from ledger_svc.domain import ExternalId, FailedPrecondition, IdemKey, Member, Unavailable
from ledger_svc.service import LedgerService
from ledger_svc.store.base import to_us
from ledger_svc.store.cassandra import CassandraLedgerStore
from ledger_svc.store.cassandra_schema import DAY_US
from pointmesh.clock import ManualClock
from pointmesh.config import load_settings
from tests.cassandra.faults import WatchedSession
from tests.conftest import CassandraSession

RETENTION = timedelta(days=35)


def _service(store: CassandraLedgerStore, clock: ManualClock | None = None) -> LedgerService:
    return LedgerService(store, clock or ManualClock(), policy_from(load_settings({})), card_secret="secret")


def _members(store: CassandraLedgerStore) -> dict[str, str]:
    rows = store.session.execute(
        f"SELECT member_id, status FROM {store.keyspace}.members WHERE ledger=%s ALLOW FILTERING", (store.ledger,)
    )
    return {r.member_id: r.status for r in rows}


def _claim(store: CassandraLedgerStore, key: str, namespace: str = "default") -> Any:
    """A claim of the service's (an empty namespace is the default one)."""
    return store.q("claim_get", (store.ledger, namespace, key)).one()


def _day_rows(store: CassandraLedgerStore, key: str) -> list[int]:
    rows = store.session.execute(
        f"SELECT created_us, key FROM {store.keyspace}.claim_days WHERE ledger=%s ALLOW FILTERING", (store.ledger,)
    )
    return [r.created_us for r in rows if r.key == key]


@pytest.mark.parametrize("external_ids", [(), (ExternalId("email", "ada@example.com"),)], ids=["no-ids", "email"])
async def test_a_retry_arriving_while_the_first_attempt_is_past_its_claim_ends_with_the_same_single_member(
    cassandra_session: CassandraSession, external_ids: tuple[ExternalId, ...]
) -> None:
    """The first call stops right after its claim applied (a deadline passes, the client sends
    the same request again); the retry and the first call, and every replay, answer with one
    member."""
    store = cassandra_session.open_store("mc" + uuid.uuid4().hex[:12], 1)
    service = _service(store)
    cmd = c.CreateMember(IdemKey("", "signup-1"), external_ids, {"name": "Ada"})
    watched = WatchedSession.on(store)
    paused, go = threading.Event(), threading.Event()

    claimed = threading.Event()

    def pause_after_the_claim(name: str, _params: tuple[Any, ...]) -> Exception | None:
        if name == "claim_put":
            claimed.set()
        elif claimed.is_set() and not paused.is_set():  # the statement after the claim
            paused.set()
            go.wait(30)
        return None

    watched.fault = pause_after_the_claim
    try:
        first = asyncio.ensure_future(service.create_member(cmd))
        assert await asyncio.to_thread(paused.wait, 30)
        retried = await service.create_member(cmd)
        go.set()
        assert (await first).member_id == retried.member_id
        assert (await service.create_member(cmd)).member_id == retried.member_id
        assert _members(store) == {retried.member_id: "ACTIVE"}
        for ext in external_ids:
            assert (await service.lookup_member(ext)).member_id == retried.member_id
    finally:
        go.set()
        await store.close()


async def test_a_key_given_up_by_a_failed_signup_keeps_its_later_claim_for_the_whole_retention(
    cassandra_session: CassandraSession,
) -> None:
    """A signup loses its email to another one while it runs, so it gives its claim back; the
    key, used again ten days later, must be kept 35 days from then, and replay that member."""
    store = cassandra_session.open_store("mc" + uuid.uuid4().hex[:12], 1)
    clock = ManualClock()
    service = _service(store, clock)
    email = ExternalId("email", "bo@example.com")
    watched = WatchedSession.on(store)
    paused, go = threading.Event(), threading.Event()

    def pause_before_the_email_claim(name: str, _params: tuple[Any, ...]) -> Exception | None:
        if name == "ext_claim" and not paused.is_set():
            paused.set()
            go.wait(30)
        return None

    watched.fault = pause_before_the_email_claim
    try:
        losing = asyncio.ensure_future(service.create_member(c.CreateMember(IdemKey("", "k-c"), (email,), {})))
        assert await asyncio.to_thread(paused.wait, 30)
        await service.create_member(c.CreateMember(IdemKey("", "other"), (email,), {}))
        go.set()
        with pytest.raises(FailedPrecondition):
            await losing
        assert _claim(store, "k-c") is None
        assert _day_rows(store, "k-c") == []  # given back with its claim

        clock.advance(timedelta(days=10))
        again = c.CreateMember(IdemKey("", "k-c"), (), {"name": "Bo"})
        member = await service.create_member(again)
        clock.advance(timedelta(days=27))  # 37 days after the first use, 27 after the second
        await service.purge_expired_keys(RETENTION)
        assert _claim(store, "k-c") is not None
        assert (await service.create_member(again)).member_id == member.member_id
    finally:
        go.set()
        await store.close()


async def test_claims_purge_keeps_a_claim_newer_than_the_index_row_that_names_its_key(
    cassandra_session: CassandraSession,
) -> None:
    """An index row left by a claim given back (by a release that did not delete it, or a
    rollback that stopped half way) must not take the key's later claim with it."""
    store = cassandra_session.open_store("mc" + uuid.uuid4().hex[:12], 1)
    t0 = datetime(2026, 1, 10, tzinfo=UTC)
    stale_us = to_us(t0)
    store.run_many([("claim_days_list_put", (store.ledger, stale_us // DAY_US)),
                    ("claim_day_put", (store.ledger, stale_us // DAY_US, stale_us, "", "k"))])  # fmt: skip
    try:
        await store.write_directory(lambda d: d.claim("", "k", "Earn", "fp", t0 + timedelta(days=10)))
        assert await store.write_directory(lambda d: d.purge_claims_before(t0 + timedelta(days=5))) == 0
        assert _claim(store, "k", "") is not None
        assert _day_rows(store, "k") == [stale_us + 10 * DAY_US]  # the stale row went, the claim's stays
        assert await store.write_directory(lambda d: d.purge_claims_before(t0 + timedelta(days=11))) == 1
        assert _claim(store, "k", "") is None
    finally:
        await store.close()


@pytest.mark.parametrize("failing", ["claim_days_list_put", "claim_day_put"])
@pytest.mark.parametrize("retried", [False, True], ids=["given-up", "retried"])
async def test_a_claim_whose_day_index_write_failed_is_purged_whether_or_not_anyone_retries(
    cassandra_session: CassandraSession, failing: str, retried: bool
) -> None:
    """The index goes out before the claim: a failed index write leaves no claim behind, so
    none is left that retention cannot find when the client gives up."""
    store = cassandra_session.open_store("mc" + uuid.uuid4().hex[:12], 1)
    clock = ManualClock()
    service = _service(store, clock)
    cmd = c.CreateMember(IdemKey("", "k-a"), (), {})
    watched = WatchedSession.on(store)

    def index_write_times_out(name: str, _params: tuple[Any, ...]) -> Exception | None:
        if name == failing:
            watched.fault = None  # once
            return OperationTimedOut(f"{name} write timed out")
        return None

    watched.fault = index_write_times_out
    try:
        with pytest.raises(Unavailable):
            await service.create_member(cmd)
        if retried:
            member = await service.create_member(cmd)
            assert _day_rows(store, "k-a") == [to_us(member.created_at)]
            assert _claim(store, "k-a").result == member.member_id
        clock.advance(RETENTION + timedelta(days=1))
        await service.purge_expired_keys(RETENTION)
        assert _claim(store, "k-a") is None
    finally:
        await store.close()


async def test_a_retry_gets_the_external_ids_whose_member_ext_write_failed_and_erase_frees_them(
    cassandra_session: CassandraSession,
) -> None:
    """A member_ext write times out: the member row must not stand without it (a retry would
    answer the member without that id and erase would leave the email locked)."""
    store = cassandra_session.open_store("mc" + uuid.uuid4().hex[:12], 1)
    service = _service(store)
    email = ExternalId("email", "bo@example.com")
    cmd = c.CreateMember(IdemKey("", "k-e"), (email,), {})
    watched = WatchedSession.on(store)

    def member_ext_times_out(name: str, _params: tuple[Any, ...]) -> Exception | None:
        if name == "ext_member_put":
            watched.fault = None  # once
            return OperationTimedOut("ext_member_put timed out")
        return None

    watched.fault = member_ext_times_out
    try:
        with pytest.raises(Unavailable):
            await service.create_member(cmd)
        member = await service.create_member(cmd)
        assert member.external_ids == (email,)
        assert (await service.get_member(member.member_id)).external_ids == (email,)
        await service.erase_member(c.EraseMember(IdemKey("", "er"), member.member_id))
        again = await service.create_member(c.CreateMember(IdemKey("", "k-e2"), (email,), {}))
        assert (await service.lookup_member(email)).member_id == again.member_id
    finally:
        await store.close()


@pytest.mark.parametrize("paused_at", ["ext_claim", "ext_member_put"])
@pytest.mark.parametrize("action", ["block", "erase"])
async def test_a_late_first_attempt_never_undoes_a_block_or_erase_of_the_member_its_retry_finished(
    cassandra_session: CassandraSession, paused_at: str, action: str
) -> None:
    """The first attempt stalls after its claim; its retry finishes the member, the client
    blocks or erases it; then the first attempt goes on. The member stays as the client left
    it, and an erased member's email is free for good."""
    store = cassandra_session.open_store("mc" + uuid.uuid4().hex[:12], 1)
    service = _service(store)
    email = ExternalId("email", "dee@example.com")
    cmd = c.CreateMember(IdemKey("", "k-s"), (email,), {"name": "Dee"})
    watched = WatchedSession.on(store)
    paused, go = threading.Event(), threading.Event()

    def stall(name: str, _params: tuple[Any, ...]) -> Exception | None:
        if name == paused_at and not paused.is_set():
            paused.set()
            go.wait(30)
        return None

    watched.fault = stall
    try:
        first = asyncio.ensure_future(service.create_member(cmd))
        assert await asyncio.to_thread(paused.wait, 30)
        member = await service.create_member(cmd)
        if action == "erase":
            await service.erase_member(c.EraseMember(IdemKey("", "er"), member.member_id))
        else:
            await service.set_blocked(c.SetMemberBlocked(IdemKey("", "bl"), member.member_id, True))
        go.set()
        late = await first
        assert late.member_id == member.member_id
        stored = store.q("member_get", (store.ledger, member.member_id)).one()
        if action == "erase":
            assert (stored.status, stored.profile) == ("ERASED", "{}")
            assert late.status == "ERASED"
            assert (await service.get_member(member.member_id)).external_ids == ()
            other = await service.create_member(c.CreateMember(IdemKey("", "k-s2"), (email,), {}))
            assert (await service.lookup_member(email)).member_id == other.member_id
        else:
            assert stored.status == "BLOCKED"
            assert (await service.get_member(member.member_id)).external_ids == (email,)
            assert (await service.lookup_member(email)).member_id == member.member_id
        assert _members(store).get(member.member_id) == stored.status
    finally:
        go.set()
        await store.close()


async def test_an_external_id_of_a_signup_nobody_finished_is_free_again_once_no_replay_can_finish_it(
    cassandra_session: CassandraSession,
) -> None:
    """The signup stops after claiming its email, before its phone, and the client gives up.
    Within retention the email stays its (a retry may still finish it); past retention (1 s
    here, plus as much again) a new signup gets it, a finished member's email stays theirs."""
    cassandra_session.reconnected()
    store = CassandraLedgerStore(cassandra_session.session, cassandra_session.settings.cassandra_keyspace,
                                 "mc" + uuid.uuid4().hex[:12], 1, retention=timedelta(seconds=1))  # fmt: skip
    service = _service(store)
    email, phone, kept = (
        ExternalId("email", "cy@example.com"),
        ExternalId("phone", "+440001"),
        ExternalId("email", "d@x"),
    )
    finished = await service.create_member(c.CreateMember(IdemKey("", "k-done"), (kept,), {}))
    watched = WatchedSession.on(store)

    def phone_claim_times_out(name: str, params: tuple[Any, ...]) -> Exception | None:
        if name == "ext_claim" and params[1] == "phone":
            watched.fault = None
            return OperationTimedOut("phone claim timed out")
        return None

    watched.fault = phone_claim_times_out
    given_up = c.CreateMember(IdemKey("", "k-b"), (email, phone), {})
    try:
        with pytest.raises(Unavailable):
            await service.create_member(given_up)
        with pytest.raises(FailedPrecondition):
            await service.create_member(c.CreateMember(IdemKey("", "k-b2"), (email,), {}))
        await asyncio.sleep(2.5)
        member = await service.create_member(c.CreateMember(IdemKey("", "k-b2"), (email,), {}))
        assert (await service.lookup_member(email)).member_id == member.member_id
        with pytest.raises(FailedPrecondition):
            await service.create_member(c.CreateMember(IdemKey("", "k-d2"), (kept,), {}))
        with pytest.raises(FailedPrecondition):  # the email is the new member's now
            await service.create_member(given_up)
        assert _members(store) == {finished.member_id: "ACTIVE", member.member_id: "ACTIVE"}
    finally:
        await store.close()


@pytest.mark.parametrize("rollback_paused", ["at-its-start", "after-its-mark"])
async def test_a_failed_first_attempt_rolling_back_never_takes_what_its_retry_finished_the_member_with(
    cassandra_session: CassandraSession, rollback_paused: str
) -> None:
    """The first attempt loses the phone to another signup and rolls back; meanwhile that
    signup is erased and the client's retry comes. Either the retry finishes the member the
    claim named and keeps its claim and both ids (the first attempt then answers with it), or
    the rollback got there first and the retry makes a member of its own; never a member
    whose email or claim was deleted under it."""
    store = cassandra_session.open_store("mc" + uuid.uuid4().hex[:12], 1)
    clock = ManualClock()
    service = _service(store, clock)
    email, phone = ExternalId("email", "ada@example.com"), ExternalId("phone", "+44111")
    cmd = c.CreateMember(IdemKey("", "k-r"), (email, phone), {"name": "Ada"})
    watched = WatchedSession.on(store)
    at_claims, go_claims, at_rollback, go_rollback = (threading.Event() for _ in range(4))
    seen: list[str] = []

    def stall(name: str, _params: tuple[Any, ...]) -> Exception | None:
        if name == "ext_claim" and not at_claims.is_set():
            at_claims.set()
            go_claims.wait(30)
        elif go_claims.is_set() and not at_rollback.is_set():
            seen.append(name)
            after = seen[1:] if rollback_paused == "at-its-start" else seen[seen.index("member_give_up") + 1 :] if "member_give_up" in seen else []  # fmt: skip
            if after:
                at_rollback.set()
                go_rollback.wait(30)
        return None

    watched.fault = stall
    try:
        first = asyncio.ensure_future(service.create_member(cmd))
        assert await asyncio.to_thread(at_claims.wait, 30)
        named = _claim(store, "k-r").result
        other = await service.create_member(c.CreateMember(IdemKey("", "k-z"), (phone,), {}))
        go_claims.set()
        assert await asyncio.to_thread(at_rollback.wait, 30)
        await service.erase_member(c.EraseMember(IdemKey("", "ez"), other.member_id))
        clock.advance(timedelta(seconds=1))
        retried = await service.create_member(cmd)
        go_rollback.set()
        (answer,) = await asyncio.gather(first, return_exceptions=True)
        watched.fault = None
        assert _claim(store, "k-r").result == retried.member_id
        assert _day_rows(store, "k-r") == [to_us(retried.created_at)]
        assert set((await service.get_member(retried.member_id)).external_ids) == {email, phone}
        for ext in (email, phone):
            assert (await service.lookup_member(ext)).member_id == retried.member_id
        if rollback_paused == "at-its-start":
            assert retried.member_id == named
            assert isinstance(answer, Member) and answer.member_id == named
        else:
            assert retried.member_id != named
            assert isinstance(answer, FailedPrecondition)
        assert (await service.create_member(cmd)).member_id == retried.member_id
        with pytest.raises(FailedPrecondition):
            await service.create_member(c.CreateMember(IdemKey("", "k-3"), (email,), {}))
        assert {m for m, status in _members(store).items() if status == "ACTIVE"} == {retried.member_id}
    finally:
        go_claims.set()
        go_rollback.set()
        await store.close()
