"""Cassandra keeps a member's live partition small: settled rows older than the live horizon
move to monthly history partitions, and everything the ledger answers stays the same — the
statement pages, an old hold, a late reversal of an archived earn, and reconciliation."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from ledger_svc import commands as c
from ledger_svc.domain import IdemKey, bucket_of
from ledger_svc.reconcile import reconcile
from ledger_svc.store.cassandra import CassandraLedgerStore
from pointmesh.redis_server import RedisServer
from pointmesh.v1 import common_pb2, ledger_pb2
from tests.conftest import LedgerUnderTest, start_ledger, stop_ledger, store_settings
from tests.ledger.helpers import (
    assert_books_balance,
    balance,
    create_member,
    earn,
    key,
    new_member,
    place_hold,
    points,
    redeem,
)  # fmt: skip

_n = itertools.count()


def k() -> IdemKey:
    return IdemKey("history", f"k{next(_n)}")


@pytest.fixture
async def on_cassandra(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[LedgerUnderTest]:
    # Points never expire here: 500 days on, a reversal would first expire them (as the pass
    # would have), and this file is about archived history, not expiry.
    running = await start_ledger(tmp_path / "data", redis_server.url, expiry_days=0,
                                 **store_settings(request, "cassandra"))  # fmt: skip
    yield running
    await stop_ledger(running)


async def entries_of(ledger: LedgerUnderTest, member: str, page_size: int) -> list[ledger_pb2.Entry]:
    """Every entry of the member's points account, page by page, newest first."""
    out: list[ledger_pb2.Entry] = []
    token = ""
    while True:
        page = await ledger.stub.ListEntries(ledger_pb2.ListEntriesRequest(
            member_id=member, page=common_pb2.PageRequest(page_size=page_size, page_token=token)))  # fmt: skip
        out += page.entries
        token = page.next_page_token
        if not token:
            return out


async def _statement(ledger: LedgerUnderTest, member: str) -> list[tuple[str, int, int]]:
    """Every entry of the member's points account, two per page, newest first."""
    return [(e.transaction_id, e.points, e.kind) for e in await entries_of(ledger, member, 2)]


def _live_rows(store: CassandraLedgerStore, member: str, kind: str) -> int:
    p = f"{bucket_of(member) % store.shard_count}/{member}"
    return len(list(store.q("kind", (store.ledger, p, kind))))


async def test_archived_history_answers_exactly_as_live_rows_did(on_cassandra: LedgerUnderTest) -> None:
    ledger, stub = on_cassandra, on_cassandra.stub
    store = ledger.app.store
    assert isinstance(store, CassandraLedgerStore)
    member = (await create_member(stub)).member_id
    first = (await earn(stub, member, 100)).transaction.transaction_id
    await earn(stub, member, 50)
    await redeem(stub, member, 30)
    hold = (await place_hold(stub, member, 10)).hold.hold_id
    await stub.VoidHold(ledger_pb2.VoidHoldRequest(idempotency_key=key(), hold_id=hold))
    before = await _statement(ledger, member)
    assert len(before) == 3 and _live_rows(store, member, "entry") > 0

    ledger.clock.advance(timedelta(days=500))
    moved = await store.archive(ledger.clock.now() - timedelta(days=400))
    assert moved >= 6  # three transactions, their legs, the voided hold
    assert (_live_rows(store, member, "tx"), _live_rows(store, member, "entry")) == (0, 0)
    assert _live_rows(store, member, "hold_done") == 0

    assert await _statement(ledger, member) == before
    got = (await stub.GetHold(ledger_pb2.GetHoldRequest(hold_id=hold))).hold
    assert got.status == ledger_pb2.HOLD_STATUS_VOIDED
    assert (await balance(stub, member)).balance_points == 120

    # A late return reverses part of the archived earn, then the rest: the transaction lives again.
    part = await stub.Reverse(ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=first, points=20))
    assert part.reversed_points == 20
    rest = await stub.Reverse(ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=first, full=True))
    assert rest.reversed_points == 80
    assert (await balance(stub, member)).balance_points == 20
    assert (await reconcile(store, ledger.clock.now())).ok

    await store.archive(ledger.clock.now() + timedelta(days=1))
    assert (await reconcile(store, ledger.clock.now())).ok
    assert len(await _statement(ledger, member)) == 5


async def test_reversing_an_archived_earn_that_expired_on_a_same_shard_heir_takes_it_from_breakage(
    on_cassandra: LedgerUnderTest,
) -> None:
    """A merge within the shard leaves a closed lot of the earn on each member, created in
    different months. Archived, each is found on its own member: the heir's expired points are
    taken back from breakage, not from the heir's own 500 (before, both lots were archived under
    one key, and the source's month, archived last, hid the heir's)."""
    ledger = on_cassandra
    store = ledger.app.store
    assert isinstance(store, CassandraLedgerStore)
    svc = ledger.app.service
    one = await new_member(svc, k)
    other = await new_member(svc, k, shard_of=one, same_shard=True)
    # The archive walks a shard's partitions in member order: the source's closed lot of the
    # earn (the earn's month) is archived after the heir's (the merge's month).
    heir, source = sorted([one, other])
    await svc.earn(c.Earn(k(), heir, "points", 500))
    now = svc.clock.now()
    old = await svc.earn(c.Earn(k(), source, "points", 100, expires_at=now + timedelta(days=60)))
    ledger.clock.advance(timedelta(days=40))  # another month
    await svc.merge_members(c.MergeMembers(k(), source, heir))
    ledger.clock.advance(timedelta(days=30))
    assert (await svc.run_maintenance()).expired_points == 100
    assert await points(svc, heir) == (500, 0, 0)

    ledger.clock.advance(timedelta(days=100))
    assert await store.archive(ledger.clock.now() - timedelta(days=1)) > 0

    back = await svc.reverse(c.Reverse(k(), old.transaction.transaction_id, full=True, reason="return"))
    assert back.reversed_points == 100
    assert await points(svc, heir) == (500, 0, 0)  # the 100 left the person at expiry already
    assert (await assert_books_balance(ledger)).get("system:expired:points", 0) == 0
