"""Embedded SQLite store: N shard files (members routed by id hash) plus a directory file.

WAL mode, one writer thread per file committing in groups, one reader thread per file.
Times are stored as integer microseconds since the epoch so they sort and compare exactly.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

from ledger_svc.domain import (
    Entry,
    ExternalId,
    Hold,
    HoldStatus,
    Lot,
    Member,
    MemberStatus,
    SagaState,
    TxKind,
)
from ledger_svc.store.base import (
    PURGE_SLICE,
    AccountRow,
    IdemRecord,
    OutboxRow,
    SagaRecord,
    TxRecord,
    decode_reserves,
    encode_reserves,
    from_us,
    to_us,
)
from ledger_svc.store.base import (
    opt_dt as _opt_dt,
)
from ledger_svc.store.base import (
    opt_us as _opt_us,
)
from ledger_svc.store.sqlite_worker import Checkpointer, Executor, connect, executor

T = TypeVar("T")
_US = timedelta(microseconds=1)
# Reconciliation's lost-event check examines only the transactions recorded this long up to
# a shard's newest event (see transactions_without_events): an hourly pass reads a day of
# events, not the whole retention period; a loss older than that goes unreported.
EVENT_CHECK_WINDOW = timedelta(hours=24)
EVENT_CHECK_CLOCK_SLACK = timedelta(hours=1)  # events read from this much before the window
log = logging.getLogger(__name__)

SHARD_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS accounts (
  account TEXT PRIMARY KEY, balance INTEGER NOT NULL, reserved INTEGER NOT NULL,
  lifetime_earned INTEGER NOT NULL, version INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS transactions (
  tx_id TEXT PRIMARY KEY, kind TEXT NOT NULL, member_id TEXT NOT NULL, unit TEXT NOT NULL,
  points INTEGER NOT NULL, recorded_at INTEGER NOT NULL, business_time INTEGER NOT NULL,
  reference TEXT NOT NULL, funding TEXT NOT NULL, purchase_minor INTEGER NOT NULL,
  purchase_currency TEXT NOT NULL, reversed_points INTEGER NOT NULL, refunded_minor INTEGER NOT NULL,
  lot_id TEXT NOT NULL, pending INTEGER NOT NULL, original_tx TEXT NOT NULL,
  balance_after TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
  entry_id INTEGER PRIMARY KEY, tx_id TEXT NOT NULL, account TEXT NOT NULL, points INTEGER NOT NULL,
  kind TEXT NOT NULL, recorded_at INTEGER NOT NULL, business_time INTEGER NOT NULL,
  reference TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS entries_by_account ON entries (account, entry_id);
CREATE TABLE IF NOT EXISTS lots (
  lot_id TEXT PRIMARY KEY, member_id TEXT NOT NULL, unit TEXT NOT NULL, earn_tx TEXT NOT NULL,
  original INTEGER NOT NULL, remaining INTEGER NOT NULL, expires_at INTEGER, created_at INTEGER NOT NULL,
  pending INTEGER NOT NULL, release_at INTEGER, pending_review INTEGER NOT NULL,
  expired INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lots_by_account ON lots (member_id, unit, pending, remaining);
CREATE INDEX IF NOT EXISTS lots_by_earn ON lots (earn_tx);
CREATE INDEX IF NOT EXISTS lots_open_expiry ON lots (expires_at) WHERE remaining > 0 AND pending = 0;
CREATE INDEX IF NOT EXISTS lots_open_release ON lots (release_at) WHERE pending = 1 AND remaining > 0;
CREATE TABLE IF NOT EXISTS holds (
  hold_id TEXT PRIMARY KEY, member_id TEXT NOT NULL, unit TEXT NOT NULL, points INTEGER NOT NULL,
  status TEXT NOT NULL, captured INTEGER NOT NULL, created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL, reference TEXT NOT NULL, saga_id TEXT NOT NULL,
  channel TEXT NOT NULL DEFAULT '', store_id TEXT NOT NULL DEFAULT '', reserves TEXT NOT NULL DEFAULT '')
  WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS holds_placed ON holds (expires_at) WHERE status = 'PLACED';
CREATE INDEX IF NOT EXISTS holds_by_member ON holds (member_id) WHERE status = 'PLACED';
CREATE TABLE IF NOT EXISTS idempotency (
  namespace TEXT NOT NULL, key TEXT NOT NULL, operation TEXT NOT NULL, fingerprint TEXT NOT NULL,
  result TEXT NOT NULL, created_at INTEGER NOT NULL, PRIMARY KEY (namespace, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
  seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL, member_id TEXT NOT NULL, payload TEXT NOT NULL,
  created_at INTEGER NOT NULL, relayed_at INTEGER);
CREATE INDEX IF NOT EXISTS outbox_unrelayed ON outbox (seq) WHERE relayed_at IS NULL;
CREATE TABLE IF NOT EXISTS member_state (member_id TEXT PRIMARY KEY, state TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tier_due (member_id TEXT PRIMARY KEY, due INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tier_due_by_time ON tier_due (due);
CREATE TABLE IF NOT EXISTS purchases (
  purchase_id TEXT PRIMARY KEY, member_id TEXT NOT NULL, status TEXT NOT NULL,
  receipt_time INTEGER NOT NULL, body TEXT NOT NULL, channel TEXT NOT NULL DEFAULT '',
  store_id TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS purchases_waiting ON purchases (receipt_time) WHERE status = 'PENDING_ACCRUAL';
DROP INDEX IF EXISTS purchases_by_time;
CREATE INDEX IF NOT EXISTS purchases_by_channel ON purchases (channel, receipt_time, purchase_id);
CREATE INDEX IF NOT EXISTS purchases_by_store ON purchases (channel, store_id, receipt_time, purchase_id);
CREATE TABLE IF NOT EXISTS reviews (
  review_id TEXT PRIMARY KEY, member_id TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL,
  body TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reviews_by_status ON reviews (status, created_at, review_id);
CREATE TABLE IF NOT EXISTS sagas (
  saga_id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, source_member TEXT NOT NULL,
  dest_member TEXT NOT NULL, unit TEXT NOT NULL, points INTEGER NOT NULL, hold_id TEXT NOT NULL,
  payload TEXT NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sagas_held ON sagas (created_at) WHERE state = 'HELD';
"""

DIRECTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS members (
  member_id TEXT PRIMARY KEY, status TEXT NOT NULL, profile TEXT NOT NULL, merged_into TEXT NOT NULL,
  created_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS external_ids (
  kind TEXT NOT NULL, value TEXT NOT NULL, member_id TEXT NOT NULL, alias INTEGER NOT NULL,
  PRIMARY KEY (kind, value)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS external_ids_by_member ON external_ids (member_id);
CREATE INDEX IF NOT EXISTS members_merged_into ON members (merged_into) WHERE merged_into != '';
CREATE TABLE IF NOT EXISTS claims (
  namespace TEXT NOT NULL, key TEXT NOT NULL, operation TEXT NOT NULL, fingerprint TEXT NOT NULL,
  result TEXT NOT NULL, created_at INTEGER NOT NULL, PRIMARY KEY (namespace, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS claims_by_age ON claims (created_at);
"""


_LOT_COLS = (
    "lot_id, member_id, unit, earn_tx, original, remaining, expires_at, created_at, pending, release_at, pending_review,"
    " expired"
)
_HOLD_COLS = (
    "hold_id, member_id, unit, points, status, captured, created_at, expires_at, reference, saga_id, channel, store_id,"
    " reserves"
)
_TX_COLS = (
    "tx_id, kind, member_id, unit, points, recorded_at, business_time, reference, funding, purchase_minor,"
    " purchase_currency, reversed_points, refunded_minor, lot_id, pending, original_tx, balance_after"
)
_SAGA_COLS = "saga_id, kind, state, source_member, dest_member, unit, points, hold_id, payload, created_at, updated_at"


def _lot(row: sqlite3.Row | tuple[object, ...]) -> Lot:
    r = tuple(row)
    return Lot(
        lot_id=str(r[0]),
        member_id=str(r[1]),
        unit=str(r[2]),
        earn_transaction_id=str(r[3]),
        original_points=int(r[4]),  # type: ignore[call-overload]
        remaining_points=int(r[5]),  # type: ignore[call-overload]
        expires_at=_opt_dt(r[6]),  # type: ignore[arg-type]
        created_at=from_us(int(r[7])),  # type: ignore[call-overload]
        pending=bool(r[8]),
        release_at=_opt_dt(r[9]),  # type: ignore[arg-type]
        pending_review=bool(r[10]),
        expired_points=int(r[11]),  # type: ignore[call-overload]
    )


def _hold(r: tuple[object, ...]) -> Hold:
    return Hold(
        hold_id=str(r[0]),
        member_id=str(r[1]),
        unit=str(r[2]),
        points=int(r[3]),  # type: ignore[call-overload]
        status=HoldStatus(str(r[4])),
        captured_points=int(r[5]),  # type: ignore[call-overload]
        created_at=from_us(int(r[6])),  # type: ignore[call-overload]
        expires_at=from_us(int(r[7])),  # type: ignore[call-overload]
        reference=str(r[8]),
        saga_id=str(r[9]),
        channel=str(r[10]),
        store_id=str(r[11]),
        reserves=decode_reserves(str(r[12])),
    )


def _saga(r: tuple[object, ...]) -> SagaRecord:
    return SagaRecord(
        saga_id=str(r[0]),
        kind=str(r[1]),
        state=SagaState(str(r[2])),
        source_member=str(r[3]),
        dest_member=str(r[4]),
        unit=str(r[5]),
        points=int(r[6]),  # type: ignore[call-overload]
        hold_id=str(r[7]),
        payload_json=str(r[8]),
        created_at=from_us(int(r[9])),  # type: ignore[call-overload]
        updated_at=from_us(int(r[10])),  # type: ignore[call-overload]
    )


_KEYS_PER_SELECT = 400  # keys of one namespace per claims lookup, well inside SQLite's variable limit
_ACCOUNT_UPSERT = (
    "INSERT INTO accounts VALUES (?,?,?,?,?) ON CONFLICT(account) DO UPDATE SET balance=excluded.balance,"
    " reserved=excluded.reserved, lifetime_earned=excluded.lifetime_earned, version=excluded.version"
)


class SqliteShardTx:
    """ShardTx over one connection; the worker thread owns the transaction around it.

    Inserts of journal rows (transactions, entries, lots, outbox, idempotency) and account
    writes wait in memory until the unit ends (`flush`, called by the executor inside the
    unit's savepoint) or until a read could see them. A unit that posts hundreds of items (a
    batch) then costs one executemany per statement instead of ten statements per item, and an
    account written three times by one posting is written once.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.c = conn
        self._rows: dict[str, list[tuple[object, ...]]] = {}
        self._accounts: dict[str, tuple[str, int, int, int, int]] = {}
        self._idem: dict[tuple[str, str], IdemRecord] = {}

    def _defer(self, sql: str, values: tuple[object, ...]) -> None:
        rows = self._rows.get(sql)
        if rows is None:
            self._rows[sql] = [values]
        else:
            rows.append(values)

    def flush(self) -> None:
        """Writes what waits in memory; the executor calls it before a unit's savepoint ends."""
        if self._accounts:
            self.c.executemany(_ACCOUNT_UPSERT, list(self._accounts.values()))
            self._accounts.clear()
        if self._rows:
            for sql, rows in self._rows.items():
                self.c.executemany(sql, rows)
            self._rows.clear()
        self._idem.clear()

    def discard(self) -> None:
        """Drops what waits in memory; the unit is being rolled back."""
        self._rows.clear()
        self._accounts.clear()
        self._idem.clear()

    def get_idempotency(self, namespace: str, key: str) -> IdemRecord | None:
        waiting = self._idem.get((namespace, key))
        if waiting is not None:
            return waiting
        row = self.c.execute(
            "SELECT operation, fingerprint, result, created_at FROM idempotency WHERE namespace=? AND key=?",
            (namespace, key),
        ).fetchone()
        return None if row is None else IdemRecord(row[0], row[1], row[2], from_us(row[3]))

    def put_idempotency(self, namespace: str, key: str, record: IdemRecord) -> None:
        self._idem[(namespace, key)] = record
        self._defer(
            "INSERT INTO idempotency VALUES (?,?,?,?,?,?)",
            (
                namespace,
                key,
                record.operation,
                record.fingerprint,
                record.result_json,
                to_us(record.created_at),
            ),
        )

    def get_accounts(self, accounts: Sequence[str]) -> list[AccountRow]:
        waiting = {a: AccountRow(*self._accounts[a]) for a in accounts if a in self._accounts}
        missing = [a for a in accounts if a not in waiting]
        found = {
            r[0]: AccountRow(*r)
            for r in self.c.execute(
                "SELECT account, balance, reserved, lifetime_earned, version FROM accounts"
                f" WHERE account IN ({','.join('?' * len(missing))})",
                tuple(missing),
            )
        } if missing else {}  # fmt: skip
        found.update(waiting)
        return [found.get(a) or AccountRow(a) for a in accounts]

    def put_account(self, row: AccountRow) -> None:
        self._accounts[row.account] = (row.account, row.balance, row.reserved, row.lifetime_earned, row.version)

    def list_accounts(self) -> list[AccountRow]:
        self.flush()
        rows = self.c.execute("SELECT account, balance, reserved, lifetime_earned, version FROM accounts").fetchall()
        return [AccountRow(*r) for r in rows]

    def add_transaction(self, tx: TxRecord) -> None:
        self._defer(f"INSERT INTO transactions ({_TX_COLS}) VALUES ({','.join('?' * 17)})", self._tx_values(tx))

    def update_transaction(self, tx: TxRecord) -> None:
        self.flush()
        self.c.execute(f"REPLACE INTO transactions ({_TX_COLS}) VALUES ({','.join('?' * 17)})", self._tx_values(tx))

    @staticmethod
    def _tx_values(tx: TxRecord) -> tuple[object, ...]:
        return (
            tx.tx_id, tx.kind.value, tx.member_id, tx.unit, tx.points, to_us(tx.recorded_at),
            to_us(tx.business_time), tx.reference, tx.funding, tx.purchase_minor, tx.purchase_currency,
            tx.reversed_points, tx.refunded_minor, tx.lot_id, int(tx.pending), tx.original_tx,
            tx.balance_after_json,
        )  # fmt: skip

    def get_transaction(self, tx_id: str) -> TxRecord | None:
        self.flush()
        r = self.c.execute(f"SELECT {_TX_COLS} FROM transactions WHERE tx_id=?", (tx_id,)).fetchone()
        if r is None:
            return None
        return TxRecord(
            r[0], TxKind(r[1]), r[2], r[3], r[4], from_us(r[5]), from_us(r[6]), r[7], r[8], r[9], r[10],
            r[11], r[12], r[13], bool(r[14]), r[15], r[16],
        )  # fmt: skip

    def add_entries(self, tx: TxRecord, legs: Sequence[tuple[str, int]]) -> None:
        rec, biz = to_us(tx.recorded_at), to_us(tx.business_time)
        for account, points in legs:
            self._defer(
                "INSERT INTO entries (tx_id, account, points, kind, recorded_at, business_time, reference)"
                " VALUES (?,?,?,?,?,?,?)",
                (tx.tx_id, account, points, tx.kind.value, rec, biz, tx.reference),
            )

    def list_entries(self, account: str, before_entry_id: int, limit: int) -> list[Entry]:
        self.flush()
        rows = self.c.execute(
            "SELECT entry_id, tx_id, points, kind, recorded_at, business_time, reference FROM entries"
            " WHERE account=? AND entry_id<? ORDER BY entry_id DESC LIMIT ?",
            (account, before_entry_id, limit),
        ).fetchall()
        return [Entry(r[0], r[1], account, r[2], TxKind(r[3]), from_us(r[4]), from_us(r[5]), r[6]) for r in rows]

    def sum_entries_by_account(self) -> dict[str, int]:
        self.flush()
        return dict(self.c.execute("SELECT account, SUM(points) FROM entries GROUP BY account").fetchall())

    def sum_entries_before(self, when: datetime) -> dict[str, int]:
        self.flush()
        rows = self.c.execute(
            "SELECT account, SUM(points) FROM entries WHERE recorded_at<? GROUP BY account", (to_us(when),)
        ).fetchall()
        return dict(rows)

    def movements_between(self, start: datetime, end: datetime) -> list[tuple[str, str, int]]:
        self.flush()
        return self.c.execute(
            "SELECT account, kind, SUM(points) FROM entries WHERE recorded_at>=? AND recorded_at<?"
            " GROUP BY account, kind",
            (to_us(start), to_us(end)),
        ).fetchall()

    def unbalanced_transactions(self) -> list[tuple[str, int]]:
        """Per transaction and unit (an account name's last part: the ledger never converts
        between units, so a leg in the wrong one must not balance another's)."""
        self.flush()
        return self.c.execute(
            "SELECT tx_id, SUM(points) FROM entries"
            " GROUP BY tx_id, substr(account, length(rtrim(account, replace(account, ':', ''))) + 1)"
            " HAVING SUM(points) != 0"
        ).fetchall()

    def entries_without_transaction(self) -> list[tuple[str, int]]:
        self.flush()
        return self.c.execute(
            "SELECT tx_id, COUNT(*) FROM entries e WHERE NOT EXISTS"
            " (SELECT 1 FROM transactions t WHERE t.tx_id = e.tx_id) GROUP BY tx_id ORDER BY tx_id"
        ).fetchall()

    def transactions_without_events(self) -> list[str] | None:
        """Every posting writes its transaction and its event in one unit, the event carrying the
        balance (and its version) the transaction records; events go only once relayed and older
        than the retention cut-off, so a relayed event still here was relayed after it. A
        transaction recorded at or after that relay time must still have its event: one without
        it was lost, never published. Bounded to the EVENT_CHECK_WINDOW up to the shard's newest
        event (older ones are not examined: a loss there goes unreported), so a pass reads the
        outbox from the first row of the window on (a sequence range, found by a binary search
        on created_at) rather than the whole retention period. The transactions are filtered by
        recorded_at in SQL, one integer per row: no index has that column, and the primary key
        leads with the member's bucket. With no relayed event here the earliest idempotency
        record (purged in the same pass, with the same cut-off) bounds it instead; with neither,
        the cut-off is unknown and nothing is checked."""
        self.flush()
        newest = self.c.execute("SELECT seq, created_at FROM outbox ORDER BY seq DESC LIMIT 1").fetchone()
        oldest = self.c.execute("SELECT seq, created_at FROM outbox ORDER BY seq LIMIT 1").fetchone()
        relayed = self.c.execute(
            "SELECT relayed_at FROM outbox WHERE relayed_at IS NOT NULL ORDER BY seq LIMIT 1"
        ).fetchone()
        bound = relayed[0] if relayed else self.c.execute("SELECT MIN(created_at) FROM idempotency").fetchone()[0]
        if newest is None or bound is None:
            return []
        since = max(int(bound), int(newest[1]) - EVENT_CHECK_WINDOW // _US)
        # Rows are numbered in the order they were written; a clock stepping back a little
        # between them is what the slack is for.
        at, lo, hi = since - EVENT_CHECK_CLOCK_SLACK // _US, int(oldest[0]), int(newest[0])
        if int(oldest[1]) < at:
            while hi - lo > 1:  # the row at or after lo was written before `at`, the one at hi not
                mid = (lo + hi) // 2
                row = self.c.execute("SELECT created_at FROM outbox WHERE seq >= ? ORDER BY seq LIMIT 1", (mid,))
                lo, hi = (lo, mid) if int(row.fetchone()[0]) >= at else (mid, hi)
            lo = hi
        published = set(
            self.c.execute(
                "SELECT member_id, json_extract(payload, '$.unit'), json_extract(payload, '$.balance.version')"
                " FROM outbox WHERE seq >= ?",
                (lo,),
            ).fetchall()
        )
        rows = self.c.execute(
            "SELECT tx_id, member_id, unit, json_extract(balance_after, '$.version') FROM transactions"
            " WHERE recorded_at >= ? AND balance_after != ''",
            (since,),
        ).fetchall()
        return sorted(r[0] for r in rows if r[3] is not None and (r[1], r[2], r[3]) not in published)

    def add_lot(self, lot: Lot) -> None:
        self._defer(f"INSERT INTO lots ({_LOT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", self._lot_values(lot))

    def update_lot(self, lot: Lot) -> None:
        self.flush()
        self.c.execute(f"REPLACE INTO lots ({_LOT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", self._lot_values(lot))

    @staticmethod
    def _lot_values(lot: Lot) -> tuple[object, ...]:
        return (
            lot.lot_id, lot.member_id, lot.unit, lot.earn_transaction_id, lot.original_points,
            lot.remaining_points, _opt_us(lot.expires_at), to_us(lot.created_at), int(lot.pending),
            _opt_us(lot.release_at), int(lot.pending_review), lot.expired_points,
        )  # fmt: skip

    def spendable_lots(self, member_id: str, unit: str) -> list[Lot]:
        self.flush()
        rows = self.c.execute(
            f"SELECT {_LOT_COLS} FROM lots WHERE member_id=? AND unit=? AND pending=0 AND remaining>0"
            " ORDER BY expires_at IS NULL, expires_at, created_at, lot_id",
            (member_id, unit),
        ).fetchall()
        return [_lot(r) for r in rows]

    def spent_lots_with_expired(self, member_id: str, unit: str) -> list[Lot]:
        self.flush()
        rows = self.c.execute(
            f"SELECT {_LOT_COLS} FROM lots WHERE member_id=? AND unit=? AND pending=0 AND remaining=0 AND expired>0"
            " ORDER BY created_at, lot_id",
            (member_id, unit),
        ).fetchall()
        return [_lot(r) for r in rows]

    def pending_lots(self, member_id: str, unit: str) -> list[Lot]:
        self.flush()
        rows = self.c.execute(
            f"SELECT {_LOT_COLS} FROM lots WHERE member_id=? AND unit=? AND pending=1 AND remaining>0"
            " ORDER BY created_at, lot_id",
            (member_id, unit),
        ).fetchall()
        return [_lot(r) for r in rows]

    def spendable_total(self, member_id: str, unit: str) -> int:
        self.flush()
        row = self.c.execute(
            "SELECT COALESCE(SUM(remaining), 0) FROM lots WHERE member_id=? AND unit=? AND pending=0 AND remaining>0",
            (member_id, unit),
        ).fetchone()
        return int(row[0])

    def lot_of_transaction(self, tx_id: str, member_id: str = "") -> Lot | None:
        self.flush()
        # After a same-shard merge two lots carry the earn id: prefer the member's, then a live one.
        row = self.c.execute(
            f"SELECT {_LOT_COLS} FROM lots WHERE earn_tx=? ORDER BY member_id=? DESC, remaining>0 DESC LIMIT 1",
            (tx_id, member_id),
        ).fetchone()
        return None if row is None else _lot(row)

    def lots_expired_by(self, when: datetime, limit: int, after: object = None) -> tuple[list[Lot], object]:
        self.flush()
        since = after if isinstance(after, tuple) else (-(2**62), -(2**62), "")
        rows = self.c.execute(
            f"SELECT {_LOT_COLS} FROM lots WHERE remaining>0 AND pending=0 AND expires_at<=?"
            " AND (expires_at, created_at, lot_id) > (?, ?, ?) ORDER BY expires_at, created_at, lot_id LIMIT ?",
            (to_us(when), *since, limit),
        ).fetchall()
        lots = [_lot(r) for r in rows]
        if len(lots) < limit:
            return lots, None
        last = lots[-1]
        assert last.expires_at is not None
        return lots, (to_us(last.expires_at), to_us(last.created_at), last.lot_id)

    def pending_due_by(self, when: datetime, limit: int) -> list[Lot]:
        self.flush()
        rows = self.c.execute(
            f"SELECT {_LOT_COLS} FROM lots WHERE pending=1 AND remaining>0 AND pending_review=0"
            " AND release_at<=? ORDER BY release_at LIMIT ?",
            (to_us(when), limit),
        ).fetchall()
        return [_lot(r) for r in rows]

    def lot_totals(self) -> dict[tuple[str, str, bool], int]:
        self.flush()
        rows = self.c.execute(
            "SELECT member_id, unit, pending, SUM(remaining) FROM lots GROUP BY member_id, unit, pending"
        ).fetchall()
        return {(r[0], r[1], bool(r[2])): r[3] for r in rows}

    def lots_out_of_bounds(self) -> list[Lot]:
        self.flush()
        rows = self.c.execute(
            f"SELECT {_LOT_COLS} FROM lots WHERE remaining < 0 OR remaining > original ORDER BY lot_id"
        ).fetchall()
        return [_lot(r) for r in rows]

    def review_held_lots(self) -> list[Lot]:
        self.flush()
        rows = self.c.execute(
            f"SELECT {_LOT_COLS} FROM lots WHERE pending=1 AND pending_review=1 AND remaining>0 ORDER BY lot_id"
        ).fetchall()
        return [_lot(r) for r in rows]

    def add_hold(self, hold: Hold) -> None:
        self.c.execute(
            f"INSERT INTO holds ({_HOLD_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                hold.hold_id, hold.member_id, hold.unit, hold.points, hold.status.value, hold.captured_points,
                to_us(hold.created_at), to_us(hold.expires_at), hold.reference, hold.saga_id, hold.channel,
                hold.store_id, encode_reserves(hold.reserves),
            ),
        )  # fmt: skip

    def get_hold(self, hold_id: str) -> Hold | None:
        row = self.c.execute(f"SELECT {_HOLD_COLS} FROM holds WHERE hold_id=?", (hold_id,)).fetchone()
        return None if row is None else _hold(row)

    def set_hold_status(self, hold_id: str, status: HoldStatus, captured_points: int) -> None:
        self.c.execute(
            "UPDATE holds SET status=?, captured=? WHERE hold_id=?", (status.value, captured_points, hold_id)
        )

    def holds_due_by(self, when: datetime, limit: int) -> list[Hold]:
        rows = self.c.execute(
            f"SELECT {_HOLD_COLS} FROM holds WHERE status='PLACED' AND saga_id='' AND expires_at<=?"
            " ORDER BY expires_at LIMIT ?",
            (to_us(when), limit),
        ).fetchall()
        return [_hold(r) for r in rows]

    def placed_hold_totals(self) -> dict[str, int]:
        rows = self.c.execute(
            "SELECT member_id || ':' || unit, SUM(points) FROM holds WHERE status='PLACED' GROUP BY member_id, unit"
        ).fetchall()
        return dict(rows)

    def placed_holds_of(self, member_id: str) -> list[Hold]:
        rows = self.c.execute(
            f"SELECT {_HOLD_COLS} FROM holds WHERE status='PLACED' AND member_id=?", (member_id,)
        ).fetchall()
        return [_hold(r) for r in rows]

    def placed_holds(self) -> list[Hold]:
        rows = self.c.execute(f"SELECT {_HOLD_COLS} FROM holds WHERE status='PLACED' ORDER BY expires_at").fetchall()
        return [_hold(r) for r in rows]

    def add_outbox(self, event_id: str, member_id: str, payload_json: str, at: datetime) -> None:
        self._defer(
            "INSERT INTO outbox (event_id, member_id, payload, created_at) VALUES (?,?,?,?)",
            (event_id, member_id, payload_json, to_us(at)),
        )

    def unrelayed_outbox(self, limit: int) -> list[OutboxRow]:
        self.flush()
        rows = self.c.execute(
            "SELECT seq, event_id, member_id, payload FROM outbox WHERE relayed_at IS NULL ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [OutboxRow(*r) for r in rows]

    def mark_relayed(self, seqs: Iterable[int], at: datetime) -> None:
        self.flush()
        self.c.executemany("UPDATE outbox SET relayed_at=? WHERE seq=?", [(to_us(at), s) for s in seqs])

    def outbox_backlog(self) -> int:
        self.flush()
        return int(self.c.execute("SELECT COUNT(*) FROM outbox WHERE relayed_at IS NULL").fetchone()[0])

    def add_saga(self, saga: SagaRecord) -> None:
        self.c.execute(
            f"INSERT INTO sagas ({_SAGA_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                saga.saga_id, saga.kind, saga.state.value, saga.source_member, saga.dest_member, saga.unit,
                saga.points, saga.hold_id, saga.payload_json, to_us(saga.created_at), to_us(saga.updated_at),
            ),
        )  # fmt: skip

    def get_saga(self, saga_id: str) -> SagaRecord | None:
        row = self.c.execute(f"SELECT {_SAGA_COLS} FROM sagas WHERE saga_id=?", (saga_id,)).fetchone()
        return None if row is None else _saga(row)

    def set_saga_state(self, saga_id: str, state: SagaState, at: datetime) -> None:
        self.c.execute("UPDATE sagas SET state=?, updated_at=? WHERE saga_id=?", (state.value, to_us(at), saga_id))

    def open_sagas(self) -> list[SagaRecord]:
        rows = self.c.execute(f"SELECT {_SAGA_COLS} FROM sagas WHERE state = 'HELD' ORDER BY created_at").fetchall()
        return [_saga(r) for r in rows]

    def get_member_state(self, member_id: str) -> str | None:
        row = self.c.execute("SELECT state FROM member_state WHERE member_id=?", (member_id,)).fetchone()
        return None if row is None else str(row[0])

    def put_member_state(self, member_id: str, state_json: str) -> None:
        self.c.execute("INSERT OR REPLACE INTO member_state VALUES (?,?)", (member_id, state_json))

    def set_tier_due(self, member_id: str, due: datetime | None) -> None:
        if due is None:
            self.c.execute("DELETE FROM tier_due WHERE member_id=?", (member_id,))
        else:
            self.c.execute("INSERT OR REPLACE INTO tier_due VALUES (?,?)", (member_id, to_us(due)))

    def member_ids_after(self, after: str, limit: int) -> list[str]:
        rows = self.c.execute(
            "SELECT member_id FROM member_state WHERE member_id>? ORDER BY member_id LIMIT ?", (after, limit)
        ).fetchall()
        return [str(r[0]) for r in rows]

    def get_meta(self, key: str) -> str | None:
        row = self.c.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put_meta(self, key: str, value: str) -> None:
        self.c.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    def tiers_due_by(self, when: datetime, limit: int) -> list[str]:
        rows = self.c.execute(
            "SELECT member_id FROM tier_due WHERE due<=? ORDER BY due LIMIT ?", (to_us(when), limit)
        ).fetchall()
        return [str(r[0]) for r in rows]

    def put_purchase(
        self, purchase_id: str, member_id: str, status: str, receipt_time: datetime, body_json: str,
        channel: str, store_id: str,
    ) -> None:  # fmt: skip
        self.c.execute(
            "INSERT OR REPLACE INTO purchases (purchase_id, member_id, status, receipt_time, body, channel, store_id)"
            " VALUES (?,?,?,?,?,?,?)",
            (purchase_id, member_id, status, to_us(receipt_time), body_json, channel, store_id),
        )

    def get_purchase(self, purchase_id: str) -> tuple[str, str] | None:
        row = self.c.execute("SELECT status, body FROM purchases WHERE purchase_id=?", (purchase_id,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def waiting_purchases(self, limit: int) -> list[tuple[str, str]]:
        rows = self.c.execute(
            "SELECT purchase_id, member_id FROM purchases WHERE status='PENDING_ACCRUAL' "
            "ORDER BY receipt_time, purchase_id LIMIT ?",
            (limit,),
        ).fetchall()
        return [(str(r[0]), str(r[1])) for r in rows]

    def list_purchases(
        self, channel: str, store_id: str, start: datetime, end: datetime, after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[tuple[datetime, str, str]]:  # fmt: skip
        # A cursor from before the window (a token reused with a later start) seeks from the start.
        since_us, since_id = max((to_us(after[0]), after[1]) if after else (0, ""), (to_us(start), ""))
        # Named, because without ANALYZE statistics the planner takes the channel index for a
        # store's listing too and walks the whole channel's window.
        index, scope, params = (
            ("purchases_by_store", "AND store_id=? ", (channel, store_id))
            if store_id
            else ("purchases_by_channel", "", (channel,))
        )
        rows = self.c.execute(
            f"SELECT receipt_time, purchase_id, body FROM purchases INDEXED BY {index} WHERE channel=? {scope}"
            "AND (receipt_time, purchase_id)>(?,?) AND receipt_time<? ORDER BY receipt_time, purchase_id LIMIT ?",
            (*params, since_us, since_id, to_us(end), limit),
        ).fetchall()
        return [(from_us(r[0]), str(r[1]), str(r[2])) for r in rows]

    def member_waiting_purchases(self, member_id: str) -> int:
        row = self.c.execute(
            "SELECT COUNT(*) FROM purchases WHERE status='PENDING_ACCRUAL' AND member_id=?", (member_id,)
        ).fetchone()
        return int(row[0])

    def put_review(self, review_id: str, member_id: str, status: str, created_at: datetime, body_json: str) -> None:
        self.c.execute(
            "INSERT OR REPLACE INTO reviews VALUES (?,?,?,?,?)",
            (review_id, member_id, status, to_us(created_at), body_json),
        )

    def get_review(self, review_id: str) -> str | None:
        row = self.c.execute("SELECT body FROM reviews WHERE review_id=?", (review_id,)).fetchone()
        return None if row is None else str(row[0])

    def list_reviews(
        self, status: str, member_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[tuple[datetime, str, str]]:
        since_us, since_id = (to_us(after[0]), after[1]) if after else (-1, "")
        rows = self.c.execute(
            "SELECT created_at, review_id, body FROM reviews WHERE status=? AND (?='' OR member_id=?)"
            " AND (created_at>? OR (created_at=? AND review_id>?)) ORDER BY created_at, review_id LIMIT ?",
            (status, member_id, member_id, since_us, since_us, since_id, limit),
        ).fetchall()
        return [(from_us(r[0]), str(r[1]), str(r[2])) for r in rows]

    def purge_before(
        self, idempotency_before: datetime, outbox_before: datetime, resume: str = "", limit: int = PURGE_SLICE
    ) -> tuple[int, str]:
        """Idempotency records in key order, then outbox rows in sequence order; `resume` is the
        last key (as JSON) or sequence number looked at."""
        self.flush()
        phase, _, after = resume.partition(":")
        if phase in ("", "idem"):
            return self._purge_idempotency(to_us(idempotency_before), json.loads(after) if after else None, limit)
        return self._purge_outbox(to_us(outbox_before), int(after), limit)

    def _purge_idempotency(self, cut: int, after: list[str] | None, limit: int) -> tuple[int, str]:
        args: tuple[str | int, ...]
        if after is None:
            sql, args = "SELECT namespace, key, created_at FROM idempotency ORDER BY namespace, key LIMIT ?", (limit,)
        else:
            sql = (
                "SELECT namespace, key, created_at FROM idempotency WHERE (namespace, key) > (?, ?) "
                "ORDER BY namespace, key LIMIT ?"
            )
            args = (after[0], after[1], limit)
        rows = self.c.execute(sql, args).fetchall()
        doomed = [(r[0], r[1]) for r in rows if r[2] < cut]
        self.c.executemany("DELETE FROM idempotency WHERE namespace=? AND key=?", doomed)
        resume = f"idem:{json.dumps([rows[-1][0], rows[-1][1]])}" if len(rows) == limit else "outbox:0"
        return len(doomed), resume

    def _purge_outbox(self, cut: int, after: int, limit: int) -> tuple[int, str]:
        rows = self.c.execute(
            "SELECT seq, created_at, relayed_at FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
        doomed = [(r[0],) for r in rows if r[2] is not None and r[2] < cut]
        self.c.executemany("DELETE FROM outbox WHERE seq=?", doomed)
        # Rows are numbered in the order they were written: once a whole slice was written after
        # the cut-off, so was every later row, and none can have been relayed before it. (One row
        # alone may carry a clock that jumped ahead; a slice of them means time moved on.)
        done = len(rows) < limit or min(r[1] for r in rows) >= cut
        return len(doomed), "" if done else f"outbox:{rows[-1][0]}"


class SqliteDirectoryTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.c = conn

    def flush(self) -> None:
        """Directory writes go straight to the connection; nothing waits."""

    def discard(self) -> None:
        """Directory writes go straight to the connection; nothing waits."""

    def claim(self, namespace: str, key: str, operation: str, fingerprint: str, at: datetime) -> IdemRecord | None:
        return self.claim_many([(namespace, key, operation, fingerprint)], at)[0]

    def claim_many(self, claims: Sequence[tuple[str, str, str, str]], at: datetime) -> list[IdemRecord | None]:
        found: dict[tuple[str, str], IdemRecord] = {}
        by_namespace: dict[str, dict[str, None]] = {}
        for namespace, key, _, _ in claims:
            by_namespace.setdefault(namespace, {})[key] = None
        for namespace, keys in by_namespace.items():
            # One namespace per query: SQLite answers `(namespace, key) IN (VALUES ...)` with a
            # full scan, `namespace = ? AND key IN (...)` with primary-key lookups.
            listed = list(keys)
            for first in range(0, len(listed), _KEYS_PER_SELECT):
                part = listed[first : first + _KEYS_PER_SELECT]
                rows = self.c.execute(
                    "SELECT key, operation, fingerprint, result, created_at FROM claims"
                    f" WHERE namespace=? AND key IN ({','.join('?' * len(part))})",
                    [namespace, *part],
                )
                for r in rows:
                    found[(namespace, r[0])] = IdemRecord(r[1], r[2], r[3], from_us(r[4]))
        out: list[IdemRecord | None] = []
        new: list[tuple[str, str, str, str, int]] = []
        for namespace, key, operation, fp in claims:
            existing = found.get((namespace, key))
            out.append(existing)
            if existing is None:
                found[(namespace, key)] = IdemRecord(operation, fp, "", at)
                new.append((namespace, key, operation, fp, to_us(at)))
        self.c.executemany("INSERT INTO claims VALUES (?,?,?,?,'',?)", new)
        return out

    def complete_claim(self, namespace: str, key: str, result_json: str) -> None:
        self.c.execute("UPDATE claims SET result=? WHERE namespace=? AND key=?", (result_json, namespace, key))

    def release_claim(self, namespace: str, key: str, fingerprint: str) -> None:
        self.c.execute(
            "DELETE FROM claims WHERE namespace=? AND key=? AND fingerprint=? AND result=''",
            (namespace, key, fingerprint),
        )

    def merged_members(self) -> list[tuple[str, str]]:
        return self.c.execute("SELECT member_id, merged_into FROM members WHERE merged_into != ''").fetchall()

    def merged_into(self, target: str) -> list[str]:
        rows = self.c.execute("SELECT member_id FROM members WHERE merged_into=? AND merged_into != ''", (target,))
        return [r[0] for r in rows]

    def add_member(self, member: Member) -> None:
        self.c.execute(
            "INSERT INTO members VALUES (?,?,?,?,?)",
            (member.member_id, member.status.value, json.dumps(member.profile, sort_keys=True), member.merged_into,
             to_us(member.created_at)),
        )  # fmt: skip
        self.c.executemany(
            "INSERT INTO external_ids VALUES (?,?,?,0)",
            [(e.kind, e.value, member.member_id) for e in member.external_ids],
        )

    def get_member(self, member_id: str) -> Member | None:
        row = self.c.execute(
            "SELECT status, profile, merged_into, created_at FROM members WHERE member_id=?", (member_id,)
        ).fetchone()
        if row is None:
            return None
        ids = self.c.execute(
            "SELECT kind, value, alias FROM external_ids WHERE member_id=? ORDER BY kind, value", (member_id,)
        ).fetchall()
        return Member(
            member_id=member_id,
            status=MemberStatus(row[0]),
            external_ids=tuple(ExternalId(k, v) for k, v, a in ids if not a),
            aliases=tuple(ExternalId(k, v) for k, v, a in ids if a),
            profile=json.loads(row[1]),
            merged_into=row[2],
            created_at=from_us(row[3]),
        )

    def find_member_id(self, ext: ExternalId) -> str | None:
        return self.external_id_owner(ext)

    def external_id_owner(self, ext: ExternalId) -> str | None:
        row = self.c.execute(
            "SELECT member_id FROM external_ids WHERE kind=? AND value=?", (ext.kind, ext.value)
        ).fetchone()
        return None if row is None else str(row[0])

    def set_status(self, member_id: str, status: MemberStatus, merged_into: str = "") -> None:
        self.c.execute(
            "UPDATE members SET status=?, merged_into=? WHERE member_id=?",
            (status.value, merged_into, member_id),
        )

    def set_blocked(self, member_id: str, blocked: bool) -> None:
        status = MemberStatus.BLOCKED if blocked else MemberStatus.ACTIVE
        self.c.execute(
            "UPDATE members SET status=? WHERE member_id=? AND status IN (?,?)",
            (status.value, member_id, MemberStatus.ACTIVE.value, MemberStatus.BLOCKED.value),
        )

    def move_external_ids_as_aliases(self, source: str, target: str) -> None:
        self.c.execute("UPDATE external_ids SET member_id=?, alias=1 WHERE member_id=?", (target, source))

    def erase(self, member_id: str) -> None:
        self.c.execute(
            "UPDATE members SET profile='{}', status=? WHERE member_id=?",
            (MemberStatus.ERASED.value, member_id),
        )
        self.c.execute("DELETE FROM external_ids WHERE member_id=?", (member_id,))

    def purge_claims_before(self, when: datetime, limit: int = PURGE_SLICE) -> int:
        doomed = self.c.execute(
            "SELECT namespace, key FROM claims WHERE created_at<? ORDER BY created_at LIMIT ?", (to_us(when), limit)
        ).fetchall()
        self.c.executemany("DELETE FROM claims WHERE namespace=? AND key=?", doomed)
        return len(doomed)


# A pass over a whole shard reads each page about once; a large page cache would only hold memory.
SCAN_CACHE_KIB = 8 * 1024

# Tables whose rows are often larger than a quarter page. A WITHOUT ROWID table keeps its rows in
# an index b-tree, where a row over ~1,000 bytes (4 KiB pages) spills into an overflow page of its
# own: a 1.4 KB purchase took 4.7 KB on disk. In a rowid table the same row fits a leaf page.
_ROWID_TABLES = ("purchases",)


def _rebuild_with_rowid(conn: sqlite3.Connection, table: str) -> None:
    """Moves a table created WITHOUT ROWID by an earlier release into a rowid table, in one transaction.

    The schema script then creates the table's indexes again (they go with the old table). The
    copy holds the file's write lock while it runs, so it is logged; it leaves the old pages free
    inside the file (VACUUM returns them to the disk).
    """

    def move(sql: str) -> None:
        create, found = re.subn(r"\)\s*WITHOUT\s+ROWID\s*$", ")", sql.strip(), flags=re.IGNORECASE)
        renamed = create.replace(f"TABLE {table} ", f"TABLE {table}_rowid ", 1)
        if found != 1 or renamed == create:
            raise RuntimeError(f"cannot move {table} to a rowid table: unexpected schema {sql!r}")
        log.warning("moving %s to a rowid table (a one-time upgrade; holds the shard's writes meanwhile)", table)
        conn.execute(renamed)
        conn.execute(f"INSERT INTO {table}_rowid SELECT * FROM {table}")
        conn.execute(f"DROP TABLE {table}")
        conn.execute(f"ALTER TABLE {table}_rowid RENAME TO {table}")
        log.warning("moved %s to a rowid table", table)

    _upgrade_once(conn, lambda: _without_rowid_sql(conn, table), move)


def _without_rowid_sql(conn: sqlite3.Connection, table: str) -> str | None:
    """The table's CREATE statement if it exists and is WITHOUT ROWID."""
    row = conn.execute("SELECT sql FROM sqlite_schema WHERE type='table' AND name=?", (table,)).fetchone()
    return str(row[0]) if row is not None and "WITHOUT ROWID" in row[0].upper() else None


def _add_columns(conn: sqlite3.Connection, table: str, columns: dict[str, str], why: str, fill: str = "") -> None:
    """Gives a table an earlier release created the columns it lacks, with their defaults
    (cheap: SQLite adds a column with a constant default without rewriting rows), then runs
    `fill` (an UPDATE setting them from what the rows hold) in the same unit."""

    def add(_: bool) -> None:
        log.warning("adding %s to %s (a one-time upgrade): %s", ", ".join(columns), table, why)
        for name, kind in columns.items():
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        if fill:
            conn.execute(fill)

    _upgrade_once(conn, lambda: _lacks_column(conn, table, next(iter(columns))) or None, add)


def _watch_told_tiers(conn: sqlite3.Connection) -> None:
    """A shard written before tiers were watched (no tier_due table) gets one, with every member
    it has told a tier due at once: the maintenance pass looks at each under the version in
    effect and announces what lapsed meanwhile (members never looked at would not hear of it)."""

    def pending() -> bool | None:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
        return True if "member_state" in tables and "tier_due" not in tables else None

    def watch(_: bool) -> None:
        log.warning("watching the tiers told before (a one-time upgrade): every told tier due now")
        conn.execute("CREATE TABLE tier_due (member_id TEXT PRIMARY KEY, due INTEGER NOT NULL) WITHOUT ROWID")
        conn.execute(  # due at 1970: at once, whatever the ledger's clock says
            "INSERT INTO tier_due SELECT member_id, 0 FROM member_state"
            " WHERE coalesce(json_extract(state, '$.tier'), '') != '' AND coalesce(json_extract(state, '$.merged_into'), '') = ''"
        )

    _upgrade_once(conn, pending, watch)


def _lacks_column(conn: sqlite3.Connection, table: str, column: str) -> bool:
    """Whether the table exists without the column (a file from an earlier release)."""
    columns = {str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")}
    return bool(columns) and column not in columns


U = TypeVar("U")


def _upgrade_once(conn: sqlite3.Connection, pending: Callable[[], U | None], apply: Callable[[U], None]) -> None:
    """A one-time upgrade of a file an earlier release wrote, in one transaction under its write
    lock. `pending` says what is left to do (None: nothing); it is asked again once the lock is
    held, because another process may have done it while this one waited."""
    if pending() is None:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = pending()
        if found is not None:
            apply(found)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _shard_path(data_dir: Path, shard: int) -> Path:
    return data_dir / f"ledger-shard-{shard:03d}.sqlite"


class SqliteLedgerStore:
    """Opens (creating if needed) `shards` shard files and a directory under `data_dir`."""

    @staticmethod
    def holds_ledger(data_dir: Path) -> bool:
        """Whether a ledger was ever opened in `data_dir` (opening one creates it)."""
        return _shard_path(data_dir, 0).exists()

    def __init__(self, data_dir: Path, shards: int, synchronous: str = "NORMAL", *, group_window: float = 0) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._shards = shards
        self._check_layout()
        # fsync-per-commit modes keep blocking commits off the event loop (sqlite_worker.py).
        threaded = synchronous.upper() != "NORMAL"
        self._writers: list[Executor] = []
        self._readers: list[Executor] = []
        self._scanners: list[Executor] = []
        for i in range(shards):
            path = _shard_path(self.data_dir, i)
            self._init_schema(path, SHARD_SCHEMA, synchronous)
            self._writers.append(
                executor(
                    f"shard{i}-w",
                    connect(path, synchronous, autocheckpoint=False),
                    SqliteShardTx,
                    group=True,
                    threaded=threaded,
                    window=group_window,
                )
            )
            self._readers.append(
                executor(f"shard{i}-r", connect(path, synchronous), SqliteShardTx, group=False, threaded=threaded)
            )
            # Long reads get a thread of their own whatever the mode: on the loop executor a
            # reconciliation pass over 260,000 purchases held every request for 1.5-1.8 s.
            scan_conn = connect(path, synchronous, cache_kib=SCAN_CACHE_KIB)
            self._scanners.append(
                executor(f"shard{i}-scan", scan_conn, SqliteShardTx, group=False, threaded=True, abandon_on_close=True)
            )
        dpath = self.data_dir / "ledger-directory.sqlite"
        self._init_schema(dpath, DIRECTORY_SCHEMA, synchronous)
        self._dir_writer = executor(
            "dir-w",
            connect(dpath, synchronous, autocheckpoint=False),
            SqliteDirectoryTx,
            group=True,
            threaded=threaded,
            window=group_window,
        )
        self._dir_reader = executor(
            "dir-r", connect(dpath, synchronous), SqliteDirectoryTx, group=False, threaded=threaded
        )
        self._checkpointer = Checkpointer([_shard_path(self.data_dir, i) for i in range(shards)] + [dpath], synchronous)

    def _check_layout(self) -> None:
        """Refuses to open with a different shard count: ids carry their routing."""
        marker = self.data_dir / "ledger-layout.json"
        if marker.exists():
            found = json.loads(marker.read_text())["shards"]
            if found != self._shards:
                raise RuntimeError(
                    f"{self.data_dir} holds a ledger with {found} shards; POINTMESH_LEDGER_SHARDS={self._shards}"
                )
        else:
            marker.write_text(json.dumps({"shards": self._shards}))

    @staticmethod
    def _init_schema(path: Path, schema: str, synchronous: str) -> None:
        conn = connect(path, synchronous)
        try:
            for table in _ROWID_TABLES:
                _rebuild_with_rowid(conn, table)
            # The listing index reads the channel and store, filled from each purchase's body
            # (logged: it holds the shard's writes while it runs).
            _add_columns(
                conn,
                "purchases",
                {"channel": "TEXT NOT NULL DEFAULT ''", "store_id": "TEXT NOT NULL DEFAULT ''"},
                "the channel and store the purchase listings read",
                fill="UPDATE purchases SET channel=coalesce(json_extract(body, '$.channel'), ''),"
                " store_id=coalesce(json_extract(body, '$.store_id'), '')",
            )
            # Holds placed earlier name no channel: any key with the scope may settle them, as before.
            _add_columns(conn, "holds", {"channel": "TEXT NOT NULL DEFAULT ''", "store_id": "TEXT NOT NULL DEFAULT ''"},
                         "the channel and store each hold was placed for")  # fmt: skip
            # Lots that expired earlier did not count it: a return of their earn is taken from the
            # member, as before.
            _add_columns(conn, "lots", {"expired": "INTEGER NOT NULL DEFAULT 0"}, "the points of each lot that expired")
            # Holds placed earlier name no lots: they keep the earliest-expiring points, as before.
            _add_columns(conn, "holds", {"reserves": "TEXT NOT NULL DEFAULT ''"}, "the lots each hold keeps")
            _watch_told_tiers(conn)
            conn.executescript(schema)
        finally:
            conn.close()

    @property
    def shard_count(self) -> int:
        return self._shards

    multi_member_units = True
    shared_by_replicas = False

    async def write_directory_alone(self, name: str, work: Callable[[SqliteDirectoryTx], T]) -> T:
        return await self.write_directory(work)  # one process, whose directory writes are serialised

    async def write(self, shard: int, work: Callable[[SqliteShardTx], T]) -> T:
        return await self._writers[shard].submit(work)

    async def read(self, shard: int, work: Callable[[SqliteShardTx], T]) -> T:
        return await self._readers[shard].submit(work)

    async def scan(self, shard: int, work: Callable[[SqliteShardTx], T]) -> T:
        return await self._scanners[shard].submit(work)

    async def write_directory(self, work: Callable[[SqliteDirectoryTx], T]) -> T:
        return await self._dir_writer.submit(work)

    async def read_directory(self, work: Callable[[SqliteDirectoryTx], T]) -> T:
        return await self._dir_reader.submit(work)

    async def archive(self, before: datetime) -> int:
        """Nothing to do: a SQLite shard is one file, not a partition with a size limit."""
        return 0

    async def close(self) -> None:
        for worker in [*self._writers, *self._readers, *self._scanners, self._dir_writer, self._dir_reader]:
            worker.close()
        self._checkpointer.close()
