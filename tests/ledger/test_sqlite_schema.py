"""A shard file written by an earlier release opens with today's schema and keeps its rows."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ledger_svc.store.sqlite import SqliteLedgerStore

# The purchases table as releases up to 2026-12-04 created it.
_OLD_PURCHASES = """
CREATE TABLE purchases (
  purchase_id TEXT PRIMARY KEY, member_id TEXT NOT NULL, status TEXT NOT NULL,
  receipt_time INTEGER NOT NULL, body TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX purchases_waiting ON purchases (receipt_time) WHERE status = 'PENDING_ACCRUAL';
"""


def _table_sql(path: Path, name: str) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("SELECT sql FROM sqlite_schema WHERE name=?", (name,)).fetchone()[0])
    finally:
        conn.close()


async def test_a_without_rowid_purchases_table_is_rebuilt_with_its_rows(tmp_path: Path) -> None:
    shard0 = tmp_path / "ledger-shard-000.sqlite"
    conn = sqlite3.connect(shard0)
    conn.executescript(_OLD_PURCHASES)
    big_body = '{"channel": "pos", "store_id": "s1", "lines": "' + "x" * 3000 + '"}'
    other_store = '{"channel": "pos", "store_id": "s2"}'
    noon = datetime(2026, 12, 1, 12, tzinfo=UTC)
    when = int(noon.timestamp() * 1_000_000)
    conn.executemany(
        "INSERT INTO purchases VALUES (?,?,?,?,?)",
        [("pu_1", "m1", "EARNED", when, big_body), ("pu_2", "m1", "PENDING_ACCRUAL", when + 1, other_store)],
    )
    conn.commit()
    conn.close()

    store = SqliteLedgerStore(tmp_path, 1)
    try:
        assert await store.read(0, lambda tx: tx.get_purchase("pu_1")) == ("EARNED", big_body)
        assert await store.read(0, lambda tx: tx.waiting_purchases(10)) == [("pu_2", "m1")]
        # The upgrade filled the listing columns from each body.
        day = (noon - timedelta(hours=12), noon + timedelta(hours=12))
        assert await store.scan(0, lambda tx: tx.list_purchases("pos", "s2", *day, None, 10)) == [
            (noon + timedelta(microseconds=1), "pu_2", other_store)
        ]
        assert [r[1] for r in await store.scan(0, lambda tx: tx.list_purchases("pos", "", *day, None, 10))] == [
            "pu_1",
            "pu_2",
        ]
        await store.write(0, lambda tx: tx.put_purchase("pu_3", "m2", "EARNED", datetime.now(UTC), "{}", "web", "shop"))
        assert await store.read(0, lambda tx: tx.get_purchase("pu_3")) == ("EARNED", "{}")
    finally:
        await store.close()
    assert "WITHOUT ROWID" not in _table_sql(shard0, "purchases").upper()
    assert "status = 'PENDING_ACCRUAL'" in _table_sql(shard0, "purchases_waiting")

    reopened = SqliteLedgerStore(tmp_path, 1)  # a second open finds nothing to move
    try:
        assert await reopened.read(0, lambda tx: tx.get_purchase("pu_1")) == ("EARNED", big_body)
    finally:
        await reopened.close()


# The holds table as releases up to 2026-12-05 created it.
_OLD_HOLDS = """
CREATE TABLE holds (
  hold_id TEXT PRIMARY KEY, member_id TEXT NOT NULL, unit TEXT NOT NULL, points INTEGER NOT NULL,
  status TEXT NOT NULL, captured INTEGER NOT NULL, created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL, reference TEXT NOT NULL, saga_id TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE lots (
  lot_id TEXT PRIMARY KEY, member_id TEXT NOT NULL, unit TEXT NOT NULL, earn_tx TEXT NOT NULL,
  original INTEGER NOT NULL, remaining INTEGER NOT NULL, expires_at INTEGER, created_at INTEGER NOT NULL,
  pending INTEGER NOT NULL, release_at INTEGER, pending_review INTEGER NOT NULL) WITHOUT ROWID;
"""


async def test_holds_and_lots_from_an_earlier_release_open_with_the_new_columns_empty(tmp_path: Path) -> None:
    shard0 = tmp_path / "ledger-shard-000.sqlite"
    conn = sqlite3.connect(shard0)
    conn.executescript(_OLD_HOLDS)
    noon = datetime(2026, 12, 1, 12, tzinfo=UTC)
    when = int(noon.timestamp() * 1_000_000)
    conn.execute("INSERT INTO holds VALUES ('h_1','m1','points',30,'PLACED',0,?,?,'ref','')", (when, when + 10**9))
    conn.execute("INSERT INTO lots VALUES ('l_1','m1','points','tx_1',100,0,?,?,0,NULL,0)", (when, when))
    conn.commit()
    conn.close()

    store = SqliteLedgerStore(tmp_path, 1)
    try:
        old = await store.read(0, lambda tx: tx.get_hold("h_1"))
        assert old is not None and (old.points, old.channel, old.store_id) == (30, "", "")
        new = replace(old, hold_id="h_2", channel="pos", store_id="HEL-01")
        await store.write(0, lambda tx: tx.add_hold(new))
        assert await store.read(0, lambda tx: tx.get_hold("h_2")) == new
        lot = await store.read(0, lambda tx: tx.lot_of_transaction("tx_1"))
        assert lot is not None
        assert (lot.original_points, lot.remaining_points, lot.expired_points) == (100, 0, 0)
        await store.write(0, lambda tx: tx.update_lot(replace(lot, expired_points=60)))
        kept = await store.read(0, lambda tx: tx.lot_of_transaction("tx_1"))
        assert kept is not None
        assert kept.expired_points == 60
    finally:
        await store.close()
