"""Conformance suite for the LedgerStore protocol (ledger_svc/store/base.py).

Every backend must pass it unchanged. To add one, append a `Backend` to BACKENDS with a
factory that opens (creating if needed) a store of `shards` shards under a directory, and the
exception types it raises for a violated uniqueness constraint and for a shard-count mismatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ledger_svc.domain import ExternalId, Hold, HoldStatus, Lot, Member, MemberStatus, SagaState, TxKind
from ledger_svc.store.base import AccountRow, DirectoryTx, IdemRecord, LedgerStore, SagaRecord, ShardTx, TxRecord
from ledger_svc.store.cassandra import ExternalIdTaken, LayoutMismatch
from ledger_svc.store.sqlite import SqliteLedgerStore
from tests.conftest import CassandraSession

SHARDS = 4
T0 = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
NEWEST_FIRST = 2**62


@dataclass(frozen=True)
class Backend:
    name: str
    open: Callable[[Path, int], LedgerStore]
    # Raised when a unit breaks a uniqueness rule (e.g. an external id given to a second member).
    constraint_errors: tuple[type[BaseException], ...]
    # Raised when a store is reopened with another shard count than its data was written with.
    layout_errors: tuple[type[BaseException], ...]


def _sqlite(data_dir: Path, shards: int) -> LedgerStore:
    return SqliteLedgerStore(data_dir, shards)


def _sqlite_full(data_dir: Path, shards: int) -> LedgerStore:
    """fsync on every commit, which moves the units of work onto dedicated threads."""
    return SqliteLedgerStore(data_dir, shards, "FULL")


def _cassandra(request: pytest.FixtureRequest) -> Callable[[Path, int], LedgerStore]:
    """A real Cassandra node; the directory names the ledger, so a reopen finds its data."""
    cassandra: CassandraSession = request.getfixturevalue("cassandra_session")

    def open_store(data_dir: Path, shards: int) -> LedgerStore:
        return cassandra.open_store("t" + hashlib.sha1(str(data_dir).encode()).hexdigest()[:20], shards)

    return open_store


BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "sqlite": lambda _: Backend("sqlite", _sqlite, (sqlite3.IntegrityError,), (RuntimeError,)),
    "sqlite-full": lambda _: Backend("sqlite-full", _sqlite_full, (sqlite3.IntegrityError,), (RuntimeError,)),
    "cassandra": lambda request: Backend("cassandra", _cassandra(request), (ExternalIdTaken,), (LayoutMismatch,)),
}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param](request)


@pytest.fixture
async def store(backend: Backend, tmp_path: Path) -> AsyncIterator[LedgerStore]:
    opened = backend.open(tmp_path / "store", SHARDS)
    yield opened
    await opened.close()


class Boom(Exception):
    """The failure a unit of work raises on purpose."""


def _busy(tx: object) -> None:
    """Keeps a shard busy for a moment, so calls submitted meanwhile queue up behind it."""
    time.sleep(0.2)


def _tx(tx_id: str, member_id: str = "m1", points: int = 10, **extra: Any) -> TxRecord:
    return TxRecord(tx_id, TxKind.EARN, member_id, "points", points, T0, T0 - timedelta(hours=1), **extra)


def _lot(lot_id: str, *, expires_at: datetime | None, created_at: datetime, remaining: int = 5, **extra: Any) -> Lot:
    return Lot(lot_id, "m1", "points", "tx_e", remaining, remaining, expires_at, created_at, **extra)


def _hold(hold_id: str, *, expires_at: datetime, status: HoldStatus = HoldStatus.PLACED, saga_id: str = "") -> Hold:
    return Hold(hold_id, "m1", "points", 7, status, 0, T0 - timedelta(hours=1), expires_at, "ref", saga_id)


def _saga(saga_id: str) -> SagaRecord:
    return SagaRecord(saga_id, "transfer", SagaState.HELD, "m1", "m2", "points", 40, "h_1", '{"portions": []}', T0, T0)


def _member(member_id: str, *external_ids: ExternalId) -> Member:
    return Member(member_id, MemberStatus.ACTIVE, external_ids, (), {"name": "Ada"}, "", T0)


def _earn_unit(account: str, tx_id: str, points: int) -> Callable[[ShardTx], None]:
    """A complete posting: journal, balance, idempotency record and outbox row."""

    def unit(tx: ShardTx) -> None:
        record = _tx(tx_id, points=points)
        tx.add_transaction(record)
        tx.add_entries(record, [(account, points), ("funding:program:points", -points)])
        row = tx.get_accounts([account])[0]
        row.balance += points
        row.version += 1
        tx.put_account(row)
        tx.put_idempotency("pos", tx_id, IdemRecord("Earn", "fp", "{}", T0))
        tx.add_outbox(f"ev_{tx_id}", "m1", "{}", T0)

    return unit


async def test_a_unit_that_raises_after_writing_leaves_nothing_behind(store: LedgerStore) -> None:
    write = _earn_unit("member:m1:points", "tx_bad", 10)

    def failing(tx: ShardTx) -> None:
        write(tx)
        tx.add_saga(_saga("tr_bad"))
        tx.add_hold(_hold("h_bad", expires_at=T0))
        raise Boom

    with pytest.raises(Boom):
        await store.write(1, failing)

    def snapshot(tx: ShardTx) -> tuple[Any, ...]:
        return (
            tx.list_accounts(), tx.get_transaction("tx_bad"), tx.sum_entries_by_account(), tx.outbox_backlog(),
            tx.get_idempotency("pos", "tx_bad"), tx.get_saga("tr_bad"), tx.get_hold("h_bad"),
        )  # fmt: skip

    assert await store.read(1, snapshot) == ([], None, {}, 0, None, None, None)
    await store.write(1, _earn_unit("member:m1:points", "tx_good", 10))
    assert (await store.read(1, lambda tx: tx.get_accounts(["member:m1:points"])[0])).balance == 10


async def test_a_directory_unit_that_raises_leaves_nothing_behind(store: LedgerStore) -> None:
    def failing(d: DirectoryTx) -> None:
        d.add_member(_member("m_x", ExternalId("card", "42")))
        d.claim("pos", "k1", "CreateMember", "fp", T0)
        raise Boom

    with pytest.raises(Boom):
        await store.write_directory(failing)

    def snapshot(d: DirectoryTx) -> tuple[Any, ...]:
        return d.get_member("m_x"), d.find_member_id(ExternalId("card", "42"))

    assert await store.read_directory(snapshot) == (None, None)
    assert await store.write_directory(lambda d: d.claim("pos", "k1", "CreateMember", "fp", T0)) is None


async def test_sibling_units_committed_together_survive_one_that_raises(store: LedgerStore) -> None:
    def unit(i: int) -> Callable[[ShardTx], int]:
        write = _earn_unit(f"member:m{i}:points", f"tx_{i}", i + 1)

        def run(tx: ShardTx) -> int:
            write(tx)
            if i == 3:
                raise Boom
            return i

        return run

    # Submitted together behind a busy unit, the siblings share one group commit.
    busy = asyncio.ensure_future(store.write(0, _busy))
    siblings = asyncio.gather(*(store.write(0, unit(i)) for i in range(8)), return_exceptions=True)
    await busy
    outcomes = await siblings
    assert isinstance(outcomes[3], Boom)
    assert [o for i, o in enumerate(outcomes) if i != 3] == [0, 1, 2, 4, 5, 6, 7]

    accounts = {row.account: row.balance for row in await store.read(0, lambda tx: tx.list_accounts())}
    members = {a: b for a, b in accounts.items() if a.startswith("member:")}
    assert members == {f"member:m{i}:points": i + 1 for i in range(8) if i != 3}
    assert await store.read(0, lambda tx: tx.get_transaction("tx_3")) is None
    assert await store.read(0, lambda tx: tx.outbox_backlog()) == 7
    assert await store.read(0, lambda tx: tx.unbalanced_transactions()) == []


async def test_a_unit_reads_its_own_writes_and_only_what_it_put(store: LedgerStore) -> None:
    """Stores may keep a unit's writes in memory until it ends (SQLite does, to write a batch
    in bulk): every read inside the unit must still see them, and a row changed after it was
    put, without being put again, must not be written."""
    account = "member:m1:points"
    lot = _lot("lot_1", expires_at=T0 + timedelta(days=3), created_at=T0)

    def unit(tx: ShardTx) -> tuple[Any, ...]:
        _earn_unit(account, "tx_1", 10)(tx)
        tx.add_lot(lot)
        row = tx.get_accounts([account])[0]
        seen = (
            row.balance, tx.get_transaction("tx_1") is not None, tx.get_idempotency("pos", "tx_1") is not None,
            [x.lot_id for x in tx.spendable_lots("m1", "points")], tx.spendable_total("m1", "points"),
        )  # fmt: skip
        row.balance += 1000  # never put
        spent = replace(lot, remaining_points=2)
        tx.update_lot(spent)
        return (*seen, tx.spendable_total("m1", "points"))

    assert await store.write(1, unit) == (
        10, True, True, ["lot_1"], 5, 2,
    )  # fmt: skip
    assert (await store.read(1, lambda tx: tx.get_accounts([account])[0])).balance == 10
    assert await store.read(1, lambda tx: tx.spendable_total("m1", "points")) == 2
    assert [e.points for e in await store.read(1, lambda tx: tx.list_entries(account, NEWEST_FIRST, 5))] == [10]
    assert await store.read(1, lambda tx: tx.outbox_backlog()) == 1


async def test_idempotency_records_round_trip_per_namespace(store: LedgerStore) -> None:
    record = IdemRecord("Redeem", "f" * 64, '{"transaction_id": "tx_1"}', T0)
    await store.write(2, lambda tx: tx.put_idempotency("pos", "key-1", record))

    def read(tx: ShardTx) -> tuple[IdemRecord | None, ...]:
        return tx.get_idempotency("pos", "key-1"), tx.get_idempotency("web", "key-1"), tx.get_idempotency("pos", "x")

    assert await store.read(2, read) == (record, None, None)
    assert await store.read(3, lambda tx: tx.get_idempotency("pos", "key-1")) is None


async def test_account_rows_start_at_zero_and_upsert(store: LedgerStore) -> None:
    account = "member:m1:points"
    assert await store.read(0, lambda tx: tx.get_accounts([account])[0]) == AccountRow(account)
    await store.write(0, lambda tx: tx.put_account(AccountRow(account, 10, 2, 10, 1)))
    await store.write(0, lambda tx: tx.put_account(AccountRow(account, 7, 0, 12, 2)))
    assert await store.read(0, lambda tx: tx.get_accounts([account])[0]) == AccountRow(account, 7, 0, 12, 2)
    assert await store.read(0, lambda tx: tx.list_accounts()) == [AccountRow(account, 7, 0, 12, 2)]
    other = "debt:m1:points"
    assert await store.read(0, lambda tx: tx.get_accounts([other, account, other])) == [
        AccountRow(other),
        AccountRow(account, 7, 0, 12, 2),
        AccountRow(other),
    ]


async def test_transactions_round_trip_and_update(store: LedgerStore) -> None:
    record = _tx("tx_1", purchase_minor=1999, purchase_currency="EUR", lot_id="lot_1", balance_after_json="{}")
    await store.write(0, lambda tx: tx.add_transaction(record))
    assert await store.read(0, lambda tx: tx.get_transaction("tx_1")) == record
    record.reversed_points, record.refunded_minor = 4, 800
    await store.write(0, lambda tx: tx.update_transaction(record))
    assert await store.read(0, lambda tx: tx.get_transaction("tx_1")) == record


async def test_entries_list_newest_first_and_page_before_an_entry_id(store: LedgerStore) -> None:
    account = "member:m1:points"
    for i in range(1, 6):
        await store.write(0, _earn_unit(account, f"tx_{i}", i))
    await store.write(0, _earn_unit("member:m2:points", "tx_other", 100))

    pages: list[list[int]] = []
    before = NEWEST_FIRST
    while page := await store.read(0, lambda tx, b=before: tx.list_entries(account, b, 2)):
        assert [e.entry_id for e in page] == sorted((e.entry_id for e in page), reverse=True)
        assert all(e.account == account and e.kind == TxKind.EARN for e in page)
        pages.append([e.points for e in page])
        before = page[-1].entry_id
    assert pages == [[5, 4], [3, 2], [1]]

    newest = (await store.read(0, lambda tx: tx.list_entries(account, NEWEST_FIRST, 1)))[0]
    assert (newest.transaction_id, newest.recorded_at, newest.business_time) == ("tx_5", T0, T0 - timedelta(hours=1))
    sums = await store.read(0, lambda tx: tx.sum_entries_by_account())
    assert sums == {account: 15, "member:m2:points": 100, "funding:program:points": -115}


async def test_unbalanced_transactions_are_reported(store: LedgerStore) -> None:
    record = _tx("tx_skew")
    await store.write(0, lambda tx: (tx.add_transaction(record), tx.add_entries(record, [("member:m1:points", 10)])))
    assert await store.read(0, lambda tx: tx.unbalanced_transactions()) == [("tx_skew", 10)]


async def test_spendable_lots_order_by_expiry_nulls_last_then_creation(store: LedgerStore) -> None:
    never = _lot("lot_never", expires_at=None, created_at=T0)
    late = _lot("lot_late", expires_at=T0 + timedelta(days=10), created_at=T0 + timedelta(hours=2))
    soon_new = _lot("lot_soon_new", expires_at=T0 + timedelta(days=5), created_at=T0 + timedelta(hours=3))
    soon_old = _lot("lot_soon_old", expires_at=T0 + timedelta(days=5), created_at=T0 + timedelta(hours=1))
    pending = _lot("lot_pending", expires_at=T0 + timedelta(days=1), created_at=T0, pending=True, release_at=T0)
    spent = _lot("lot_spent", expires_at=T0 + timedelta(days=1), created_at=T0, remaining=0)
    other_unit = Lot("lot_tier", "m1", "tier_credits", "tx_e", 5, 5, T0, T0)

    def add(tx: ShardTx) -> None:
        for lot in (never, late, soon_new, soon_old, pending, spent, other_unit):
            tx.add_lot(lot)

    await store.write(0, add)
    spendable = await store.read(0, lambda tx: tx.spendable_lots("m1", "points"))
    assert [lot.lot_id for lot in spendable] == ["lot_soon_old", "lot_soon_new", "lot_late", "lot_never"]
    assert spendable[-1] == never
    assert await store.read(0, lambda tx: tx.spendable_total("m1", "points")) == 20
    assert [lot.lot_id for lot in await store.read(0, lambda tx: tx.pending_lots("m1", "points"))] == ["lot_pending"]
    expiring, cursor = await store.read(0, lambda tx: tx.lots_expired_by(T0 + timedelta(days=6), 10))
    assert cursor is None  # fewer than a page
    assert [lot.lot_id for lot in expiring] == ["lot_tier", "lot_soon_old", "lot_soon_new"]
    assert [lot.lot_id for lot in await store.read(0, lambda tx: tx.pending_due_by(T0, 10))] == ["lot_pending"]

    soon_old.remaining_points = 0
    await store.write(0, lambda tx: tx.update_lot(soon_old))
    assert await store.read(0, lambda tx: tx.spendable_total("m1", "points")) == 15
    assert (await store.read(0, lambda tx: tx.lot_of_transaction("tx_e"))) is not None
    totals = await store.read(0, lambda tx: tx.lot_totals())
    assert totals[("m1", "points", False)] == 15
    assert totals[("m1", "points", True)] == 5


async def test_due_lots_page_by_cursor_each_exactly_once(store: LedgerStore) -> None:
    """Seven due lots (four share one expiry instant, as a campaign's do) in pages of three."""
    same = T0 + timedelta(days=1)
    lots = [Lot(f"lot_{i}", f"m{i % 3}", "points", f"tx_{i}", 5, 5, same if i < 4 else T0 + timedelta(hours=i), T0)
            for i in range(7)]  # fmt: skip
    lots.append(Lot("lot_later", "m1", "points", "tx_later", 5, 5, T0 + timedelta(days=30), T0))

    def add(tx: ShardTx) -> None:
        for lot in lots:
            tx.add_lot(lot)

    await store.write(0, add)
    seen: list[str] = []
    cursor: object = None
    for _ in range(10):
        page, cursor = await store.read(0, lambda tx: tx.lots_expired_by(T0 + timedelta(days=2), 3, cursor))  # noqa: B023
        assert len(page) <= 3
        seen += [lot.lot_id for lot in page]
        if cursor is None:
            break
    assert sorted(seen) == [f"lot_{i}" for i in range(7)]  # each once, the one due later never


async def test_holds_due_excludes_saga_holds_and_holds_not_placed(store: LedgerStore) -> None:
    due = _hold("h_due", expires_at=T0 - timedelta(minutes=1))
    saga = _hold("h_saga", expires_at=T0 - timedelta(minutes=1), saga_id="tr_1")
    later = replace(_hold("h_later", expires_at=T0 + timedelta(hours=1)), channel="pos", store_id="HEL-01")
    voided = _hold("h_void", expires_at=T0 - timedelta(hours=1), status=HoldStatus.VOIDED)

    def add(tx: ShardTx) -> None:
        for hold in (due, saga, later, voided):
            tx.add_hold(hold)

    await store.write(0, add)
    assert await store.read(0, lambda tx: tx.holds_due_by(T0, 10)) == [due]
    assert await store.read(0, lambda tx: tx.get_hold("h_saga")) == saga
    assert (
        await store.read(0, lambda tx: tx.get_hold("h_later")) == later
    )  # with the channel and store it was placed for
    assert await store.read(0, lambda tx: tx.placed_hold_totals()) == {"m1:points": 21}
    assert {h.hold_id for h in await store.read(0, lambda tx: tx.placed_holds_of("m1"))} == {
        "h_due",
        "h_saga",
        "h_later",
    }
    await store.write(0, lambda tx: tx.set_hold_status("h_due", HoldStatus.CAPTURED, 5))
    captured = await store.read(0, lambda tx: tx.get_hold("h_due"))
    assert (captured.status, captured.captured_points) == (HoldStatus.CAPTURED, 5)
    assert await store.read(0, lambda tx: tx.holds_due_by(T0, 10)) == []


async def test_outbox_rows_stay_unrelayed_in_order_until_marked(store: LedgerStore, backend: Backend) -> None:
    def add(tx: ShardTx) -> None:
        for i in range(3):
            tx.add_outbox(f"ev_{i}", "m1", f'{{"n": {i}}}', T0)

    await store.write(0, add)
    rows = await store.read(0, lambda tx: tx.unrelayed_outbox(10))
    assert [(r.event_id, r.member_id, r.payload_json) for r in rows] == [
        (f"ev_{i}", "m1", f'{{"n": {i}}}') for i in range(3)
    ]
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    assert [r.event_id for r in await store.read(0, lambda tx: tx.unrelayed_outbox(2))] == ["ev_0", "ev_1"]
    assert await store.read(0, lambda tx: tx.outbox_backlog()) == 3

    await store.write(0, lambda tx: tx.mark_relayed([rows[0].seq, rows[1].seq], T0))
    assert [r.event_id for r in await store.read(0, lambda tx: tx.unrelayed_outbox(10))] == ["ev_2"]
    assert await store.read(0, lambda tx: tx.outbox_backlog()) == 1

    # Retention purges relayed rows only; an unrelayed one waits however old it is. (Cassandra's
    # relayed rows expire by TTL instead: tests/cassandra/test_retention.py.)
    later = T0 + timedelta(days=1)
    assert (await _purge(store, 0, T0 - timedelta(days=1), later))[0] == (0 if backend.name == "cassandra" else 2)
    assert [r.event_id for r in await store.read(0, lambda tx: tx.unrelayed_outbox(10))] == ["ev_2"]


async def test_retention_purges_in_slices_that_resume_where_the_last_one_stopped(
    store: LedgerStore, backend: Backend
) -> None:
    old, cut = T0 - timedelta(days=40), T0 - timedelta(days=30)

    def fill(tx: ShardTx) -> None:
        for i in range(7):  # every other key is past retention
            tx.put_idempotency("pos", _odd_key(i), IdemRecord("Earn", "fp", "{}", old if i % 2 == 0 else T0))
        for i in range(5):
            tx.add_outbox(f"ev_old_{i}", "m1", "{}", old)
        for i in range(5):
            tx.add_outbox(f"ev_new_{i}", "m1", "{}", T0)

    await store.write(1, fill)
    rows = await store.read(1, lambda tx: tx.unrelayed_outbox(10))
    relayed_early = [r.seq for r in rows if r.event_id != "ev_old_4" and r.event_id.startswith("ev_old")]
    await store.write(1, lambda tx: tx.mark_relayed(relayed_early, old + timedelta(days=1)))
    await store.write(1, lambda tx: tx.mark_relayed([r.seq for r in rows if r.event_id.startswith("ev_new")], T0))

    purged, slices = await _purge(store, 1, cut, cut, limit=2)
    if backend.name == "cassandra":
        # Retention there is a TTL on each row from its write (tests/cassandra/test_retention.py):
        # a purge has nothing to do, and must not delete anything either.
        assert (purged, slices) == (0, 1)
        assert all(await store.read(1, lambda tx: [tx.get_idempotency("pos", _odd_key(i)) for i in range(7)]))
        return
    assert purged == 4 + 4  # four old keys, four old relayed events
    if backend.name.startswith("sqlite"):
        # Keys two at a time (4 slices), then events (4): the third slice holds the last old
        # event and the first new one; the fourth, all new, ends the pass before the last two.
        assert slices == 8
    kept = await store.read(1, lambda tx: [tx.get_idempotency("pos", _odd_key(i)) is not None for i in range(7)])
    assert kept == [i % 2 == 1 for i in range(7)]
    # The old event never relayed is still waiting; nothing else was unrelayed.
    assert [r.event_id for r in await store.read(1, lambda tx: tx.unrelayed_outbox(10))] == ["ev_old_4"]


def _odd_key(i: int) -> str:
    """Keys a resume token must carry through: separators, quotes, non-ASCII."""
    return f'k:{i}:"ø\\'


async def _purge(
    store: LedgerStore, shard: int, idem_cut: datetime, outbox_cut: datetime, limit: int = 10_000
) -> tuple[int, int]:
    """Runs retention slices until the store says it is done: (rows purged, slices run)."""
    purged, slices, resume = 0, 0, ""
    while True:
        n, resume = await store.write(shard, functools.partial(_purge_slice, idem_cut, outbox_cut, resume, limit))
        purged, slices = purged + n, slices + 1
        if not resume:
            return purged, slices


def _purge_slice(idem_cut: datetime, outbox_cut: datetime, resume: str, limit: int, tx: ShardTx) -> tuple[int, str]:
    return tx.purge_before(idem_cut, outbox_cut, resume, limit)


async def test_purchases_list_by_store_or_channel_in_receipt_order_a_page_at_a_time(store: LedgerStore) -> None:
    midnight = datetime(2026, 1, 2, tzinfo=UTC)
    # (id, member, channel, store, receipt time): two days, a row exactly at midnight, two at
    # the same microsecond, and another channel whose rows must never show.
    rows = [
        ("pu_a", "m1", "pos", "s1", midnight - timedelta(hours=3)),
        ("pu_b", "m2", "pos", "s2", midnight - timedelta(hours=2)),
        ("pu_c", "m3", "pos", "s1", midnight),
        ("pu_e", "m1", "pos", "s1", midnight + timedelta(hours=5)),
        ("pu_d", "m2", "pos", "s1", midnight + timedelta(hours=5)),
        ("pu_f", "m3", "web", "s1", midnight + timedelta(hours=6)),
        ("pu_g", "m1", "pos", "s1", midnight + timedelta(days=1)),  # the window's end: excluded
        ("pu_h", "m2", "pos", "s1", midnight - timedelta(days=1, microseconds=1)),  # before its start
    ]

    def put(status: str) -> Callable[[ShardTx], None]:
        def unit(tx: ShardTx) -> None:
            for pid, member, channel, store_id, at in rows:
                tx.get_purchase(pid)  # the service reads a purchase before it writes it again
                tx.put_purchase(pid, member, status, at, f'{{"id": "{pid}", "status": "{status}"}}', channel, store_id)

        return unit

    await store.write(2, put("PENDING_ACCRUAL"))
    await store.write(2, put("EARNED"))  # written again: still listed once, with its new body
    window = (midnight - timedelta(days=1), midnight + timedelta(days=1))

    async def listing(store_id: str, limit: int) -> list[list[str]]:
        pages: list[list[str]] = []
        after: tuple[datetime, str] | None = None
        while True:
            page = await store.scan(2, functools.partial(_list_purchases, "pos", store_id, window, after, limit))
            assert all('"EARNED"' in body for _, _, body in page)
            pages.append([pid for _, pid, _ in page])
            if len(page) < limit:
                return pages
            after = page[-1][:2]

    assert await listing("s1", 2) == [["pu_a", "pu_c"], ["pu_d", "pu_e"], []]
    assert await listing("s1", 3) == [["pu_a", "pu_c", "pu_d"], ["pu_e"]]
    assert await listing("", 2) == [["pu_a", "pu_b"], ["pu_c", "pu_d"], ["pu_e"]]
    # A cursor from before the window (a token reused with a later start) starts at the start.
    early = (window[0] - timedelta(days=3), "pu_z")
    assert await store.scan(2, functools.partial(_list_purchases, "pos", "s1", window, early, 10)) == await store.scan(
        2, functools.partial(_list_purchases, "pos", "s1", window, None, 10)
    )
    first = await store.scan(2, functools.partial(_list_purchases, "pos", "s2", window, None, 10))
    assert first == [(midnight - timedelta(hours=2), "pu_b", '{"id": "pu_b", "status": "EARNED"}')]
    assert await store.scan(1, functools.partial(_list_purchases, "pos", "", window, None, 10)) == []


def _list_purchases(
    channel: str, store_id: str, window: tuple[datetime, datetime], after: tuple[datetime, str] | None, limit: int,
    tx: ShardTx,
) -> list[tuple[datetime, str, str]]:  # fmt: skip
    return tx.list_purchases(channel, store_id, *window, after, limit)


async def test_sagas_are_open_until_closed(store: LedgerStore) -> None:
    saga = _saga("tr_1")
    await store.write(0, lambda tx: tx.add_saga(saga))
    assert await store.read(0, lambda tx: tx.get_saga("tr_1")) == saga
    assert await store.read(0, lambda tx: tx.open_sagas()) == [saga]

    done_at = T0 + timedelta(seconds=3)
    await store.write(0, lambda tx: tx.set_saga_state("tr_1", SagaState.DONE, done_at))
    assert await store.read(0, lambda tx: tx.open_sagas()) == []
    closed = await store.read(0, lambda tx: tx.get_saga("tr_1"))
    assert closed is not None
    assert (closed.state, closed.updated_at, closed.created_at) == (SagaState.DONE, done_at, T0)
    assert await store.read(0, lambda tx: tx.get_saga("tr_missing")) is None


async def test_directory_claim_returns_the_first_claim_on_a_second_claim(store: LedgerStore, backend: Backend) -> None:
    assert await store.write_directory(lambda d: d.claim("pos", "k1", "Earn", "fp-1", T0)) is None
    later = T0 + timedelta(minutes=5)
    again = await store.write_directory(lambda d: d.claim("pos", "k1", "Redeem", "fp-2", later))
    assert again == IdemRecord("Earn", "fp-1", "", T0)
    assert await store.write_directory(lambda d: d.claim("web", "k1", "Earn", "fp-3", later)) is None

    await store.write_directory(lambda d: d.complete_claim("pos", "k1", "m_result"))
    completed = await store.write_directory(lambda d: d.claim("pos", "k1", "Earn", "fp-1", later))
    assert completed == IdemRecord("Earn", "fp-1", "m_result", T0)
    assert await store.write_directory(lambda d: d.purge_claims_before(later)) == 1
    for i in range(5):
        await store.write_directory(functools.partial(_claim_at, f"old-{i}", T0 + timedelta(seconds=i)))
    slices = [await store.write_directory(lambda d: d.purge_claims_before(later, 2)) for _ in range(4)]
    assert slices == ([2, 2, 1, 0] if backend.name.startswith("sqlite") else [5, 0, 0, 0])
    assert await store.write_directory(lambda d: d.claim("pos", "k1", "Earn", "fp-9", later)) is None


def _claim_at(key: str, at: datetime, d: DirectoryTx) -> None:
    d.claim("pos", key, "Earn", "fp", at)


async def test_directory_claims_many_keys_at_once_like_one_by_one(store: LedgerStore) -> None:
    await store.write_directory(lambda d: d.claim("pos", "old", "Earn", "fp-old", T0))
    later = T0 + timedelta(minutes=5)
    batch = [("pos", f"k{i}", "Earn", f"fp-{i}") for i in range(450)]  # more than one lookup's worth
    batch[10] = ("pos", "old", "Redeem", "fp-x")
    batch[20] = ("web", "k5", "Earn", "fp-web")  # another namespace: a different key
    batch[30] = ("pos", "k7", "Adjust", "fp-again")  # named twice: finds the first claim

    found = await store.write_directory(lambda d: d.claim_many(batch, later))

    assert found[10] == IdemRecord("Earn", "fp-old", "", T0)
    assert found[30] == IdemRecord("Earn", "fp-7", "", later)
    assert [i for i, record in enumerate(found) if record is not None] == [10, 30]
    again = await store.write_directory(lambda d: d.claim("pos", "k449", "Earn", "fp-z", later))
    assert again == IdemRecord("Earn", "fp-449", "", later)
    assert await store.write_directory(lambda d: d.claim("web", "k5", "Earn", "fp-web", later)) is not None


async def test_an_external_id_belongs_to_one_member_only(store: LedgerStore, backend: Backend) -> None:
    card = ExternalId("card", "6001-0001")
    first = _member("m_first", card, ExternalId("web", "ada@example"))
    await store.write_directory(lambda d: d.add_member(first))
    with pytest.raises(backend.constraint_errors):
        await store.write_directory(lambda d: d.add_member(_member("m_second", card)))

    def read(d: DirectoryTx) -> tuple[Any, ...]:
        return d.get_member("m_first"), d.get_member("m_second"), d.find_member_id(card), d.external_id_owner(card)

    assert await store.read_directory(read) == (first, None, "m_first", "m_first")


async def test_directory_status_aliases_and_erasure(store: LedgerStore) -> None:
    card, web = ExternalId("card", "1"), ExternalId("web", "2")
    await store.write_directory(lambda d: (d.add_member(_member("m_src", card)), d.add_member(_member("m_dst", web))))
    await store.write_directory(lambda d: d.set_status("m_src", MemberStatus.MERGED, "m_dst"))
    await store.write_directory(lambda d: d.move_external_ids_as_aliases("m_src", "m_dst"))
    target = await store.read_directory(lambda d: d.get_member("m_dst"))
    assert target is not None
    assert (target.external_ids, target.aliases) == ((web,), (card,))
    assert await store.read_directory(lambda d: d.find_member_id(card)) == "m_dst"
    assert await store.read_directory(lambda d: d.merged_members()) == [("m_src", "m_dst")]

    await store.write_directory(lambda d: d.erase("m_dst"))
    erased = await store.read_directory(lambda d: d.get_member("m_dst"))
    assert erased is not None
    assert (erased.status, erased.profile, erased.external_ids, erased.aliases) == (MemberStatus.ERASED, {}, (), ())


async def test_data_survives_close_and_reopen_but_not_a_different_shard_count(tmp_path: Path, backend: Backend) -> None:
    data_dir = tmp_path / "store"
    store = backend.open(data_dir, SHARDS)
    try:
        await store.write(2, _earn_unit("member:m1:points", "tx_1", 30))
        await store.write(2, lambda tx: tx.add_saga(_saga("tr_1")))
        await store.write_directory(lambda d: d.add_member(_member("m1", ExternalId("card", "9"))))
    finally:
        await store.close()

    reopened = backend.open(data_dir, SHARDS)
    try:
        assert (await reopened.read(2, lambda tx: tx.get_accounts(["member:m1:points"])[0])).balance == 30
        assert await reopened.read(2, lambda tx: tx.outbox_backlog()) == 1
        assert [s.saga_id for s in await reopened.read(2, lambda tx: tx.open_sagas())] == ["tr_1"]
        assert await reopened.read(2, lambda tx: tx.get_idempotency("pos", "tx_1")) is not None
        assert await reopened.read_directory(lambda d: d.find_member_id(ExternalId("card", "9"))) == "m1"
        assert reopened.shard_count == SHARDS
    finally:
        await reopened.close()

    with pytest.raises(backend.layout_errors):
        backend.open(data_dir, SHARDS + 1)
    again = backend.open(data_dir, SHARDS)
    try:
        assert (await again.read(2, lambda tx: tx.get_accounts(["member:m1:points"])[0])).balance == 30
    finally:
        await again.close()


@pytest.mark.parametrize("side", ["read", "write"])
async def test_a_caller_that_gives_up_does_not_stop_the_shard_answering(store: LedgerStore, side: str) -> None:
    submit = store.read if side == "read" else store.write
    busy = asyncio.ensure_future(submit(0, _busy))
    impatient = asyncio.ensure_future(submit(0, lambda tx: tx.outbox_backlog()))
    await asyncio.sleep(0)
    impatient.cancel()  # like a gRPC deadline expiring while the call waits for its shard
    await busy
    with contextlib.suppress(asyncio.CancelledError):
        await impatient
    assert impatient.cancelled()
    assert await asyncio.wait_for(store.read(0, lambda tx: tx.outbox_backlog()), timeout=2) == 0
    assert await asyncio.wait_for(submit(0, lambda tx: tx.outbox_backlog()), timeout=2) == 0


async def test_a_long_scan_does_not_hold_up_reads_and_writes_meanwhile(store: LedgerStore, backend: Backend) -> None:
    account = "member:m1:points"
    await store.write(2, _earn_unit(account, "tx_1", 30))
    began = threading.Event()

    def long_pass(tx: ShardTx) -> tuple[int, int]:
        first = tx.get_accounts([account])[0].balance
        began.set()
        time.sleep(3.0)  # stands for a reconciliation pass over a large shard
        return first, tx.get_accounts([account])[0].balance

    scan = asyncio.ensure_future(store.scan(2, long_pass))
    assert await asyncio.to_thread(began.wait, 5)
    await asyncio.wait_for(store.write(2, _earn_unit(account, "tx_2", 5)), timeout=1.2)
    balance = await asyncio.wait_for(store.read(2, lambda tx: tx.get_accounts([account])[0].balance), timeout=1.2)
    assert balance == 35
    assert not scan.done()
    first, last = await scan
    assert first == 30
    if backend.name.startswith("sqlite"):
        assert last == 30  # one snapshot: the write that committed meanwhile is not in it
