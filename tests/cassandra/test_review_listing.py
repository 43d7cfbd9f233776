"""Cassandra lists a shard's fraud reviews from review_days, not by reading every member: pages
match SQLite's (order, cursor), decided and archived reviews stay listed under their status, a
page's statements do not grow with the members of the shard, a row whose review never
committed (or that a decision left behind) is skipped and later deleted, and `backfill` brings
a ledger written before the index up to date (its listings scan until then)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cassandra import OperationTimedOut

from ledger_svc.store import cassandra as cassandra_store
from ledger_svc.store.base import LedgerStore, ShardTx
from ledger_svc.store.cassandra import CassandraLedgerStore, CassandraShardTx
from ledger_svc.store.sqlite import SqliteLedgerStore
from tests.cassandra.faults import WatchedSession
from tests.conftest import CassandraSession

T0 = datetime(2025, 3, 10, 23, 50, tzinfo=UTC)  # ten minutes before a day's bucket ends
# (review id, member, created at): two share a time (ordered by id), they span several days.
REVIEWS = [
    ("rv_a", "m7", T0),
    ("rv_c", "m3", T0 + timedelta(minutes=5)),
    ("rv_b", "m9", T0 + timedelta(minutes=5)),
    ("rv_d", "m12", T0 + timedelta(minutes=20)),
    ("rv_e", "m15", T0 + timedelta(days=2)),
    ("rv_f", "m7", T0 + timedelta(days=3)),
    ("rv_h", "m4", T0 + timedelta(days=3)),
    ("rv_g", "m18", T0 + timedelta(days=40)),
]
DECIDED = {"rv_b": "APPROVED", "rv_d": "REJECTED", "rv_e": "APPROVED", "rv_g": "APPROVED", "rv_h": "APPROVED"}
STATUSES = ("OPEN", "APPROVED", "REJECTED")


def _body(review_id: str, status: str) -> str:
    return f'{{"review_id": "{review_id}", "status": "{status}"}}'


def _open(review_id: str, member: str, at: datetime) -> Callable[[ShardTx], None]:
    return lambda tx: tx.put_review(review_id, member, "OPEN", at, _body(review_id, "OPEN"))


def _decide(review_id: str, member: str, at: datetime, status: str) -> Callable[[ShardTx], None]:
    def unit(tx: ShardTx) -> None:
        assert tx.get_review(review_id) is not None  # as reviews.decide loads it first
        tx.put_review(review_id, member, status, at, _body(review_id, status))

    return unit


async def _write_reviews(store: LedgerStore) -> None:
    for review_id, member, at in REVIEWS:
        await store.write(0, _open(review_id, member, at))
    for review_id, member, at in REVIEWS:
        if review_id in DECIDED:
            await store.write(0, _decide(review_id, member, at, DECIDED[review_id]))


async def _pages(store: LedgerStore, status: str, limit: int) -> list[list[tuple[datetime, str, str]]]:
    """Every page of a status, each after the last row of the one before (as ListReviews asks)."""
    out: list[list[tuple[datetime, str, str]]] = []
    after: tuple[datetime, str] | None = None
    while True:
        page = await store.read(0, lambda tx, after=after: tx.list_reviews(status, "", after, limit))
        out.append(page)
        if len(page) < limit:
            return out
        after = page[-1][:2]


async def _all_pages(store: LedgerStore) -> dict[tuple[str, int], list[list[tuple[datetime, str, str]]]]:
    return {(status, limit): await _pages(store, status, limit) for status in STATUSES for limit in (1, 2, 3, 10)}


def _add_members(store: CassandraLedgerStore, first: int, count: int) -> None:
    """Member partitions without reviews, as the shard's other members (a scan reads them)."""
    for start in range(first, first + count, 64):
        members = range(start, min(start + 64, first + count))
        store.run_many([("members_put", (store.ledger, 0, f"0/x{n}")) for n in members]
                       + [("put", (store.ledger, f"0/x{n}", "state", "", "{}")) for n in members])  # fmt: skip


def _page_statements(store: CassandraLedgerStore, watched: WatchedSession) -> list[int]:
    """Statements sent by one OPEN and one APPROVED page after a cursor (warm: the shard's
    index flag is known)."""
    counts = []
    for status, after in (("OPEN", (T0, "rv_a")), ("APPROVED", (T0, "rv_a"))):
        watched.sent.clear()
        store._run_read(0, lambda tx, status=status, after=after: tx.list_reviews(status, "", after, 3))
        counts.append(len(watched.sent))
    return counts


async def test_review_pages_match_sqlite_and_cost_the_same_whatever_the_members(
    cassandra_session: CassandraSession, tmp_path: Path
) -> None:
    store = cassandra_session.open_store("rvl" + uuid.uuid4().hex[:12], 1)
    reference = SqliteLedgerStore(tmp_path / "sqlite", 1)
    try:
        _add_members(store, 0, 20)
        await _write_reviews(store)
        await _write_reviews(reference)
        expected = await _all_pages(reference)
        assert [rid for page in expected[("OPEN", 2)] for _, rid, _ in page] == ["rv_a", "rv_c", "rv_f"]
        assert [[rid for _, rid, _ in page] for page in expected[("APPROVED", 2)]] == [
            ["rv_b", "rv_e"], ["rv_h", "rv_g"], [],
        ]  # fmt: skip
        assert await _all_pages(store) == expected

        # Decided reviews older than the live horizon move to the members' history, and stay
        # listed under their status.
        assert await store.archive(T0 + timedelta(days=10)) == 4
        assert store.q("row", (store.ledger, "0/m9", "review", "rv_b")).one() is None
        assert await _all_pages(store) == expected

        watched = WatchedSession.on(store)
        store._run_read(0, lambda tx: tx.list_reviews("OPEN", "", None, 3))  # the shard's flag, once
        few = _page_statements(store, watched)
        _add_members(store, 20, 281)  # 301 member partitions
        assert _page_statements(store, watched) == few
        # Index reads and the reviews a page returns (an archived one: row, owner month,
        # history row), never a member partition scan.
        assert all(n <= 4 * 3 + 4 for n in few), few
        assert {name for name, _ in watched.sent} <= {"review_buckets", "review_rows", "row", "owner_month_get",
                                                      "hist_row"}  # fmt: skip
        assert await _all_pages(store) == expected
    finally:
        await store.close()
        await reference.close()


async def test_rows_of_uncommitted_or_superseded_reviews_are_skipped_then_deleted(
    cassandra_session: CassandraSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = cassandra_session.open_store("rvc" + uuid.uuid4().hex[:12], 1)
    try:
        for review_id, member, at in REVIEWS[:4]:
            await store.write(0, _open(review_id, member, at))
        raced = []

        def lost_its_condition(tx: ShardTx) -> None:
            """Opens a review whose batch loses its condition: another writer changes the
            member after this unit read it. The retry opens nothing."""
            if raced:
                return
            raced.append(True)
            assert isinstance(tx, CassandraShardTx)
            part = tx.member("m7")
            store.q("cond", (part.next_version, part.last_seq, "other", store.ledger, part.p, part.version))
            tx.put_review("rv_ghost", "m7", "OPEN", T0 + timedelta(minutes=1), _body("rv_ghost", "OPEN"))

        await store.write(0, lost_its_condition)
        assert await store.read(0, lambda tx: tx.get_review("rv_ghost")) is None
        assert "rv_ghost" in _open_rows(store)  # its row went in before the batch

        # A decision whose delete of the OPEN row fails after its batch applied: it committed.
        watched = WatchedSession.on(store)
        watched.fault = lambda name, _: OperationTimedOut("timed out") if name == "review_del" else None
        await store.write(0, _decide("rv_c", "m3", REVIEWS[1][2], "APPROVED"))
        watched.fault = None

        def ids(page: list[tuple[datetime, str, str]]) -> list[str]:
            return [rid for _, rid, _ in page]

        # Neither is listed, and a page still fills past them.
        assert ids(await store.read(0, lambda tx: tx.list_reviews("OPEN", "", None, 2))) == ["rv_a", "rv_b"]
        assert ids(await store.read(0, lambda tx: tx.list_reviews("OPEN", "", None, 10))) == ["rv_a", "rv_b", "rv_d"]
        assert ids(await store.read(0, lambda tx: tx.list_reviews("APPROVED", "", None, 10))) == ["rv_c"]
        assert {"rv_ghost", "rv_c"} <= set(_open_rows(store))  # young: their units may still commit

        monkeypatch.setattr(cassandra_store, "QUEUE_GRACE_US", 0)
        assert ids(await store.read(0, lambda tx: tx.list_reviews("OPEN", "", None, 10))) == ["rv_a", "rv_b", "rv_d"]
        assert _open_rows(store) == ["rv_a", "rv_b", "rv_d"]
    finally:
        await store.close()


def _open_rows(store: CassandraLedgerStore) -> list[str]:
    days = [d.bucket for d in store.q("review_buckets", (store.ledger, 0, "OPEN", -1))]
    return [r.id for day in days for r in store.q("review_rows", (store.ledger, 0, "OPEN", day, -1, "", 100))]


async def test_a_ledger_from_before_the_index_lists_by_scanning_until_backfill(
    cassandra_session: CassandraSession,
) -> None:
    ledger = "rvb" + uuid.uuid4().hex[:12]
    store = cassandra_session.open_store(ledger, 1)
    session, ks = store.session, store.keyspace
    try:
        _add_members(store, 0, 10)
        await _write_reviews(store)
        assert await store.archive(T0 + timedelta(days=10)) == 4
        expected = await _all_pages(store)
    finally:
        await store.close()

    # As an earlier release left it: no review_days rows, no flag.
    for status in STATUSES:
        for day in [d.bucket for d in session.execute(
                f"SELECT bucket FROM {ks}.review_buckets WHERE ledger=%s AND shard=0 AND status=%s", (ledger, status))]:  # fmt: skip
            session.execute(f"DELETE FROM {ks}.review_days WHERE ledger=%s AND shard=0 AND status=%s AND bucket=%s",
                            (ledger, status, day))  # fmt: skip
        session.execute(f"DELETE FROM {ks}.review_buckets WHERE ledger=%s AND shard=0 AND status=%s", (ledger, status))
    session.execute(f"DELETE FROM {ks}.meta WHERE ledger=%s AND k='reviews_indexed:0'", (ledger,))

    store = cassandra_session.open_store(ledger, 1)
    try:
        assert await _all_pages(store) == expected  # by scanning every member
        watched = WatchedSession.on(store)
        store._run_read(0, lambda tx: tx.list_reviews("OPEN", "", None, 3))
        assert sum(name == "members" for name, _ in watched.sent) == 1

        assert store.backfill(0)["listed"] == len(REVIEWS)
        assert store.backfill(0)["listed"] == len(REVIEWS)  # idempotent
        assert await _all_pages(store) == expected
        watched.sent.clear()
        store._run_read(0, lambda tx: tx.list_reviews("OPEN", "", None, 3))
        assert not any(name in ("members", "live", "kind") for name, _ in watched.sent), watched.sent
    finally:
        await store.close()
