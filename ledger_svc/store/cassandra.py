"""Cassandra ledger store: the same shard contract as SQLite, on one partition per member.

A unit of work reads the partitions it touches (each read starts with the partition's
`version`), stages its writes in memory, and commits each partition it wrote with one
conditional batch `IF version = <read>`. Everything one member's posting writes (balances,
journal legs, lot, hold, idempotency record, outbox row) lands together or not at all, and a
unit that raced another on the same member loses the condition and is run again from fresh
reads, so two redemptions can never both spend the same points. docs/cassandra.md has the
model, the crash analysis and why funding and system balances are derived, not stored.

The unit functions are the synchronous code the SQLite store runs too, so they run on a
worker pool here; the event loop only awaits their futures. Within one process, units on
the same member wait for each other (striped locks) instead of burning conditional writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
import uuid
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from ledger_svc.domain import (
    Entry,
    ExternalId,
    FailedPrecondition,
    Hold,
    HoldStatus,
    Lot,
    Member,
    MemberStatus,
    SagaState,
    TxKind,
    Unavailable,
)
from ledger_svc.store.base import (
    PURGE_SLICE,
    AccountRow,
    IdemRecord,
    OutboxRow,
    SagaRecord,
    StoreClosed,
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
from ledger_svc.store.cassandra_schema import (
    DAY_US,
    LATEST,
    applied_version,
    check_keyspace,
    listing_bucket,
    review_bucket,
)
from pointmesh.cassandra_client import connect
from pointmesh.config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

MEMBER_KINDS = ("member", "pending", "debt")
NO_MEMBER = "~"  # the partition of a shard's rows that belong to no member
# A pointer in shard_index younger than this is never removed: the unit that wrote it may not
# have committed yet (writers refresh a pointer older than half of it before committing).
INDEX_GRACE_US = 300_000_000
ENTRY_SLOTS = 1 << 16  # journal legs one unit may write into one partition
SEQ_TAGS = 1024
MAX_ATTEMPTS = 80
MAX_TTL_SECONDS = 630_720_000
# An owner row goes in before its record's batch, so it lives this much longer: a replay that
# found the owner gone first would insert the record again and conflict.
OWNER_TTL_MARGIN_S = 86_400
BACKFILL_IN_FLIGHT = 128
CLAIM_PURGE_IN_FLIGHT = 128  # claim deletes in flight at once (two statements per claim)
# Status prefix of a member whose creating unit had not finished, as releases before 2026-12-06
# wrote it (CassandraDirectoryTx.commit); read still, never written.
PENDING_MEMBER = "pending:"
# The member row of a signup whose attempt gave up (an external id was someone else's): written
# `IF NOT EXISTS`, it and a finisher's row exclude each other, so exactly one of them stands.
GIVEN_UP_MEMBER = "given-up"
# An external id claimed for a member that never got its row is free again this long after the
# claim's retention (a day at most): by then no retry or replay can finish that member.
ABANDONED_MARGIN_S = 86_400
# meta key of claim retention's watermark: [day, created_us, namespace, key] of the last claim deleted
CLAIM_PURGE_MARK = "claims_purged"
CLAIM_PURGE_PAGE = 5_000  # claims read from a day's index at once
LISTING_AHEAD = 32  # listing buckets read at once, at most
# meta key (`reviews_indexed:<shard>`) saying every review of the shard is in review_days: set
# when a ledger is created, and by `backfill` on a ledger written before the index existed.
REVIEWS_INDEXED = "reviews_indexed"
# Small, bounded row kinds read with the partition's statics on first touch.
LIVE_KINDS = ("acct", "hold", "lot", "months", "state", "wait")
# Row kinds archived to monthly history partitions once older than the live horizon, with
# the position of their time in the body and the owner key that finds them by id.
ARCHIVED: dict[str, tuple[int, Callable[[str, list[Any]], str], Callable[[list[Any]], bool]]] = {
    "tx": (4, lambda id_, r: id_, lambda r: True),
    "entry": (3, lambda id_, r: "", lambda r: True),
    "lot_closed": (6, lambda id_, r: _archived_lot_key(r[2], r[0]), lambda r: True),
    "hold_done": (5, lambda id_, r: id_, lambda r: True),
    "purchase": (2, lambda id_, r: id_, lambda r: r[0] != "PENDING_ACCRUAL"),  # waiting ones are live work
    "review": (2, lambda id_, r: id_, lambda r: r[1] != "OPEN"),
}
ARCHIVE_BATCH = 200  # rows moved per conditional batch (Cassandra refuses very large batches)
# Row kinds that put a partition in the shard's 'due' index: rare open work.
INDEXED = {"due": {"wait", "saga"}}
# Queues of pointers (docs/cassandra.md), bucketed by time: bucket width in microseconds.
QUEUE_BUCKET_US = {
    "outbox": 60_000_000, "hold": 3_600_000_000, "lot": 86_400_000_000, "release": 86_400_000_000,
    "tier": 86_400_000_000,
}  # fmt: skip
# A pointer or bucket entry younger than this is never removed (its unit may still commit);
# writers re-announce a bucket at most every BUCKET_ANNOUNCE_S.
QUEUE_GRACE_US = 60_000_000
BUCKET_ANNOUNCE_S = 10.0


class Conflict(Exception):
    """A partition changed between this unit's read and its commit; the unit runs again.

    Not a LedgerError on purpose: units catch LedgerError per item, and this one must reach
    the retry loop. Once the loop gives up it becomes StoreBusy."""


LEASE_SECONDS = 30  # how long a lease outlives a holder that died holding it
LEASE_WAIT_SECONDS = 10.0  # how long a block waits for another's lease


class StoreBusy(Unavailable):
    """Every attempt of a unit lost its conditional write; the client retries with its key."""


class StoreUnreachable(Unavailable):
    """The driver could not get an answer (timeout, no host, too few replicas): the same call
    with the same idempotency key may be sent again, so clients see UNAVAILABLE."""


class UnknownOutcome(Unavailable):
    """A conditional write timed out and reading back could not tell whether it applied; the
    client's retry with the same key finds the result if it did."""


class ExternalIdTaken(FailedPrecondition):
    """An external id (card, login) already belongs to another member."""


class LayoutMismatch(RuntimeError):
    """The ledger was written with another shard count; ids carry their routing."""


def _driver_failures() -> tuple[type[BaseException], ...]:
    """Driver errors that say "no answer now", not "bad request" (InvalidRequest stays a bug)."""
    from cassandra import OperationTimedOut, RequestExecutionException
    from cassandra.cluster import NoHostAvailable

    return OperationTimedOut, RequestExecutionException, NoHostAvailable


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def member_of_account(account: str) -> str | None:
    """The member whose partition holds an account; None for funding and system accounts."""
    kind, _, rest = account.partition(":")
    return rest.rpartition(":")[0] if kind in MEMBER_KINDS else None


# Row codecs: compact JSON arrays, times as integer microseconds.


def _enc_tx(t: TxRecord) -> str:
    return _dumps([t.kind.value, t.member_id, t.unit, t.points, to_us(t.recorded_at), to_us(t.business_time),
                   t.reference, t.funding, t.purchase_minor, t.purchase_currency, t.reversed_points,
                   t.refunded_minor, t.lot_id, t.pending, t.original_tx, t.balance_after_json])  # fmt: skip


def _dec_tx(tx_id: str, body: str) -> TxRecord:
    r = json.loads(body)
    return TxRecord(tx_id, TxKind(r[0]), r[1], r[2], r[3], from_us(r[4]), from_us(r[5]), r[6], r[7], r[8], r[9],
                    r[10], r[11], r[12], bool(r[13]), r[14], r[15])  # fmt: skip


def _enc_lot(lot: Lot) -> str:
    return _dumps([lot.member_id, lot.unit, lot.earn_transaction_id, lot.original_points, lot.remaining_points,
                   _opt_us(lot.expires_at), to_us(lot.created_at), lot.pending, _opt_us(lot.release_at),
                   lot.pending_review, lot.expired_points])  # fmt: skip


def _dec_lot(lot_id: str, body: str) -> Lot:
    r = json.loads(body)
    expired = r[10] if len(r) > 10 else 0  # bodies written before 2026-12-06 did not count it
    return Lot(lot_id, r[0], r[1], r[2], r[3], r[4], _opt_dt(r[5]), from_us(r[6]), bool(r[7]), _opt_dt(r[8]),
               bool(r[9]), expired)  # fmt: skip


def _enc_hold(h: Hold) -> str:
    return _dumps([h.member_id, h.unit, h.points, h.status.value, h.captured_points, to_us(h.created_at),
                   to_us(h.expires_at), h.reference, h.saga_id, h.channel, h.store_id,
                   encode_reserves(h.reserves)])  # fmt: skip


def _dec_hold(hold_id: str, body: str) -> Hold:
    r = json.loads(body)
    channel, store_id = r[9:11] if len(r) > 9 else ("", "")  # bodies written before 2026-12-06 have neither
    reserves = decode_reserves(r[11]) if len(r) > 11 else ()  # nor their lots before 2026-12-07
    return Hold(hold_id, r[0], r[1], r[2], HoldStatus(r[3]), r[4], from_us(r[5]), from_us(r[6]), r[7], r[8],
                channel, store_id, reserves)  # fmt: skip


def _enc_saga(s: SagaRecord) -> str:
    return _dumps([s.kind, s.state.value, s.source_member, s.dest_member, s.unit, s.points, s.hold_id,
                   s.payload_json, to_us(s.created_at), to_us(s.updated_at)])  # fmt: skip


def _dec_saga(saga_id: str, body: str) -> SagaRecord:
    r = json.loads(body)
    return SagaRecord(saga_id, r[0], SagaState(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], from_us(r[8]),
                      from_us(r[9]))  # fmt: skip


def _earned(tx_id: str) -> str:
    """Owner key of the lot an earn created (its partition, found without the member)."""
    return f"lot-of\x1f{tx_id}"


def _archived_lot_key(tx_id: str, member_id: str) -> str:
    """Owner-month key of a member's closed lot of an earn: a merge within the shard leaves one
    lot of the earn on each member, archived in months of their own (archives of before
    2026-12-07 kept one month under `_earned`, whichever member's was archived last)."""
    return f"{_earned(tx_id)}\x1f{member_id}"


def _idem_id(namespace: str, key: str) -> str:
    return f"{namespace}\x1f{key}"


@dataclass(frozen=True, slots=True)
class Pointer:
    """A queue row: `at` (due time, or an event's sequence) in `bucket`, pointing at row `id` of `p`."""

    at: int
    p: str
    id: str
    bucket: int
    written: int


class _Part:
    """One member partition as this unit of work sees it: read lazily, written in memory."""

    __slots__ = (
        "_tx", "entries_used", "expiring", "fresh", "kinds", "last_seq", "listed", "p", "rows", "staged", "version",
    )  # fmt: skip

    def __init__(self, tx: CassandraShardTx, p: str) -> None:
        self._tx = tx
        self.p = p
        # One read brings the statics and the live rows every posting needs; the statics come
        # with the rows, read together. With no live rows, the version is read first and the
        # rows again after it, so the rows are never older than the version the batch checks.
        rows = list(tx.store.q("live", (tx.store.ledger, p)))
        head = rows[0] if rows else tx.store.q("head", (tx.store.ledger, p)).one()
        if not rows and head is not None:
            rows = list(tx.store.q("live", (tx.store.ledger, p)))
        self.kinds: dict[str, dict[str, str]] = {kind: {} for kind in LIVE_KINDS}
        for row in rows:
            self.kinds[row.kind][row.id] = row.body
        self.version: int | None = None if head is None else head.version
        self.last_seq = 0 if head is None or head.seq is None else head.seq
        self.rows: dict[tuple[str, str], str | None] = {}
        self.staged: dict[tuple[str, str], str | None] = {}
        self.fresh: set[tuple[str, str]] = set()  # rows the batch inserts only if absent
        self.listed: list[tuple[str, str, int, str]] = []  # new purchases: (channel, store, receipt µs, id)
        self.expiring: set[tuple[str, str]] = set()  # rows written with the retention TTL
        self.entries_used = 0

    @property
    def next_version(self) -> int:
        return (self.version or 0) + 1

    def get(self, kind: str, id_: str) -> str | None:
        key = (kind, id_)
        if key in self.staged:
            return self.staged[key]
        loaded = self.kinds.get(kind)
        if loaded is not None:
            return loaded.get(id_)
        if key not in self.rows:
            row = self._tx.store.q("row", (self._tx.store.ledger, self.p, kind, id_)).one()
            self.rows[key] = None if row is None else row.body
        return self.rows[key]

    def all(self, kind: str) -> dict[str, str]:
        loaded = self.kinds.get(kind)
        if loaded is None:
            loaded = {r.id: r.body for r in self._tx.store.q("kind", (self._tx.store.ledger, self.p, kind))}
            self.kinds[kind] = loaded
        out = dict(loaded)
        for (k, id_), body in self.staged.items():
            if k == kind:
                if body is None:
                    out.pop(id_, None)
                else:
                    out[id_] = body
        return out

    def known(self, kind: str, id_: str) -> bool:
        """Whether this unit has seen the row exist (read it, or staged it), without a query."""
        key = (kind, id_)
        if key in self.staged:
            return True
        loaded = self.kinds.get(kind)
        if loaded is not None and id_ in loaded:
            return True
        return self.rows.get(key) is not None

    def committed(self, kind: str, id_: str) -> str | None:
        """The row as this unit read it, ignoring what it staged; None if it did not read it
        (no query: only the side tables of what the unit changed need it)."""
        loaded = self.kinds.get(kind)
        return loaded.get(id_) if loaded is not None else self.rows.get((kind, id_))

    def months(self) -> list[int]:
        """Months (yyyymm) this member has archived history in."""
        body = self.get("months", "")
        return [] if body is None else list(json.loads(body))

    def put(self, kind: str, id_: str, body: str) -> None:
        self.staged[(kind, id_)] = body

    def delete(self, kind: str, id_: str) -> None:
        self.staged[(kind, id_)] = None

    def next_entry_id(self) -> int:
        self.entries_used += 1
        if self.entries_used >= ENTRY_SLOTS:
            raise ValueError(f"a unit may write at most {ENTRY_SLOTS - 1} journal legs into one member partition")
        return self.next_version * ENTRY_SLOTS + self.entries_used

    def next_seq(self) -> int:
        raw = max(self.last_seq + 1, time.time_ns() // 1000)
        self.last_seq = raw
        return raw * SEQ_TAGS + zlib.crc32(self.p.encode()) % SEQ_TAGS


class CassandraShardTx:
    """ShardTx over member partitions of one shard (ledger_svc/store/base.py has the contract)."""

    def __init__(self, store: CassandraLedgerStore, shard: int, writing: bool) -> None:
        self.store = store
        self.shard = shard
        self.writing = writing
        self.parts: dict[str, _Part] = {}
        self.new_owners: dict[str, str] = {}
        self.idem: dict[str, IdemRecord] = {}
        self.derived: dict[str, AccountRow] = {}
        self.locks: list[threading.RLock] = []
        self.scanned: list[tuple[str, str, int]] = []  # (index, partition, pointer written at)
        self.relayed: list[tuple[Pointer, int]] = []  # events marked sent, and when
        self.stale: list[tuple[str, Pointer]] = []  # queue pointers a read found pointing at nothing due

    # Partitions and owners ----------------------------------------------------------------

    def pkey(self, member_id: str) -> str:
        return f"{self.shard}/{member_id or NO_MEMBER}"

    def part(self, p: str, *, lock: bool = True) -> _Part:
        found = self.parts.get(p)
        if found is None:
            if self.writing and lock:
                stripe = self.store.lock_for(p)
                if stripe.acquire(timeout=2.0):  # past it, the version check alone keeps units apart
                    self.locks.append(stripe)
            found = self.parts[p] = _Part(self, p)
        return found

    def member(self, member_id: str) -> _Part:
        return self.part(self.pkey(member_id))

    def owner(self, object_id: str) -> str | None:
        if object_id in self.new_owners:
            return self.new_owners[object_id]
        return self.store.owner(self.shard, object_id)

    def owned(self, object_id: str, kind: str) -> tuple[_Part, str] | None:
        """The live row, or the archived one (the live one wins: a row written again after it
        was archived, like a transaction a late reversal updates, lives again)."""
        p = self.owner(object_id)
        if p is None:
            return None
        part = self.part(p)
        body = part.get(kind, object_id)
        if body is None and part.months():
            body = self.store.archived(self.shard, p, kind, object_id, object_id)
        return None if body is None else (part, body)

    def with_history(self, part: _Part, kind: str) -> dict[str, str]:
        """A partition's rows of `kind`, archived and live (live wins)."""
        rows: dict[str, str] = {}
        for month in part.months():
            rows.update({r.id: r.body for r in self.store.q("hist_kind", (self.store.ledger, part.p, month, kind))})
        rows.update(part.all(kind))
        return rows

    def put_owned(self, part: _Part, kind: str, object_id: str, body: str) -> None:
        """An object this unit did not read is inserted IF NOT EXISTS: a unit that found it
        absent through the owners table (outside the version check) and raced another that
        created it loses its batch and runs again, instead of creating it twice."""
        if not part.known(kind, object_id):
            part.fresh.add((kind, object_id))
        part.put(kind, object_id, body)
        self.new_owners[object_id] = part.p

    def scan(self, index: str = "") -> list[_Part]:
        """The shard's partitions: all of them, or those an index ('outbox', 'due') points at.

        Scanned partitions are not locked: the version check alone keeps a job's writes right.
        """
        found = self.store.partitions(self.shard, index)
        self.scanned += [(index, p, written) for p, written in found if index]
        return [self.part(p, lock=False) for p, _ in found]

    def release(self) -> None:
        for lock in self.locks:
            lock.release()
        self.locks.clear()

    # Idempotency ---------------------------------------------------------------------------

    def get_idempotency(self, namespace: str, key: str) -> IdemRecord | None:
        id_ = _idem_id(namespace, key)
        if id_ in self.idem:
            return self.idem[id_]
        found = self.owned(id_, "idem")
        if found is None:
            return None
        r = json.loads(found[1])
        return IdemRecord(r[0], r[1], r[2], from_us(r[3]))

    def put_idempotency(self, namespace: str, key: str, record: IdemRecord) -> None:
        # Placed at commit time in the partition the unit wrote, so it commits with the posting.
        self.idem[_idem_id(namespace, key)] = record

    # Accounts ------------------------------------------------------------------------------

    def get_accounts(self, accounts: Sequence[str]) -> list[AccountRow]:
        out = []
        for account in accounts:
            member = member_of_account(account)
            if member is None:
                row = self.derived.get(account)
                out.append(AccountRow(account) if row is None else AccountRow(*_row_values(row)))
                continue
            body = self.member(member).all("acct").get(account)
            out.append(AccountRow(account) if body is None else AccountRow(account, *json.loads(body)))
        return out

    def put_account(self, row: AccountRow) -> None:
        member = member_of_account(row.account)
        if member is None:
            # Funding and system balances are the sum of their legs (docs/cassandra.md).
            self.derived[row.account] = AccountRow(*_row_values(row))
            return
        self.member(member).put("acct", row.account, _dumps([row.balance, row.reserved, row.lifetime_earned,
                                                             row.version]))  # fmt: skip

    def list_accounts(self) -> list[AccountRow]:
        rows = [AccountRow(a, *json.loads(b)) for part in self.scan() for a, b in part.all("acct").items()]
        derived = {a: s for a, s in self.sum_entries_by_account().items() if member_of_account(a) is None}
        rows += [AccountRow(a, s) for a, s in derived.items()]
        return sorted(rows, key=lambda r: r.account)

    # Journal -------------------------------------------------------------------------------

    def add_transaction(self, tx: TxRecord) -> None:
        self.put_owned(self.member(tx.member_id), "tx", tx.tx_id, _enc_tx(tx))

    def update_transaction(self, tx: TxRecord) -> None:
        part = self.member(tx.member_id)
        part.put("tx", tx.tx_id, _enc_tx(tx))  # an update: never IF NOT EXISTS
        self.new_owners[tx.tx_id] = part.p

    def get_transaction(self, tx_id: str) -> TxRecord | None:
        found = self.owned(tx_id, "tx")
        return None if found is None else _dec_tx(tx_id, found[1])

    def add_entries(self, tx: TxRecord, legs: Sequence[tuple[str, int]]) -> None:
        rec, biz = to_us(tx.recorded_at), to_us(tx.business_time)
        for account, points in legs:
            part = self.member(member_of_account(account) or tx.member_id)
            entry_id = part.next_entry_id()
            part.put("entry", f"{account}|{entry_id:019d}",
                     _dumps([tx.tx_id, points, tx.kind.value, rec, biz, tx.reference]))  # fmt: skip

    def list_entries(self, account: str, before_entry_id: int, limit: int) -> list[Entry]:
        member = member_of_account(account)
        if member is None:
            return []  # system accounts have no single partition; their legs sit with members
        low, high = f"{account}|", f"{account}|{min(before_entry_id, 10**19 - 1):019d}"
        p = self.pkey(member)
        rows = {row.id: row for row in self.store.q("entries", (self.store.ledger, p, low, high, limit))}
        if len(rows) < limit:
            # Older pages continue in the member's monthly history, newest month first. An
            # archive pass that lost its delete to a posting (or died before it) left copies of
            # live rows there: the live row wins, and a copy does not count towards the page.
            for month in sorted(self.part(p, lock=False).months(), reverse=True):
                for row in self.store.q("hist_entries", (self.store.ledger, p, month, low, high, limit)):
                    rows.setdefault(row.id, row)
                if len(rows) >= limit:
                    break
        out = []
        for row in sorted(rows.values(), key=lambda r: r.id, reverse=True)[:limit]:
            r = json.loads(row.body)
            out.append(Entry(int(row.id.rpartition("|")[2]), r[0], account, r[1], TxKind(r[2]), from_us(r[3]),
                             from_us(r[4]), r[5]))  # fmt: skip
        return out

    def _legs(self) -> Iterable[tuple[str, int, list[Any]]]:
        for part in self.scan():
            for id_, body in self.with_history(part, "entry").items():
                account, _, entry_id = id_.rpartition("|")
                yield account, int(entry_id), json.loads(body)

    def sum_entries_by_account(self) -> dict[str, int]:
        sums: dict[str, int] = defaultdict(int)
        for account, _, r in self._legs():
            sums[account] += r[1]
        return dict(sums)

    def sum_entries_before(self, when: datetime) -> dict[str, int]:
        sums: dict[str, int] = defaultdict(int)
        limit = to_us(when)
        for account, _, r in self._legs():
            if r[3] < limit:
                sums[account] += r[1]
        return dict(sums)

    def movements_between(self, start: datetime, end: datetime) -> list[tuple[str, str, int]]:
        sums: dict[tuple[str, str], int] = defaultdict(int)
        lo, hi = to_us(start), to_us(end)
        for account, _, r in self._legs():
            if lo <= r[3] < hi:
                sums[(account, r[2])] += r[1]
        return [(a, k, s) for (a, k), s in sorted(sums.items())]

    def unbalanced_transactions(self) -> list[tuple[str, int]]:
        """Per transaction and unit, as on SQLite."""
        sums: dict[tuple[str, str], int] = defaultdict(int)
        for account, _, r in self._legs():
            sums[(r[0], account.rpartition(":")[2])] += r[1]
        return sorted((t, s) for (t, _), s in sums.items() if s != 0)

    def entries_without_transaction(self) -> list[tuple[str, int]]:
        """The legs' transaction ids against the ids (not bodies) of the shard's transaction
        rows, live and archived: one more read per member partition (and archived month), in
        the same pass over the shard's partitions reconciliation already makes."""
        legs: dict[str, int] = defaultdict(int)
        for _, _, r in self._legs():
            legs[r[0]] += 1
        recorded: set[str] = set()
        s = self.store
        for part in self.scan():
            for month in part.months():
                recorded.update(r.id for r in s.q("hist_kind_ids", (s.ledger, part.p, month, "tx")))
            recorded.update(r.id for r in s.q("kind_ids", (s.ledger, part.p, "tx")))
        return sorted((tx_id, n) for tx_id, n in legs.items() if tx_id not in recorded)

    def transactions_without_events(self) -> list[str] | None:
        """Not told here: sent events expire by a TTL counted from the relay's write (wall-clock
        time), so which missing event retention took cannot be told from the rows."""
        return None

    # Lots: open ones in 'lot', spent ones in 'lot_closed', so the live set stays small ----

    def add_lot(self, lot: Lot) -> None:
        part = self.member(lot.member_id)
        live = lot.remaining_points > 0
        part.put("lot" if live else "lot_closed", lot.lot_id, _enc_lot(lot))
        part.delete("lot_closed" if live else "lot", lot.lot_id)
        self.new_owners[_earned(lot.earn_transaction_id)] = part.p

    def update_lot(self, lot: Lot) -> None:
        self.add_lot(lot)

    def _lots(self, member_id: str) -> list[Lot]:
        return [_dec_lot(i, b) for i, b in self.member(member_id).all("lot").items()]

    def spendable_lots(self, member_id: str, unit: str) -> list[Lot]:
        lots = [lot for lot in self._lots(member_id) if lot.unit == unit and not lot.pending]
        return sorted(lots, key=_spend_order)

    def pending_lots(self, member_id: str, unit: str) -> list[Lot]:
        lots = [lot for lot in self._lots(member_id) if lot.unit == unit and lot.pending]
        return sorted(lots, key=lambda lot: (lot.created_at, lot.lot_id))

    def spendable_total(self, member_id: str, unit: str) -> int:
        return sum(lot.remaining_points for lot in self.spendable_lots(member_id, unit))

    def spent_lots_with_expired(self, member_id: str, unit: str) -> list[Lot]:
        closed = [_dec_lot(i, b) for i, b in self.member(member_id).all("lot_closed").items()]
        lots = [lot for lot in closed if lot.unit == unit and not lot.pending and lot.expired_points > 0]
        return sorted(lots, key=lambda lot: (lot.created_at, lot.lot_id))

    def lot_of_transaction(self, tx_id: str, member_id: str = "") -> Lot | None:
        p = self.pkey(member_id) if member_id else self.owner(_earned(tx_id))
        if p is None:
            return None
        part = self.part(p)
        found = [_dec_lot(i, b) for kind in ("lot", "lot_closed") for i, b in part.all(kind).items()]
        found = [lot for lot in found if lot.earn_transaction_id == tx_id]
        if not found and part.months():
            member = member_id or p.split("/", 1)[1]
            month = self.store.owner_month(self.shard, _archived_lot_key(tx_id, member))
            if month is None:
                month = self.store.owner_month(self.shard, _earned(tx_id))
            rows = [] if month is None else self.store.q("hist_kind", (self.store.ledger, p, month, "lot_closed"))
            found = [lot for lot in (_dec_lot(r.id, r.body) for r in rows) if lot.earn_transaction_id == tx_id]
        found.sort(key=lambda lot: (lot.member_id != member_id, lot.remaining_points <= 0))
        return found[0] if found else None

    def _due_ids(self, queue: str, kind: str, when: datetime, limit: int,
                 still_due: Callable[[str], bool]) -> list[tuple[str, str]]:  # fmt: skip
        """(id, body) of `kind` rows the queue says are due by `when` and that still are."""

        def due(pointer: Pointer) -> tuple[str, str] | None:
            body = self.part(pointer.p, lock=False).all(kind).get(pointer.id)
            return (pointer.id, body) if body is not None and still_due(body) else None

        return list(dict(self._walk_due(queue, when, limit, due)).items())

    def _walk_due(self, queue: str, when: datetime, limit: int, due: Callable[[Pointer], T | None]) -> list[T]:
        """What `due` makes of the queue's pointers due by `when`, page after page until `limit`
        are found or the queue ends: pointers to rows settled since (a hold captured, a credit
        released by hand) stay until pruned a minute later, and a page full of them must not
        read as "nothing more due" (the maintenance pass stops at a short page). Those are
        noted for pruning."""
        found: list[T] = []
        page, after = limit * 2 + 10, None
        while len(found) < limit:
            pointers = self.store.queue_after(self.shard, queue, to_us(when), page, after)
            for pointer in pointers:
                item = due(pointer)
                if item is None:
                    self.stale.append((queue, pointer))
                else:
                    found.append(item)
            if len(pointers) < page:
                break
            after = (pointers[-1].at, pointers[-1].p, pointers[-1].id)
        return found

    def lots_expired_by(self, when: datetime, limit: int, after: object = None) -> tuple[list[Lot], object]:
        """Pages in queue order, (due time, partition, lot id); the cursor is the last pointer read."""
        since = after if isinstance(after, tuple) else None
        pointers = self.store.queue_after(self.shard, "lot", to_us(when), limit, since)
        lots = []
        for pointer in pointers:
            body = self.part(pointer.p, lock=False).all("lot").get(pointer.id)
            lot = None if body is None else _dec_lot(pointer.id, body)
            if lot is not None and not lot.pending and lot.expires_at is not None and lot.expires_at <= when:
                lots.append(lot)
            else:
                self.stale.append(("lot", pointer))
        lots.sort(key=lambda lot: (lot.expires_at, lot.created_at, lot.lot_id))
        if len(pointers) < limit:
            return lots, None
        return lots, (pointers[-1].at, pointers[-1].p, pointers[-1].id)

    def pending_due_by(self, when: datetime, limit: int) -> list[Lot]:
        def due(body: str) -> bool:
            lot = _dec_lot("", body)
            return lot.pending and not lot.pending_review and lot.release_at is not None and lot.release_at <= when

        lots = [_dec_lot(i, b) for i, b in self._due_ids("release", "lot", when, limit, due)]
        return sorted(lots, key=lambda lot: (lot.release_at, lot.lot_id))[:limit]

    def lot_totals(self) -> dict[tuple[str, str, bool], int]:
        totals: dict[tuple[str, str, bool], int] = defaultdict(int)
        for part in self.scan():
            for i, b in part.all("lot").items():
                lot = _dec_lot(i, b)
                totals[(lot.member_id, lot.unit, lot.pending)] += lot.remaining_points
        return dict(totals)

    def lots_out_of_bounds(self) -> list[Lot]:
        """Open lots (read with every partition) and the live closed ones (one more read per
        partition: a lot taken below zero is filed as closed); archived closed lots are not read."""
        lots = [
            _dec_lot(i, b) for part in self.scan() for kind in ("lot", "lot_closed") for i, b in part.all(kind).items()
        ]
        return sorted((lot for lot in lots if not 0 <= lot.remaining_points <= lot.original_points),
                      key=lambda lot: lot.lot_id)  # fmt: skip

    def review_held_lots(self) -> list[Lot]:
        lots = [_dec_lot(i, b) for part in self.scan() for i, b in part.all("lot").items()]
        return sorted((lot for lot in lots if lot.pending and lot.pending_review and lot.remaining_points > 0),
                      key=lambda lot: lot.lot_id)  # fmt: skip

    # Holds: placed ones in 'hold', settled ones in 'hold_done' -----------------------------

    def add_hold(self, hold: Hold) -> None:
        part = self.member(hold.member_id)
        placed = hold.status == HoldStatus.PLACED
        self.put_owned(part, "hold" if placed else "hold_done", hold.hold_id, _enc_hold(hold))
        part.delete("hold_done" if placed else "hold", hold.hold_id)

    def get_hold(self, hold_id: str) -> Hold | None:
        p = self.owner(hold_id)
        if p is None:
            return None
        body = self.part(p).get("hold", hold_id)
        if body is None:
            found = self.owned(hold_id, "hold_done")
            body = None if found is None else found[1]
        return None if body is None else _dec_hold(hold_id, body)

    def set_hold_status(self, hold_id: str, status: HoldStatus, captured_points: int) -> None:
        hold = self.get_hold(hold_id)
        if hold is None:
            return
        self.add_hold(replace(hold, status=status, captured_points=captured_points))

    def holds_due_by(self, when: datetime, limit: int) -> list[Hold]:
        def due(body: str) -> bool:
            hold = _dec_hold("", body)
            return not hold.saga_id and hold.expires_at <= when

        holds = [_dec_hold(i, b) for i, b in self._due_ids("hold", "hold", when, limit, due)]
        return sorted(holds, key=lambda h: (h.expires_at, h.hold_id))[:limit]

    def placed_hold_totals(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for part in self.scan():
            for i, b in part.all("hold").items():
                hold = _dec_hold(i, b)
                totals[f"{hold.member_id}:{hold.unit}"] += hold.points
        return dict(totals)

    def placed_holds(self) -> list[Hold]:
        holds = [_dec_hold(i, b) for part in self.scan() for i, b in part.all("hold").items()]
        return sorted(holds, key=lambda h: (h.expires_at, h.hold_id))

    def placed_holds_of(self, member_id: str) -> list[Hold]:
        return [_dec_hold(i, b) for i, b in self.member(member_id).all("hold").items()]

    # Outbox: unsent rows in 'outbox', sent ones in 'sent' ----------------------------------

    def add_outbox(self, event_id: str, member_id: str, payload_json: str, at: datetime) -> None:
        part = self.member(member_id)
        part.put("outbox", f"{part.next_seq():020d}", _dumps([event_id, member_id, payload_json, to_us(at)]))

    def _unsent(self, limit: int) -> list[tuple[Pointer, list[Any]]]:
        """Unsent events in sequence order. A pointer whose event is not there (its unit has
        not committed yet, or never will) holds back that member's later events only: those
        do not count toward `limit`, and reading goes on past them, so a page is empty only
        when no event can be relayed (the relay stops at an empty page)."""
        rows: list[tuple[Pointer, list[Any]]] = []
        blocked: set[str] = set()
        after: tuple[int, str, str] | None = None
        while len(rows) < limit:
            wanted = limit - len(rows)
            pointers = self.store.queue_after(self.shard, "outbox", 2**62, wanted, after)
            for pointer in pointers:
                if pointer.p in blocked:
                    continue
                found = self.store.q("row", (self.store.ledger, pointer.p, "outbox", pointer.id)).one()
                if found is None:
                    blocked.add(pointer.p)
                    self.stale.append(("outbox", pointer))
                else:
                    rows.append((pointer, json.loads(found.body)))
            if len(pointers) < wanted:
                break
            after = (pointers[-1].at, pointers[-1].p, pointers[-1].id)
        return rows

    def unrelayed_outbox(self, limit: int) -> list[OutboxRow]:
        rows = self._unsent(limit)
        self.store.remember_pointers(self.shard, [(pointer, _dumps(r)) for pointer, r in rows])
        return [OutboxRow(pointer.at, r[0], r[1], r[2]) for pointer, r in rows]

    def mark_relayed(self, seqs: Iterable[int], at: datetime) -> None:
        """Sent events move to 'sent' with plain writes at commit: no posting reads them, so
        marking them neither bumps the member's version nor contends with postings."""
        for seq in dict.fromkeys(seqs):
            self.relayed += [(pointer, to_us(at)) for pointer in self.store.pointers_of(self.shard, seq)]

    def outbox_backlog(self) -> int:
        return len(self._unsent(100_000))

    # Sagas -----------------------------------------------------------------------------------

    def add_saga(self, saga: SagaRecord) -> None:
        self.put_owned(self.member(saga.source_member), "saga", saga.saga_id, _enc_saga(saga))

    def get_saga(self, saga_id: str) -> SagaRecord | None:
        found = self.owned(saga_id, "saga")
        return None if found is None else _dec_saga(saga_id, found[1])

    def set_saga_state(self, saga_id: str, state: SagaState, at: datetime) -> None:
        found = self.owned(saga_id, "saga")
        if found is not None:
            saga = _dec_saga(saga_id, found[1])
            saga.state, saga.updated_at = state, at
            found[0].put("saga", saga_id, _enc_saga(saga))

    def open_sagas(self) -> list[SagaRecord]:
        sagas = [_dec_saga(i, b) for part in self.scan("due") for i, b in part.all("saga").items()]
        return sorted((s for s in sagas if s.state == SagaState.HELD), key=lambda s: (s.created_at, s.saga_id))

    # Member state, purchases, reviews ---------------------------------------------------------

    def get_member_state(self, member_id: str) -> str | None:
        return self.member(member_id).get("state", "")

    def put_member_state(self, member_id: str, state_json: str) -> None:
        self.member(member_id).put("state", "", state_json)

    def set_tier_due(self, member_id: str, due: datetime | None) -> None:
        part = self.member(member_id)
        if due is None:
            part.delete("tier_due", "")
        else:
            part.put("tier_due", "", str(to_us(due)))

    def member_ids_after(self, after: str, limit: int) -> list[str]:
        rows = self.store.q("members_after", (self.store.ledger, self.shard, self.pkey(after) if after else "", limit))
        return [m for r in rows if (m := r.p.split("/", 1)[1]) != NO_MEMBER]

    def get_meta(self, key: str) -> str | None:
        """Written at once, not staged with the unit: a job's own bookkeeping, idempotent."""
        row = self.store.q("meta_get", (self.store.ledger, f"{key}:{self.shard}")).one()
        return None if row is None else str(row.v)

    def put_meta(self, key: str, value: str) -> None:
        self.store.q("meta_put", (self.store.ledger, f"{key}:{self.shard}", value))

    def tiers_due_by(self, when: datetime, limit: int) -> list[str]:
        """A pointer is due while its member's row still names its time; one the member's due
        moved away from is stale (the move wrote a pointer of its own)."""

        def due(pointer: Pointer) -> tuple[int, str] | None:
            body = self.part(pointer.p, lock=False).get("tier_due", "")
            return (pointer.at, pointer.p.split("/", 1)[1]) if body is not None and int(body) == pointer.at else None

        return [member_id for _, member_id in sorted(set(self._walk_due("tier", when, limit, due)))[:limit]]

    def put_purchase(
        self, purchase_id: str, member_id: str, status: str, receipt_time: datetime, body_json: str,
        channel: str, store_id: str,
    ) -> None:  # fmt: skip
        part = self.member(member_id)
        at = to_us(receipt_time)
        if not part.known("purchase", purchase_id):  # a receipt's channel, store and time never change
            part.listed.append((channel, store_id, at, purchase_id))
        self.put_owned(part, "purchase", purchase_id, _dumps([status, body_json, at]))
        # Waiting purchases also get a small marker row: the retry job and the per-member
        # count read those, not every purchase the member ever made.
        if status == "PENDING_ACCRUAL":
            part.put("wait", purchase_id, str(to_us(receipt_time)))
        else:
            part.delete("wait", purchase_id)

    def get_purchase(self, purchase_id: str) -> tuple[str, str] | None:
        found = self.owned(purchase_id, "purchase")
        if found is None:
            return None
        status, body = json.loads(found[1])[:2]
        return str(status), str(body)

    def waiting_purchases(self, limit: int) -> list[tuple[str, str]]:
        waiting = [(int(b), i, part.p.partition("/")[2]) for part in self.scan("due")
                   for i, b in part.all("wait").items()]  # fmt: skip
        return [(pid, member) for _, pid, member in sorted(waiting)[:limit]]

    def list_purchases(
        self, channel: str, store_id: str, start: datetime, end: datetime, after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[tuple[datetime, str, str]]:  # fmt: skip
        """Walks the shard's purchase_days buckets from the cursor. A row whose purchase is absent
        (its unit failed after the row went in) is skipped.

        Buckets are read a few at once, twice as many each time the last ones came back short
        (up to LISTING_AHEAD): a quiet channel's month is 744 hourly buckets, and one query at a
        time made a page of it 744 round trips; a busy one fills a page from its first bucket."""
        hi = to_us(end)
        since = max((to_us(after[0]), after[1]) if after else (0, ""), (to_us(start), ""))
        bucket, last = listing_bucket(store_id, since[0]), listing_bucket(store_id, hi - 1)
        found: list[tuple[datetime, str, str]] = []
        ahead = 1
        while len(found) < limit and bucket <= last:
            wanted = limit - len(found)
            span = range(bucket, min(bucket + ahead, last + 1))
            pages = self.store.rows_many([("listing", (self.store.ledger, self.shard, channel, store_id, b, *since, hi,
                                                       wanted)) for b in span])  # fmt: skip
            for b, rows in zip(span, pages, strict=True):
                room = limit - len(found)
                more = len(rows) == wanted or len(rows) > room  # rows left unread in this bucket
                rows = rows[:room]
                for r, body in zip(rows, self.store.bodies(self.shard, "purchase", rows), strict=True):
                    if body is not None:
                        found.append((from_us(r.at), r.id, str(json.loads(body)[1])))
                if rows:
                    since = (rows[-1].at, rows[-1].id)
                bucket = b
                if more or len(found) >= limit:
                    break  # this bucket may hold more (a skipped row left room): read on from its last row
                bucket = b + 1
            else:
                ahead = min(ahead * 2, LISTING_AHEAD)
        return found

    def member_waiting_purchases(self, member_id: str) -> int:
        return len(self.member(member_id).all("wait"))

    def put_review(self, review_id: str, member_id: str, status: str, created_at: datetime, body_json: str) -> None:
        self.put_owned(self.member(member_id), "review", review_id,
                       _dumps([member_id, status, to_us(created_at), body_json]))  # fmt: skip

    def get_review(self, review_id: str) -> str | None:
        found = self.owned(review_id, "review")
        return None if found is None else str(json.loads(found[1])[3])

    def list_reviews(
        self, status: str, member_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[tuple[datetime, str, str]]:
        """A member's from their partition; the shard's from review_days, unless the shard has
        reviews from before that index that `backfill` has not listed yet: then from a scan of
        every member, as before (slow, but it misses none)."""
        since = (to_us(after[0]), after[1]) if after else (-1, "")
        if not member_id and self.store.reviews_indexed(self.shard):
            return [(from_us(at), rid, body) for at, rid, body in self._indexed_reviews(status, since, limit)]
        parts = [self.member(member_id)] if member_id else self.scan()
        found = []
        for part in parts:
            reviews = part.all("review") if status == "OPEN" else self.with_history(part, "review")
            for review_id, body in reviews.items():
                r = json.loads(body)
                if r[1] == status and (r[2], review_id) > since:
                    found.append((r[2], review_id, r[3]))
        found.sort()
        return [(from_us(at), rid, body) for at, rid, body in found[:limit]]

    def _indexed_reviews(self, status: str, since: tuple[int, str], limit: int) -> list[tuple[int, str, str]]:
        """Walks the status's days from the cursor, reading each row's review (live, else
        archived) for its body. A row whose review is absent or now has another status (its
        unit never committed, or a decision committed and the old row's delete did not) is
        skipped, reading on so the page stays full, and deleted once it is sure to stay so.

        Days are read a few at once, twice as many each time the last ones came back short
        (up to LISTING_AHEAD), as purchase listings do: decided reviews can be one a day."""
        s = self.store
        days = iter(s.q("review_buckets", (s.ledger, self.shard, status, review_bucket(since[0]))))
        queue: list[Any] = []  # days still to read, oldest first
        found: list[tuple[int, str, str]] = []
        stale: list[tuple[int, Any]] = []  # (bucket, row)
        empty: list[Any] = []  # days read from their start and found without a row
        ahead = 1
        while len(found) < limit:
            while len(queue) < ahead and (day := next(days, None)) is not None:
                queue.append(day)
            if not queue:
                break
            wanted, start = limit - len(found), since
            span = queue[:ahead]
            pages = s.rows_many(
                [("review_rows", (s.ledger, self.shard, status, d.bucket, *start, wanted)) for d in span]
            )
            for day, rows in zip(span, pages, strict=True):
                room = limit - len(found)
                more = len(rows) == wanted  # this day may hold rows past these
                if len(rows) > room:
                    rows, more = rows[:room], True
                for r, body in zip(rows, s.bodies(self.shard, "review", rows), strict=True):
                    listed = _review_listed(body, status, r.at)
                    if listed is None:
                        stale.append((day.bucket, r))
                    else:
                        found.append((r.at, r.id, listed))
                if rows:
                    since = (rows[-1].at, rows[-1].id)
                if more:
                    break  # read on from this day's last row
                queue.pop(0)
                if not rows and start[0] < day.bucket * DAY_US:
                    empty.append(day)
            else:
                ahead = min(ahead * 2, LISTING_AHEAD)
        s.prune_reviews(self.shard, status, stale, empty)
        return found

    def purge_before(
        self, idempotency_before: datetime, outbox_before: datetime, resume: str = "", limit: int = PURGE_SLICE
    ) -> tuple[int, str]:
        """Nothing to do: idempotency records, their owner rows and sent events are written with
        the retention as their TTL, so Cassandra drops them itself. A pass here would read every
        member partition of the shard every time (tests/cassandra/test_retention.py)."""
        return 0, ""

    # Commit ------------------------------------------------------------------------------------

    def commit(self) -> None:
        """Side tables first (harmless alone), then one conditional batch per partition."""
        if self.idem:
            written = sorted(p for p, part in self.parts.items() if part.staged and not p.endswith("/" + NO_MEMBER))
            home = self.part(written[-1] if written else self.pkey(""))
            for id_, rec in self.idem.items():
                # Inserted IF NOT EXISTS in the same conditional batch: a concurrent unit with
                # the same key that committed first makes this one run again (and replay).
                home.fresh.add(("idem", id_))
                home.expiring.add(("idem", id_))
                self.put_owned(home, "idem", id_, _dumps([rec.operation, rec.fingerprint, rec.result_json,
                                                          to_us(rec.created_at)]))  # fmt: skip
        self.store.settle_relayed(self.shard, self.relayed)
        self.store.prune_queue(self.shard, self.stale)
        dirty = [part for _, part in sorted(self.parts.items()) if part.staged]
        if not dirty:
            return
        # The partition holding the idempotency record goes last: if an earlier one fails
        # the whole unit is simply run again, and a retry by the caller finds no result yet.
        home_p = self.new_owners.get(next(iter(self.idem), ""), "")
        dirty.sort(key=lambda part: part.p == home_p)
        for part in dirty:
            # Each partition's pointers just before its own batch, so none is older than the
            # pruning grace period when its rows commit, however long a many-member job runs.
            owners = {o: p for o, p in self.new_owners.items() if p == part.p}
            pointed = self.store.prepare_side_tables(self.shard, [part], owners)
            try:
                self.store.commit_partition(part)
            except Conflict:
                # Not applied: its event pointers point at nothing, and would hold this member's
                # later events back for QUEUE_GRACE_US. The next attempt writes its own.
                self.store.withdraw_pointers(self.shard, part, pointed)
                raise
            self.store.unlist_reviews(self.shard, part)


def _pointers(part: _Part) -> list[tuple[str, int, str]]:
    """(queue, at, id) for staged rows that someone must act on at a time."""
    out = []
    for (kind, id_), body in part.staged.items():
        if body is None:
            continue
        if kind == "outbox":
            out.append(("outbox", int(id_), id_))
        elif kind == "lot":
            lot = _dec_lot(id_, body)
            if lot.pending and lot.release_at is not None and not lot.pending_review:
                out.append(("release", to_us(lot.release_at), id_))
            elif not lot.pending and lot.expires_at is not None:
                out.append(("lot", to_us(lot.expires_at), id_))
        elif kind == "hold":
            hold = _dec_hold(id_, body)
            if not hold.saga_id:
                out.append(("hold", to_us(hold.expires_at), id_))
        elif kind == "tier_due":
            out.append(("tier", int(body), id_))
    return out


def _reviews(part: _Part) -> list[tuple[str, int, str, str | None]]:
    """(status, created µs, id, status before this unit or None) of the reviews it writes."""
    out = []
    for (kind, id_), body in part.staged.items():
        if kind == "review" and body is not None:
            before = part.committed(kind, id_)
            r = json.loads(body)
            out.append((str(r[1]), int(r[2]), id_, None if before is None else str(json.loads(before)[1])))
    return out


def _review_listed(body: str | None, status: str, at: int) -> str | None:
    """The review's own body if a review_days row of `status` at `at` lists it, else None."""
    r = None if body is None else json.loads(body)
    return str(r[3]) if r is not None and r[1] == status and r[2] == at else None


def _open(kind: str, body: str) -> bool:
    """Whether an indexed row is open work: a saga only while HELD (DONE ones stay as the
    saga's record, and must not keep the member in the 'due' index for ever)."""
    return kind != "saga" or _dec_saga("", body).state == SagaState.HELD


def _told_unwatched(state: Sequence[Any], watched: Sequence[Any]) -> bool:
    """A member state (its one row, if any) naming a tier told, of an active member's, with no
    tier_due row beside it: written before tiers were watched."""
    if not state or watched:
        return False
    body = json.loads(state[0].body)
    return bool(body.get("tier")) and not body.get("merged_into")


def _bucket(kind: str, at: int) -> int:
    """Events are queued by sequence (microseconds x SEQ_TAGS), timers by due time."""
    return (at // SEQ_TAGS if kind == "outbox" else at) // QUEUE_BUCKET_US[kind]


def _row_values(row: AccountRow) -> tuple[str, int, int, int, int]:
    return row.account, row.balance, row.reserved, row.lifetime_earned, row.version


def _spend_order(lot: Lot) -> tuple[bool, int, int, str]:
    return lot.expires_at is None, to_us(lot.expires_at) if lot.expires_at else 0, to_us(lot.created_at), lot.lot_id


def _member_values(ledger: str, member: Member) -> tuple[Any, ...]:
    return (ledger, member.member_id, member.status.value, json.dumps(member.profile, sort_keys=True),
            member.merged_into, to_us(member.created_at))  # fmt: skip


def _claim_day_rows(ledger: str, claims: dict[tuple[str, str], IdemRecord]) -> list[tuple[str, tuple[Any, ...]]]:
    """Retention's index rows of these claims: the same rows whoever writes them, and when."""
    days = sorted({to_us(rec.created_at) // DAY_US for rec in claims.values()})
    return [*(("claim_days_list_put", (ledger, day)) for day in days),
            *(("claim_day_put", (ledger, to_us(rec.created_at) // DAY_US, to_us(rec.created_at), ns, key))
              for (ns, key), rec in claims.items())]  # fmt: skip


class CassandraDirectoryTx:
    """Members, external ids and claims; writes are staged and applied when the unit returns.

    Claims and external ids are lightweight-transaction inserts (`IF NOT EXISTS`): if one
    loses to a concurrent writer the ones already applied are taken back and the unit runs
    again (a claim) or fails (an external id that belongs to someone else).
    """

    def __init__(self, store: CassandraLedgerStore, known: dict[tuple[str, str], IdemRecord], *,
                 serial_reads: bool = False) -> None:  # fmt: skip
        self.store = store
        self.serial_reads = serial_reads  # members read at serial consistency (write_directory_alone)
        self.ledger = store.ledger
        # Claims an earlier attempt of this unit found taken (their conditional insert said so).
        self.known = known
        self.claims: dict[tuple[str, str], IdemRecord] = {}
        self.ext_claims: list[tuple[ExternalId, str, bool]] = []
        self.writes: list[tuple[str, tuple[Any, ...]]] = []
        self.blocks: list[tuple[Any, ...]] = []  # conditional status changes (set_blocked)
        self.pending: list[Member] = []  # members this unit creates
        self.finishing: list[Member] = []  # pending rows of earlier releases this unit finishes
        self.results: dict[tuple[str, str], str] = {}  # claims naming a member this unit creates
        self.checked: set[tuple[str, str]] = set()  # optimistic claims read back already
        # External ids found claimed for a member nothing can finish any more
        # (`external_id_owner`), by (kind, value): freed at commit before they are claimed.
        self.abandoned: dict[tuple[str, str], str] = {}

    def claim(self, namespace: str, key: str, operation: str, fingerprint: str, at: datetime) -> IdemRecord | None:
        """Optimistic: assumes the key is free; the conditional insert at commit decides, and a
        key found taken makes the unit run again, this time answering with the existing claim."""
        found = self.known.get((namespace, key)) or self.claims.get((namespace, key))
        if found is not None:
            return found
        self.claims[(namespace, key)] = IdemRecord(operation, fingerprint, "", at)
        return None

    def claim_many(self, claims: Sequence[tuple[str, str, str, str]], at: datetime) -> list[IdemRecord | None]:
        return [self.claim(namespace, key, operation, fp, at) for namespace, key, operation, fp in claims]

    def complete_claim(self, namespace: str, key: str, result_json: str) -> None:
        self.writes.append(("claim_result", (result_json, self.ledger, namespace, key)))

    def release_claim(self, namespace: str, key: str, fingerprint: str) -> None:
        """Conditional, so a claim another request holds (or one with a result) stays; its day
        index row stays too, and the purge drops it (its claim is gone)."""
        self.writes.append(("claim_release", (self.ledger, namespace, key, fingerprint, "")))

    def merged_members(self) -> list[tuple[str, str]]:
        return self._confirmed([(r.source, r.target) for r in self.store.q("merges", (self.ledger,))])

    def merged_into(self, target: str) -> list[str]:
        pairs = [(r.source, r.target) for r in self.store.q("merges", (self.ledger,)) if r.target == target]
        return [source for source, _ in self._confirmed(pairs)]

    def _confirmed(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Of (source, target) rows of the ledger's `merges` partition (merges are few: one per
        two accounts of a person), those its source's member row confirms. The row is written
        before the conditional status write, so a merge refused there leaves one that never
        happened: taken for a merge, start-up recovery swept an active member into no one, and
        erasing the target erased the source."""
        return [(source, target) for source, target in pairs
                if (found := self.get_member(source)) is not None and found.merged_into == target]  # fmt: skip

    def add_member(self, member: Member) -> None:
        """Written at commit: its id in the claim completed with it (in the claim's own insert),
        then its external ids claimed, then their member_ext rows, then the member row
        `IF NOT EXISTS` (see `_write_members`)."""
        self._stage_member(member)
        self.pending.append(member)

    def _stage_member(self, member: Member) -> None:
        for ext in member.external_ids:
            owner = self.external_id_owner(ext)
            if owner is not None and owner != member.member_id:
                raise ExternalIdTaken(f"{ext.kind} {ext.value} already belongs to {owner}")
            self.ext_claims.append((ext, member.member_id, False))

    def get_member(self, member_id: str) -> Member | None:
        """A pending member (written by releases before 2026-12-06, when an attempt stopped
        between its steps) is nobody's yet, except the result of a claim this unit holds: a
        retry with the same key gets it and finishes it."""
        row = self.store.q("member_get", (self.ledger, member_id), serial=self.serial_reads).one()
        if row is None:
            return None
        status = str(row.status)
        if status == GIVEN_UP_MEMBER:
            return None
        pending = status.startswith(PENDING_MEMBER)
        if pending and member_id not in {rec.result_json for rec in self.known.values()}:
            return None
        ids = sorted((r.kind, r.value, r.alias) for r in self.store.q("ext_of_member", (self.ledger, member_id)))
        member = Member(
            member_id=member_id,
            status=MemberStatus(status.removeprefix(PENDING_MEMBER)),
            external_ids=tuple(ExternalId(k, v) for k, v, a in ids if not a),
            aliases=tuple(ExternalId(k, v) for k, v, a in ids if a),
            profile=json.loads(row.profile),
            merged_into=row.merged_into,
            created_at=from_us(row.created_us),
        )
        if pending:
            self._stage_member(member)
            self.finishing.append(member)
        return member

    def find_member_id(self, ext: ExternalId) -> str | None:
        row = self.store.q("ext_get", (self.ledger, ext.kind, ext.value)).one()
        return None if row is None else str(row.member_id)

    def external_id_owner(self, ext: ExternalId) -> str | None:
        """None also for an id claimed for a member that never got its row (its unit stopped
        and was not retried), once the claim that could finish that member is past retention:
        nobody can finish it, and the id would otherwise stay locked for good."""
        row = self.store.q("ext_get", (self.ledger, ext.kind, ext.value)).one()
        if row is None:
            return None
        self._check_claims()
        owner = str(row.member_id)
        if self._abandoned(owner, row.wt):
            self.abandoned[(ext.kind, ext.value)] = owner
            return None
        return owner

    def _abandoned(self, member_id: str, claimed_us: int | None) -> bool:
        """The claim of an external id precedes its member row, and the member's own claim
        precedes both: an id claimed longer ago than retention (and a margin) for a member
        without a row (or with a pending one) is one no retry or replay will ever finish."""
        row = self.store.q("member_get", (self.ledger, member_id)).one()
        if row is not None and str(row.status) == GIVEN_UP_MEMBER:
            return True  # its signup gave up, and no attempt can write its row any more
        if claimed_us is None or time.time_ns() // 1000 - claimed_us <= self.store.abandoned_after_us:
            return False
        return row is None or str(row.status).startswith(PENDING_MEMBER)

    def _check_claims(self) -> None:
        """An external id found taken may be taken by an earlier attempt of this very request.
        The optimistic claims are read now, and one found taken runs the unit again with it, as
        the conditional insert at commit would, so the unit finishes that attempt instead of
        reporting the id as someone else's."""
        unchecked = [k for k in self.claims if k not in self.checked]
        self.checked.update(unchecked)
        rows = self.store.run_many([("claim_get", (self.ledger, ns, key)) for ns, key in unchecked])
        taken = [(k, r) for k, r in zip(unchecked, rows, strict=True) if r is not None]
        for k, r in taken:
            self.known[k] = IdemRecord(r.operation, r.fingerprint, r.result or "", from_us(r.created_us))
        if taken:
            raise Conflict(f"idempotency key {taken[0][0][1]!r} was claimed before")

    def set_status(self, member_id: str, status: MemberStatus, merged_into: str = "") -> None:
        self.writes.append(("member_status", (status.value, merged_into, self.ledger, member_id)))
        if status == MemberStatus.MERGED:
            self.writes.append(("merge_put", (self.ledger, member_id, merged_into)))

    def set_blocked(self, member_id: str, blocked: bool) -> None:
        status = MemberStatus.BLOCKED if blocked else MemberStatus.ACTIVE
        self.blocks.append((status.value, self.ledger, member_id))

    def move_external_ids_as_aliases(self, source: str, target: str) -> None:
        for r in self.store.q("ext_of_member", (self.ledger, source)):
            self.writes.append(("ext_put", (self.ledger, r.kind, r.value, target, True)))
            self.writes.append(("ext_member_put", (self.ledger, target, r.kind, r.value, True)))
            self.writes.append(("ext_member_del", (self.ledger, source, r.kind, r.value)))

    def erase(self, member_id: str) -> None:
        self.writes.append(("member_erase", (MemberStatus.ERASED.value, self.ledger, member_id)))
        for r in self.store.q("ext_of_member", (self.ledger, member_id)):
            self.writes.append(("ext_del", (self.ledger, r.kind, r.value)))
            self.writes.append(("ext_member_del", (self.ledger, member_id, r.kind, r.value)))

    def purge_claims_before(self, when: datetime, limit: int = PURGE_SLICE) -> int:
        """All of them in one pass, whatever `limit` (the unit runs on the driver's threads), a
        page at a time from where the last page stopped: a watermark in `meta`, moved after each
        chunk of deletes, also for the next pass if this one fails. Reading a day's index again
        from its start would read the tombstones of every row already deleted; at 120,000 claims
        a day that read fails (READ_TOO_MANY_TOMBSTONES) until compaction. At most
        CLAIM_PURGE_IN_FLIGHT deletes are in flight, as in `backfill`. Returns the claims deleted."""
        s = self.store
        cut = to_us(when)
        last_day = cut // DAY_US
        found = s.q("meta_get", (self.ledger, CLAIM_PURGE_MARK)).one()
        mark: list[Any] = [-1, -1, "", ""] if found is None else json.loads(found.v)
        purged = 0
        for day in [r.day for r in s.q("claim_days_list", (self.ledger,))]:
            if day > last_day:
                break
            while day >= mark[0]:
                start = tuple(mark[1:]) if day == mark[0] else (-1, "", "")
                rows = list(s.q("claim_day_rows", (self.ledger, day, *start, cut, CLAIM_PURGE_PAGE)))
                for at in range(0, len(rows), CLAIM_PURGE_IN_FLIGHT // 2):
                    chunk = rows[at : at + CLAIM_PURGE_IN_FLIGHT // 2]
                    purged += self._purge_indexed(day, chunk)
                    last = chunk[-1]
                    mark = [day, last.created_us, last.namespace, last.key]
                    s.q("meta_put", (self.ledger, CLAIM_PURGE_MARK, _dumps(mark)))
                if len(rows) < CLAIM_PURGE_PAGE:
                    break
            # A day before the cut's is done once read to its end (or passed by the mark).
            if day < last_day:
                s.q("claim_days_list_del", (self.ledger, day))
        return purged

    def _purge_indexed(self, day: int, rows: Sequence[Any]) -> int:
        """Deletes the index rows and the claims they index. A claim is the row's only while its
        created_us is the row's: a key claimed again after its unit gave it up (or after an
        earlier purge) has a newer claim, kept until its own row's day. The delete carries the
        claim's own write time, so a claim of the key made after this read survives it."""
        s = self.store
        found = s.run_many([("claim_stamp", (self.ledger, r.namespace, r.key)) for r in rows])
        doomed = [(r, max(t for t in (c.wt, c.result_wt) if t is not None))
                  for r, c in zip(rows, found, strict=True)
                  if c is not None and c.created_us == r.created_us and c.wt is not None]  # fmt: skip
        s.run_many([*(("claim_del_at", (written, self.ledger, r.namespace, r.key)) for r, written in doomed),
                    *(("claim_day_del", (self.ledger, day, r.created_us, r.namespace, r.key)) for r in rows)])  # fmt: skip
        return len(doomed)

    def commit(self) -> None:
        s = self.store
        created = {m.member_id for m in self.pending}
        completed = {(p[2], p[3]): str(p[0]) for name, p in self.writes if name == "claim_result"}
        # A new member's id goes into its claim in the claim's own insert: a retry that finds the
        # claim taken, however far the first attempt got, finishes that same member.
        results = {k: completed[k] for k in self.claims if completed.get(k) in created}
        self.results = results
        claim_keys = list(self.claims)
        # The claims' day index before the claims, also of the claims an earlier attempt found
        # taken (the same rows again): a claim never exists without the row retention finds it
        # by, whichever write fails and whether or not anyone retries. An index row whose claim
        # never applied is skipped and dropped by the purge (its claim is not the row's).
        s.run_many(_claim_day_rows(self.ledger, {**self.known, **self.claims}))
        outcomes = s.run_many([("claim_put", (self.ledger, ns, key, rec.operation, rec.fingerprint,
                                              results.get((ns, key), ""), to_us(rec.created_at)))
                               for (ns, key), rec in self.claims.items()])  # fmt: skip
        lost = [(k, row) for k, row in zip(claim_keys, outcomes, strict=True) if not row.applied]
        if lost:
            won = [k for k, row in zip(claim_keys, outcomes, strict=True) if row.applied]
            s.run_many([("claim_del", (self.ledger, ns, key)) for ns, key in won])
            for k, row in lost:
                self.known[k] = IdemRecord(row.operation, row.fingerprint, row.result or "", from_us(row.created_us))
            raise Conflict(f"idempotency key {lost[0][0][1]!r} was claimed before")
        # Before the claim's result: a member merged or erased since the unit read it keeps
        # that status (the condition), and the unit runs again to find it so and refuse.
        if not all(row.applied for row in s.run_many([("member_block", p) for p in self.blocks])):
            raise Conflict("a member was merged or erased while its block or unblock ran")
        early, late = self._split_results(results, created)
        # External ids taken over from an abandoned member are freed (if it still has them)
        # before any is claimed.
        claiming = {(e.kind, e.value) for e, _, _ in self.ext_claims}
        first = [("ext_free", (self.ledger, kind, value, owner))
                 for (kind, value), owner in self.abandoned.items() if (kind, value) in claiming]  # fmt: skip
        s.run_many(first + early)
        ext_out = s.run_many([("ext_claim", (self.ledger, e.kind, e.value, m, a)) for e, m, a in self.ext_claims])
        taken = [(e, row) for (e, m, _), row in zip(self.ext_claims, ext_out, strict=True)
                 if not row.applied and row.member_id != m]  # fmt: skip
        if taken:
            self._give_up(created, [row.applied for row in ext_out])
            ext, row = taken[0]
            raise ExternalIdTaken(f"{ext.kind} {ext.value} already belongs to {row.member_id}")
        self._write_members()
        for phase in _phases(late):
            s.run_many(phase)

    def _give_up(self, created: set[str], applied: Sequence[bool]) -> None:
        """A new member's row is first taken for good (`GIVEN_UP_MEMBER`, `IF NOT EXISTS`): a
        retry that already finished the member keeps it, with its claim and external ids, and
        this unit runs again to answer with it; one still under way can no longer finish it.
        Then everything this unit claimed goes, its claims' day index rows too (a row left
        behind would have retention delete a later claim of the same key before its time)."""
        s = self.store
        ids = sorted(created)
        marks = s.run_many(
            [("member_give_up", (self.ledger, m, GIVEN_UP_MEMBER, self.store.given_up_ttl)) for m in ids]
        )
        finished = [m for m, row in zip(ids, marks, strict=True)
                    if not row.applied and str(row.status) != GIVEN_UP_MEMBER]  # fmt: skip
        if finished:
            self._answer_stored(set(finished))
        own = [e for (e, m, _), done in zip(self.ext_claims, applied, strict=True) if done and m not in created]
        self._release(created, self.claims, [("ext_del", (self.ledger, e.kind, e.value)) for e in own])

    def _release(self, dead: set[str], claims: dict[tuple[str, str], IdemRecord],
                 also: Sequence[tuple[str, tuple[Any, ...]]] = ()) -> None:  # fmt: skip
        """Frees given-up members and gives these claims back: an external id or claim only
        while it still names the given-up member (any attempt may have written it; another
        member's stays), other claims whatever they hold. A claim's index row goes with it,
        not when its conditional delete found another claim there: that claim may have been
        made in the same microsecond, with the very same index row."""
        s = self.store
        keys = list(claims)
        named = [self.results.get(k) or claims[k].result_json for k in keys]
        out = s.run_many([("claim_free", (self.ledger, ns, key, m)) if m in dead else ("claim_del", (self.ledger, ns, key))
                          for (ns, key), m in zip(keys, named, strict=True)]
                         + [("ext_free", (self.ledger, e.kind, e.value, m)) for e, m, _ in self.ext_claims if m in dead]
                         + list(also))  # fmt: skip
        gone = [k for k, m, row in zip(keys, named, out[: len(keys)], strict=True) if m not in dead or row.applied]
        s.run_many([("claim_day_del", (self.ledger, to_us(claims[k].created_at) // DAY_US,
                                       to_us(claims[k].created_at), *k)) for k in gone])  # fmt: skip

    def _answer_stored(self, ids: set[str]) -> None:
        """Another attempt finished these members: the unit runs again and answers with them."""
        for k, member_id in self.results.items():
            if member_id in ids:
                rec = self.claims[k]
                self.known[k] = IdemRecord(rec.operation, rec.fingerprint, member_id, rec.created_at)
        raise Conflict(f"member {sorted(ids)[0]} was finished by another attempt")

    def _write_members(self) -> None:
        """A member's member_ext rows (invisible without its row) go out first, its row only
        once they all applied: a row never stands without an external id its retry would then
        not write. The row is inserted `IF NOT EXISTS`, and not tried at all when it is there
        already: another attempt of the same claim finished the member, and the client may have
        blocked or erased it since, which a late attempt must not undo."""
        s = self.store
        found = s.run_many([("member_get", (self.ledger, m.member_id)) for m in self.pending])
        fresh = [m for m, row in zip(self.pending, found, strict=True) if row is None]
        finished = [(m, row) for m, row in zip(self.pending, found, strict=True) if row is not None]
        s.run_many([("ext_member_put", (self.ledger, m.member_id, e.kind, e.value, False))
                    for m in [*fresh, *self.finishing] for e in m.external_ids])  # fmt: skip
        s.run_many([("member_finish", _member_values(self.ledger, m)) for m in self.finishing])
        put = s.run_many([("member_put", _member_values(self.ledger, m)) for m in fresh])
        finished += [(m, row) for m, row in zip(fresh, put, strict=True) if not row.applied]
        dead = {m.member_id for m, row in finished if str(row.status) == GIVEN_UP_MEMBER}
        if dead:
            # The attempt that named it gave it up; its give-back is done again here (it may have
            # stopped half way), and the unit runs again from a claim of its own.
            mine = {k: rec for k, rec in self.known.items() if rec.result_json in dead}
            self._release(dead, mine)
            for k in mine:
                del self.known[k]
            raise Conflict(f"member {sorted(dead)[0]} was given up by the attempt that named it")
        if finished:
            self._yield_to_finished(finished)

    def _yield_to_finished(self, finished: Sequence[tuple[Member, Any]]) -> None:
        """The member row stands as its finisher (and the client since) left it. An active or
        blocked member owns every external id of its signup (the finisher claimed them all
        before its row), so nothing goes; an erased or merged one owns none any more, so what
        this attempt claimed or wrote for it goes back (`IF member_id`: never an id claimed
        since by someone else). The unit then runs again and answers with the stored member."""
        gone = [m for m, row in finished if str(row.status) in (MemberStatus.ERASED, MemberStatus.MERGED)]
        self.store.run_many([call for m in gone for e in m.external_ids
                             for call in (("ext_free", (self.ledger, e.kind, e.value, m.member_id)),
                                          ("ext_member_del", (self.ledger, m.member_id, e.kind, e.value)))])  # fmt: skip
        self._answer_stored({m.member_id for m, _ in finished})

    def _split_results(
        self, results: dict[tuple[str, str], str], created: set[str]
    ) -> tuple[list[tuple[str, tuple[Any, ...]]], list[tuple[str, tuple[Any, ...]]]]:
        """The staged writes to run before the external ids are claimed (a new member's id
        into a claim made without it, by releases before 2026-12-06) and after; a result the
        claim holds already is not written again."""
        early: list[tuple[str, tuple[Any, ...]]] = []
        late: list[tuple[str, tuple[Any, ...]]] = []
        for name, params in self.writes:
            if name == "claim_result":
                result, key = str(params[0]), (params[2], params[3])
                known = self.known.get(key)
                if key in results or (known is not None and known.result_json == result):
                    continue
                if result in created:
                    early.append((name, params))
                    continue
            late.append((name, params))
        return early, late


# Staged directory writes that replace or undo a row another write of the same unit puts in
# place (a status naming a merge whose `merges` row must exist; a source's alias rows, gone once
# the target's are there) go after those writes; a claim's result, which makes a retry answer
# "done" without running the unit, goes after everything. Whichever write fails, a retry with
# the same key finds the unit unfinished and every row it reads to finish it.
_AFTER_THE_REST = frozenset({"member_status", "ext_member_del"})


def _phases(writes: Sequence[tuple[str, tuple[Any, ...]]]) -> list[list[tuple[str, tuple[Any, ...]]]]:
    first = [w for w in writes if w[0] not in _AFTER_THE_REST and w[0] != "claim_result"]
    second = [w for w in writes if w[0] in _AFTER_THE_REST]
    last = [w for w in writes if w[0] == "claim_result"]
    return [phase for phase in (first, second, last) if phase]


class CassandraLedgerStore:
    """LedgerStore on a Cassandra keyspace migrated by `pointmesh ledger migrate`.

    `ledger` names this ledger's rows inside the keyspace (every partition key starts with
    it), so one keyspace can hold separate ledgers — a staging copy, a second programme, or
    one per test.
    """

    def __init__(self, session: Any, keyspace: str, ledger: str, shards: int, *, workers: int = 32,
                 owner_cache: int = 200_000, cluster: Any = None,
                 retention: timedelta = timedelta(days=35)) -> None:  # fmt: skip
        self.session = session
        self._cluster = cluster  # shut down on close when given
        self.keyspace = check_keyspace(keyspace)
        self.ledger = ledger
        self._shards = shards
        # Seconds from the write, so a store's retention counts from when a row was written
        # (a posting's own time, give or take its unit's run); Cassandra allows at most 20 years.
        self.ttl = max(1, min(int(retention.total_seconds()), MAX_TTL_SECONDS))
        self.owner_ttl = min(self.ttl + OWNER_TTL_MARGIN_S, MAX_TTL_SECONDS)
        self.abandoned_after_us = (self.ttl + min(self.ttl, ABANDONED_MARGIN_S)) * 1_000_000
        # A given-up member's row outlives every claim that could name it.
        self.given_up_ttl = min(self.abandoned_after_us // 1_000_000, MAX_TTL_SECONDS)
        found = applied_version(session, keyspace)
        if found < LATEST:
            raise RuntimeError(
                f"Cassandra keyspace {keyspace!r} is at schema version {found}, this code needs {LATEST}:"
                " run `pointmesh ledger migrate`"
            )
        self._prepare()
        self._check_layout()  # writes through run_many, so after the statements
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cassandra-unit")
        self._locks = [threading.RLock() for _ in range(4096)]
        self._owners: dict[tuple[int, str], str] = {}
        self._owner_cache = owner_cache
        self._pointers: dict[tuple[int, int], list[tuple[Pointer, str]]] = {}
        self._announced: dict[tuple[int, str, int], float] = {}
        self._known_members: set[tuple[int, str]] = set()
        self._indexed: dict[tuple[int, str, str], float] = {}
        self._reviews_indexed: set[int] = set()  # shards whose reviews are all in review_days
        self._closed = False
        self._alone: dict[str, asyncio.Lock] = {}  # write_directory_alone: this process's queue per name

    # Statements ----------------------------------------------------------------------------

    def _prepare(self) -> None:
        from cassandra import ConsistencyLevel
        from cassandra.query import BatchStatement, BatchType

        ks = self.keyspace
        cql = {
            "head": f"SELECT version, seq FROM {ks}.book WHERE ledger=? AND p=? LIMIT 1",
            "live": f"SELECT kind, id, body, version, seq FROM {ks}.book WHERE ledger=? AND p=?"
                    f" AND kind IN ({', '.join(repr(k) for k in LIVE_KINDS)})",
            "head_serial": f"SELECT version, unit_id FROM {ks}.book WHERE ledger=? AND p=? LIMIT 1",
            "row": f"SELECT body FROM {ks}.book WHERE ledger=? AND p=? AND kind=? AND id=?",
            "listing": f"SELECT at, id, p FROM {ks}.purchase_days WHERE ledger=? AND shard=? AND channel=?"
                       " AND store_id=? AND bucket=? AND (at, id) > (?, ?) AND (at) < (?) LIMIT ?",
            "listing_put": f"INSERT INTO {ks}.purchase_days (ledger, shard, channel, store_id, bucket, at, id, p)"
                           " VALUES (?,?,?,?,?,?,?,?)",
            "kind_ttl": f"SELECT id, body, TTL(body) AS ttl FROM {ks}.book WHERE ledger=? AND p=? AND kind=?",
            "kind": f"SELECT id, body FROM {ks}.book WHERE ledger=? AND p=? AND kind=?",
            "kind_ids": f"SELECT id FROM {ks}.book WHERE ledger=? AND p=? AND kind=?",
            "entries": f"SELECT id, body FROM {ks}.book WHERE ledger=? AND p=? AND kind='entry' AND id>=? AND id<?"
                       " ORDER BY kind DESC, id DESC LIMIT ?",
            "cond": f"UPDATE {ks}.book SET version=?, seq=?, unit_id=? WHERE ledger=? AND p=? IF version=?",
            "put": f"INSERT INTO {ks}.book (ledger, p, kind, id, body) VALUES (?,?,?,?,?)",
            "put_new": f"INSERT INTO {ks}.book (ledger, p, kind, id, body) VALUES (?,?,?,?,?) IF NOT EXISTS",
            "put_expiring": f"INSERT INTO {ks}.book (ledger, p, kind, id, body) VALUES (?,?,?,?,?) USING TTL ?",
            "put_new_expiring": f"INSERT INTO {ks}.book (ledger, p, kind, id, body) VALUES (?,?,?,?,?)"
                                " IF NOT EXISTS USING TTL ?",
            "del": f"DELETE FROM {ks}.book WHERE ledger=? AND p=? AND kind=? AND id=?",
            "owner_get": f"SELECT p FROM {ks}.owners WHERE ledger=? AND shard=? AND id=?",
            "owner_month_get": f"SELECT month FROM {ks}.owners WHERE ledger=? AND shard=? AND id=?",
            "owner_month": f"UPDATE {ks}.owners SET month=? WHERE ledger=? AND shard=? AND id=?",
            "hist_put": f"INSERT INTO {ks}.book_history (ledger, p, month, kind, id, body) VALUES (?,?,?,?,?,?)",
            "hist_row": f"SELECT body FROM {ks}.book_history WHERE ledger=? AND p=? AND month=? AND kind=? AND id=?",
            "hist_kind": f"SELECT id, body FROM {ks}.book_history WHERE ledger=? AND p=? AND month=? AND kind=?",
            "hist_kind_ids": f"SELECT id FROM {ks}.book_history WHERE ledger=? AND p=? AND month=? AND kind=?",
            "hist_entries": f"SELECT id, body FROM {ks}.book_history WHERE ledger=? AND p=? AND month=?"
                            " AND kind='entry' AND id>=? AND id<? ORDER BY kind DESC, id DESC LIMIT ?",
            "owner_put": f"INSERT INTO {ks}.owners (ledger, shard, id, p) VALUES (?,?,?,?)",
            "owner_put_expiring": f"INSERT INTO {ks}.owners (ledger, shard, id, p) VALUES (?,?,?,?) USING TTL ?",
            "owner_del": f"DELETE FROM {ks}.owners WHERE ledger=? AND shard=? AND id=?",
            "members_put": f"INSERT INTO {ks}.shard_members (ledger, shard, p) VALUES (?,?,?)",
            "members": f"SELECT p FROM {ks}.shard_members WHERE ledger=? AND shard=?",
            "members_after": f"SELECT p FROM {ks}.shard_members WHERE ledger=? AND shard=? AND p>? LIMIT ?",
            "queue_put": f"INSERT INTO {ks}.queue (ledger, shard, kind, bucket, at, p, id, w) VALUES (?,?,?,?,?,?,?,?)"
                         " USING TIMESTAMP ?",
            "queue_read": f"SELECT at, p, id, writetime(w) AS wt FROM {ks}.queue WHERE ledger=? AND shard=? AND kind=?"
                          " AND bucket=? AND at<=? LIMIT ?",
            "queue_read_after": f"SELECT at, p, id, writetime(w) AS wt FROM {ks}.queue WHERE ledger=? AND shard=?"
                                " AND kind=? AND bucket=? AND (at, p, id) > (?, ?, ?) LIMIT ?",
            "queue_del": f"DELETE FROM {ks}.queue USING TIMESTAMP ? WHERE ledger=? AND shard=? AND kind=?"
                         " AND bucket=? AND at=? AND p=? AND id=?",
            "buckets_put": f"INSERT INTO {ks}.queue_buckets (ledger, shard, kind, bucket, w) VALUES (?,?,?,?,?)",
            "buckets": f"SELECT bucket, writetime(w) AS wt FROM {ks}.queue_buckets WHERE ledger=? AND shard=?"
                       " AND kind=? AND bucket<=?",
            "buckets_del": f"DELETE FROM {ks}.queue_buckets USING TIMESTAMP ? WHERE ledger=? AND shard=? AND kind=?"
                           " AND bucket=?",
            "sent_put": f"INSERT INTO {ks}.book (ledger, p, kind, id, body) VALUES (?,?,'sent',?,?) USING TTL ?",
            "index_put": f"INSERT INTO {ks}.shard_index (ledger, shard, kind, p, at) VALUES (?,?,?,?,?)",
            "index": f"SELECT p, writetime(at) AS wt FROM {ks}.shard_index WHERE ledger=? AND shard=? AND kind=?",
            "index_del": f"DELETE FROM {ks}.shard_index USING TIMESTAMP ? WHERE ledger=? AND shard=? AND kind=?"
                         " AND p=?",
            "review_put": f"INSERT INTO {ks}.review_days (ledger, shard, status, bucket, at, id, p)"
                          " VALUES (?,?,?,?,?,?,?)",
            "review_rows": f"SELECT at, id, p, writetime(p) AS wt FROM {ks}.review_days WHERE ledger=? AND shard=?"
                           " AND status=? AND bucket=? AND (at, id) > (?, ?) LIMIT ?",
            "review_del": f"DELETE FROM {ks}.review_days WHERE ledger=? AND shard=? AND status=? AND bucket=?"
                          " AND at=? AND id=?",
            "review_del_at": f"DELETE FROM {ks}.review_days USING TIMESTAMP ? WHERE ledger=? AND shard=?"
                             " AND status=? AND bucket=? AND at=? AND id=?",
            "review_bucket_put": f"INSERT INTO {ks}.review_buckets (ledger, shard, status, bucket, w)"
                                 " VALUES (?,?,?,?,?)",
            "review_buckets": f"SELECT bucket, writetime(w) AS wt FROM {ks}.review_buckets WHERE ledger=?"
                              " AND shard=? AND status=? AND bucket>=?",
            "review_bucket_del": f"DELETE FROM {ks}.review_buckets USING TIMESTAMP ? WHERE ledger=? AND shard=?"
                                 " AND status=? AND bucket=?",
            "meta_get": f"SELECT v FROM {ks}.meta WHERE ledger=? AND k=?",
            "meta_claim": f"INSERT INTO {ks}.meta (ledger, k, v) VALUES (?,?,?) IF NOT EXISTS",
            "meta_put": f"INSERT INTO {ks}.meta (ledger, k, v) VALUES (?,?,?)",
            "lease_take": f"INSERT INTO {ks}.meta (ledger, k, v) VALUES (?,?,?) IF NOT EXISTS USING TTL ?",
            "lease_give": f"DELETE FROM {ks}.meta WHERE ledger=? AND k=? IF v=?",
            "claim_put": f"INSERT INTO {ks}.claims (ledger, namespace, key, operation, fingerprint, result,"
                         " created_us) VALUES (?,?,?,?,?,?,?) IF NOT EXISTS",
            "claim_result": f"UPDATE {ks}.claims SET result=? WHERE ledger=? AND namespace=? AND key=?",
            "claim_del": f"DELETE FROM {ks}.claims WHERE ledger=? AND namespace=? AND key=?",
            "claim_free": f"DELETE FROM {ks}.claims WHERE ledger=? AND namespace=? AND key=? IF result=?",
            "claim_release": f"DELETE FROM {ks}.claims WHERE ledger=? AND namespace=? AND key=?"
            " IF fingerprint=? AND result=?",
            "claim_del_at": f"DELETE FROM {ks}.claims USING TIMESTAMP ? WHERE ledger=? AND namespace=? AND key=?",
            "claim_stamp": f"SELECT created_us, writetime(operation) AS wt, writetime(result) AS result_wt"
                           f" FROM {ks}.claims WHERE ledger=? AND namespace=? AND key=?",
            "claim_get": f"SELECT operation, fingerprint, result, created_us FROM {ks}.claims WHERE ledger=?"
                         " AND namespace=? AND key=?",
            "claim_days_list": f"SELECT day FROM {ks}.claim_day_list WHERE ledger=?",
            "claim_days_list_put": f"INSERT INTO {ks}.claim_day_list (ledger, day) VALUES (?,?)",
            "claim_days_list_del": f"DELETE FROM {ks}.claim_day_list WHERE ledger=? AND day=?",
            "claim_day_rows": f"SELECT created_us, namespace, key FROM {ks}.claim_days WHERE ledger=? AND day=?"
                              " AND (created_us, namespace, key) > (?, ?, ?) AND (created_us) < (?) LIMIT ?",
            "claim_day_put": f"INSERT INTO {ks}.claim_days (ledger, day, created_us, namespace, key)"
                             " VALUES (?,?,?,?,?)",
            "claim_day_del": f"DELETE FROM {ks}.claim_days WHERE ledger=? AND day=? AND created_us=?"
                             " AND namespace=? AND key=?",
            "merges": f"SELECT source, target FROM {ks}.merges WHERE ledger=?",
            "merge_put": f"INSERT INTO {ks}.merges (ledger, source, target) VALUES (?,?,?)",
            "member_get": f"SELECT status, profile, merged_into, created_us FROM {ks}.members"
                          " WHERE ledger=? AND member_id=?",
            "member_put": f"INSERT INTO {ks}.members (ledger, member_id, status, profile, merged_into, created_us)"
                          " VALUES (?,?,?,?,?,?) IF NOT EXISTS",
            "member_give_up": f"INSERT INTO {ks}.members (ledger, member_id, status, profile, merged_into,"
                              " created_us) VALUES (?,?,?,'{{}}','',0) IF NOT EXISTS USING TTL ?",
            "member_finish": f"INSERT INTO {ks}.members (ledger, member_id, status, profile, merged_into,"
                             " created_us) VALUES (?,?,?,?,?,?)",
            # Conditional (a Paxos write) like member_block, though the member is always there:
            # a plain write carries this pod's clock and could lose to a block's ballot that
            # came before it (an erased member found BLOCKED, then ACTIVE on unblock).
            "member_status": f"UPDATE {ks}.members SET status=?, merged_into=? WHERE ledger=? AND member_id=?"
                             " IF EXISTS",
            "member_erase": f"UPDATE {ks}.members SET profile='{{}}', status=? WHERE ledger=? AND member_id=?"
                            " IF EXISTS",
            "member_block": f"UPDATE {ks}.members SET status=? WHERE ledger=? AND member_id=?"
                            " IF status IN ('ACTIVE', 'BLOCKED')",
            "ext_get": f"SELECT member_id, writetime(member_id) AS wt FROM {ks}.external_ids WHERE ledger=?"
                       " AND kind=? AND value=?",
            "ext_free": f"DELETE FROM {ks}.external_ids WHERE ledger=? AND kind=? AND value=? IF member_id=?",
            "ext_claim": f"INSERT INTO {ks}.external_ids (ledger, kind, value, member_id, alias) VALUES (?,?,?,?,?)"
                         " IF NOT EXISTS",
            "ext_put": f"INSERT INTO {ks}.external_ids (ledger, kind, value, member_id, alias) VALUES (?,?,?,?,?)",
            "ext_del": f"DELETE FROM {ks}.external_ids WHERE ledger=? AND kind=? AND value=?",
            "ext_of_member": f"SELECT kind, value, alias FROM {ks}.member_ext WHERE ledger=? AND member_id=?",
            "ext_member_put": f"INSERT INTO {ks}.member_ext (ledger, member_id, kind, value, alias)"
                              " VALUES (?,?,?,?,?)",
            "ext_member_del": f"DELETE FROM {ks}.member_ext WHERE ledger=? AND member_id=? AND kind=? AND value=?",
        }  # fmt: skip
        self._stmts = {name: self.session.prepare(text) for name, text in cql.items()}
        self._serial = ConsistencyLevel.SERIAL
        self._batch: Callable[[], Any] = lambda: BatchStatement(batch_type=BatchType.UNLOGGED)

    def q(self, name: str, params: tuple[Any, ...], *, serial: bool = False) -> Any:
        stmt = self._stmts[name]
        if serial:
            bound = stmt.bind(params)
            bound.consistency_level = self._serial
            return self.session.execute(bound)
        return self.session.execute(stmt, params)

    def run_many(self, calls: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """Runs independent statements concurrently (the driver's async API); first rows back."""
        futures = [self.session.execute_async(self._stmts[name], params) for name, params in calls]
        return [f.result().one() for f in futures]

    # Layout, owners, indexes ---------------------------------------------------------------

    def _check_layout(self) -> None:
        """Claims the ledger's shard count. A new ledger is marked reviews-indexed (every review
        it will hold goes through review_days) in the same conditional batch, one partition of
        `meta`: a start that stops after the claim cannot leave a new ledger unmarked, which the
        next start could not tell from one written before migration 4."""
        batch = self._batch()
        batch.add(self._stmts["meta_claim"], (self.ledger, "shards", str(self._shards)))
        for shard in range(self._shards):
            batch.add(self._stmts["meta_put"], (self.ledger, f"{REVIEWS_INDEXED}:{shard}", "1"))
        row = self.session.execute(batch).one()
        if not row.applied and int(row.v) != self._shards:
            raise LayoutMismatch(
                f"ledger {self.ledger!r} in keyspace {self.keyspace!r} has {row.v} shards;"
                f" POINTMESH_LEDGER_SHARDS={self._shards}"
            )

    def lock_for(self, p: str) -> threading.RLock:
        return self._locks[zlib.crc32(p.encode()) % len(self._locks)]

    def owner(self, shard: int, object_id: str) -> str | None:
        key = (shard, object_id)
        found = self._owners.get(key)
        if found is None:
            row = self.q("owner_get", (self.ledger, shard, object_id)).one()
            if row is None:
                return None
            found = row.p
            self._cache_owner(key, found)
        return found

    def owner_month(self, shard: int, key: str) -> int | None:
        row = self.q("owner_month_get", (self.ledger, shard, key)).one()
        return None if row is None else row.month

    def bodies(self, shard: int, kind: str, rows: Sequence[Any]) -> list[str | None]:
        """Purchase or review rows (live, else archived) for listing rows (`p`, `id`), a few
        queries at a time: a page of an archived day would otherwise be two round trips each."""
        live = [None if r is None else str(r.body) for r in self.run_many(
            [("row", (self.ledger, x.p, kind, x.id)) for x in rows])]  # fmt: skip
        missing = [i for i, body in enumerate(live) if body is None]
        months = self.run_many([("owner_month_get", (self.ledger, shard, rows[i].id)) for i in missing])
        moved = [(i, m.month) for i, m in zip(missing, months, strict=True) if m is not None and m.month is not None]
        archived = self.run_many([("hist_row", (self.ledger, rows[i].p, month, kind, rows[i].id))
                                  for i, month in moved])  # fmt: skip
        for (i, _), row in zip(moved, archived, strict=True):
            live[i] = None if row is None else str(row.body)
        return live

    def _listing_puts(
        self, shard: int, channel: str, store_id: str, at: int, purchase_id: str, p: str
    ) -> list[tuple[str, tuple[Any, ...]]]:
        """A purchase's listing rows: its store's day and its channel's hour (one row when it
        names no store)."""
        return [("listing_put", (self.ledger, shard, channel, scope, listing_bucket(scope, at), at, purchase_id, p))
                for scope in {store_id, ""}]  # fmt: skip

    def reviews_indexed(self, shard: int) -> bool:
        """Whether the shard's reviews are all in review_days (remembered once they are)."""
        if shard in self._reviews_indexed:
            return True
        if self.q("meta_get", (self.ledger, f"{REVIEWS_INDEXED}:{shard}")).one() is None:
            return False
        self._reviews_indexed.add(shard)
        return True

    def unlist_reviews(self, shard: int, part: _Part) -> None:
        """Deletes the rows of reviews that changed status in `part`'s batch, which has applied
        (before it, they would have been missing from a listing had the batch failed). Best
        effort: the unit has committed, and readers skip and delete a row left behind."""
        calls = [("review_del", (self.ledger, shard, before, review_bucket(at), at, id_))
                 for status, at, id_, before in _reviews(part) if before is not None and before != status]  # fmt: skip
        try:
            self.run_many(calls)
        except _driver_failures() as exc:
            log.warning("cassandra: review rows of %s left for readers to delete: %s", part.p, exc)

    def prune_reviews(self, shard: int, status: str, stale: Sequence[tuple[int, Any]], empty: Sequence[Any]) -> None:
        """Deletes review rows that point at nothing listed, and days found empty, once older
        than the grace period (a unit that wrote them may still commit), each at its own write
        time so a newer rewrite survives. Writers re-announce a day every BUCKET_ANNOUNCE_S, so
        a day one is writing to never looks that old.

        A batch whose process died mid-write can still be completed by the next Paxos round on
        its partition, days later; deleting its row then would leave a committed review
        unlisted for good. So each partition is read at SERIAL first (which completes any such
        round) and the review read again: only a row still pointing at nothing goes. Rare: a
        unit that lost its condition, or a status change whose old row's delete failed."""
        now = time.time_ns() // 1000
        today = review_bucket(now)
        old = [(bucket, r) for bucket, r in stale if now - r.wt > QUEUE_GRACE_US]
        for p in sorted({r.p for _, r in old}):
            self.q("head_serial", (self.ledger, p), serial=True)
        again = self.bodies(shard, "review", [r for _, r in old])
        self.run_many(
            [("review_del_at", (r.wt, self.ledger, shard, status, bucket, r.at, r.id))
             for (bucket, r), body in zip(old, again, strict=True) if _review_listed(body, status, r.at) is None]
            + [("review_bucket_del", (d.wt, self.ledger, shard, status, d.bucket))
               for d in empty if now - d.wt > QUEUE_GRACE_US and d.bucket < today]
        )  # fmt: skip

    def rows_many(self, calls: Sequence[tuple[str, tuple[Any, ...]]]) -> list[list[Any]]:
        """`run_many` for queries that return several rows: every row of each."""
        futures = [self.session.execute_async(self._stmts[name], params) for name, params in calls]
        return [list(f.result()) for f in futures]

    def backfill(self, shard: int, members_at_once: int = 32) -> dict[str, int]:
        """One pass over a shard after upgrading from a release before 2026-12-06, run once no
        process runs the older code (`pointmesh ledger backfill`): makes every tier told before
        tiers were watched due now (`tiers`), writes the purchase_days and
        review_days rows of the purchases and reviews it stored (`listed` counts both), and gives
        the idempotency records, owner rows and sent events it wrote without a TTL the rest of
        their retention (deleting those already past it). Once through, the shard's review
        listings read review_days instead of every member. Every write is idempotent, so a pass
        can be run again; returns what it did."""
        done = {"listed": 0, "expiring": 0, "deleted": 0, "tiers": 0}
        now = time.time()
        now_us = int(now * 1e6)
        parts = [p for p, _ in self.partitions(shard, "")]
        review_days: set[tuple[str, int]] = set()
        for start in range(0, len(parts), members_at_once):
            chunk = parts[start : start + members_at_once]
            kinds = ("purchase", "months", "idem", "sent", "review", "state", "tier_due")
            found = self.rows_many([("kind_ttl", (self.ledger, p, kind)) for p in chunk for kind in kinds])
            per = len(kinds)
            # Owner rows before their records: a run that fails between the two and runs again
            # finds the record still without a TTL and writes both once more.
            calls: list[tuple[str, tuple[Any, ...]]] = []
            records: list[tuple[str, tuple[Any, ...]]] = []
            for n, p in enumerate(chunk):
                purchases, months, idem, sent, reviews, state, watched = found[n * per : (n + 1) * per]
                if _told_unwatched(state, watched):
                    # A tier told before tiers were watched: due now, so the maintenance pass
                    # looks at it under the version in effect and announces what lapsed.
                    # Due at 1970: at once, whatever the ledger's clock says.
                    calls.append(("queue_put", (self.ledger, shard, "tier", 0, 0, p, "", now_us, now_us)))
                    calls.append(("buckets_put", (self.ledger, shard, "tier", 0, now_us)))
                    records.append(("put", (self.ledger, p, "tier_due", "", "0")))
                    done["tiers"] += 1
                history = self.rows_many([("hist_kind", (self.ledger, p, month, kind))
                                          for row in months for month in json.loads(row.body)
                                          for kind in ("purchase", "review")])  # fmt: skip
                for row in [*purchases, *(r for rows in history[0::2] for r in rows)]:
                    _, record_json, at = json.loads(row.body)[:3]
                    record = json.loads(record_json)
                    calls += self._listing_puts(shard, record.get("channel", ""), record.get("store_id", ""), at,
                                                row.id, p)  # fmt: skip
                    done["listed"] += 1
                for row in [*reviews, *(r for rows in history[1::2] for r in rows)]:
                    _, status, at = json.loads(row.body)[:3]
                    calls.append(("review_put", (self.ledger, shard, status, review_bucket(at), at, row.id, p)))
                    review_days.add((status, review_bucket(at)))
                    done["listed"] += 1
                for kind, rows, at_field in (("idem", idem, 3), ("sent", sent, -1)):
                    for row in rows:
                        if row.ttl is not None:
                            continue
                        left = int(json.loads(row.body)[at_field] / 1e6 + self.ttl - now)
                        if left <= 0:
                            if kind == "idem":
                                calls.append(("owner_del", (self.ledger, shard, row.id)))
                            records.append(("del", (self.ledger, p, kind, row.id)))
                            done["deleted"] += 1
                            continue
                        if kind == "idem":
                            calls.append(("owner_put_expiring", (self.ledger, shard, row.id, p,
                                                                 left + OWNER_TTL_MARGIN_S)))  # fmt: skip
                        records.append(("put_expiring", (self.ledger, p, kind, row.id, row.body, left)))
                        done["expiring"] += 1
            for batch in (calls, records):  # at most BACKFILL_IN_FLIGHT writes at a time
                for at in range(0, len(batch), BACKFILL_IN_FLIGHT):
                    self.run_many(batch[at : at + BACKFILL_IN_FLIGHT])
        days = [("review_bucket_put", (self.ledger, shard, status, bucket, now_us)) for status, bucket in review_days]
        for at in range(0, len(days), BACKFILL_IN_FLIGHT):
            self.run_many(days[at : at + BACKFILL_IN_FLIGHT])
        # Only once every review of the shard is listed: until then its listings scan.
        self.q("meta_put", (self.ledger, f"{REVIEWS_INDEXED}:{shard}", "1"))
        return done

    def archived(self, shard: int, p: str, kind: str, id_: str, owner_key: str) -> str | None:
        month = self.owner_month(shard, owner_key)
        if month is None:
            return None
        row = self.q("hist_row", (self.ledger, p, month, kind, id_)).one()
        return None if row is None else str(row.body)

    def _archive_partition(self, shard: int, p: str, cutoff_us: int) -> int:
        """Moves up to ARCHIVE_BATCH settled rows older than the cutoff to their month.

        Order makes every crash point harmless: history rows and owner months are written
        first (idempotent copies; readers prefer the live row while it exists), then one
        conditional batch deletes the live rows and records the months. A unit that wrote the
        partition meanwhile wins; the rows move on the next pass.
        """
        tx = CassandraShardTx(self, shard, writing=True)
        try:
            part = tx.part(p)
            moving: list[tuple[str, str, str, int, str]] = []
            for kind, (at, owner_key, settled) in ARCHIVED.items():
                for id_, body in part.all(kind).items():
                    r = json.loads(body)
                    if r[at] < cutoff_us and settled(r):
                        when = from_us(r[at])
                        moving.append((kind, id_, body, when.year * 100 + when.month, owner_key(id_, r)))
                    if len(moving) >= ARCHIVE_BATCH:
                        break
                if len(moving) >= ARCHIVE_BATCH:
                    break
            if not moving:
                return 0
            calls: list[tuple[str, tuple[Any, ...]]] = []
            for kind, id_, body, month, key in moving:
                calls.append(("hist_put", (self.ledger, p, month, kind, id_, body)))
                if key:
                    calls.append(("owner_month", (month, self.ledger, shard, key)))
            self.run_many(calls)
            for kind, id_, _body, _month, _key in moving:
                part.delete(kind, id_)
            months = sorted(set(part.months()) | {m for *_, m, _ in moving})
            part.put("months", "", _dumps(months))
            self.commit_partition(part)
            return len(moving)
        finally:
            tx.release()

    def archive_shard(self, shard: int, cutoff: datetime) -> int:
        moved = 0
        for p, _ in self.partitions(shard, ""):
            while True:
                try:
                    n = self._archive_partition(shard, p, to_us(cutoff))
                except Conflict:
                    break  # the member was busy; next pass
                moved += n
                if n < ARCHIVE_BATCH:
                    break
        return moved

    async def archive(self, before: datetime) -> int:
        """Settled rows older than `before` leave the live partitions for monthly history."""
        moved = 0
        for shard in range(self._shards):
            moved += await self._submit(self.archive_shard, shard, before)
        return moved

    def _cache_owner(self, key: tuple[int, str], p: str) -> None:
        if len(self._owners) >= self._owner_cache:
            self._owners.clear()
        self._owners[key] = p

    def partitions(self, shard: int, index: str) -> list[tuple[str, int]]:
        if not index:
            return sorted((r.p, 0) for r in self.q("members", (self.ledger, shard)))
        return sorted((r.p, r.wt) for r in self.q("index", (self.ledger, shard, index)))

    # Queues ------------------------------------------------------------------------------------

    def remember_pointers(self, shard: int, pointers: Sequence[tuple[Pointer, str]]) -> None:
        """Events the relay read, with their bodies, so marking them sent needs no re-read.

        Two members' events can share a sequence (same microsecond, same tag): every pointer
        read under a sequence is kept, and marking the sequence marks exactly those."""
        if len(self._pointers) > 100_000:
            self._pointers.clear()
        read: dict[tuple[int, int], list[tuple[Pointer, str]]] = defaultdict(list)
        for pointer, body in pointers:
            read[(shard, pointer.at)].append((pointer, body))
        self._pointers.update(read)

    def pointers_of(self, shard: int, seq: int) -> list[Pointer]:
        remembered = self._pointers.get((shard, seq))
        if remembered is not None:
            return [pointer for pointer, _ in remembered]
        bucket = _bucket("outbox", seq)  # read by another process than the one marking it
        found = [Pointer(r.at, r.p, r.id, bucket, r.wt)
                 for r in self.q("queue_read", (self.ledger, shard, "outbox", bucket, seq, 100_000)) if r.at == seq]  # fmt: skip
        # Ambiguous without the read that published them: leave both unsent (published again,
        # then remembered by that read and marked).
        return found if len(found) == 1 else []

    def queue_due(self, shard: int, kind: str, upto: int, limit: int) -> list[Pointer]:
        """Pointers due by `upto`, oldest first, from the buckets writers announced; an
        announced bucket found empty is forgotten once it is older than the grace period."""
        last = _bucket(kind, upto)
        out: list[Pointer] = []
        now = time.time_ns() // 1000
        for b in self.q("buckets", (self.ledger, shard, kind, last)):
            rows = list(self.q("queue_read", (self.ledger, shard, kind, b.bucket, upto, limit - len(out))))
            out += [Pointer(r.at, r.p, r.id, b.bucket, r.wt) for r in rows]
            if not rows and now - b.wt > QUEUE_GRACE_US and b.bucket < last:
                self.q("buckets_del", (b.wt, self.ledger, shard, kind, b.bucket))
            if len(out) >= limit:
                break
        return out

    def queue_after(
        self, shard: int, kind: str, upto: int, limit: int, after: tuple[int, str, str] | None
    ) -> list[Pointer]:
        """Pointers due by `upto` strictly after `after` (at, partition, id), in that order."""
        if after is None:
            return self.queue_due(shard, kind, upto, limit)
        first = _bucket(kind, after[0])
        out: list[Pointer] = []
        for b in self.q("buckets", (self.ledger, shard, kind, _bucket(kind, upto))):
            if b.bucket < first:
                continue
            if b.bucket == first:
                found = self.q("queue_read_after", (self.ledger, shard, kind, b.bucket, *after, limit - len(out)))
                rows = [r for r in found if r.at <= upto]
            else:
                rows = list(self.q("queue_read", (self.ledger, shard, kind, b.bucket, upto, limit - len(out))))
            out += [Pointer(r.at, r.p, r.id, b.bucket, r.wt) for r in rows]
            if len(out) >= limit:
                break
        return out

    def prune_queue(self, shard: int, stale: Sequence[tuple[str, Pointer]]) -> None:
        """Drops pointers to nothing due, unless young (their unit may not have committed)."""
        now = time.time_ns() // 1000
        self.run_many([("queue_del", (p.written, self.ledger, shard, kind, p.bucket, p.at, p.p, p.id))
                       for kind, p in stale if now - p.written > QUEUE_GRACE_US])  # fmt: skip

    def settle_relayed(self, shard: int, relayed: Sequence[tuple[Pointer, int]]) -> None:
        """Moves sent events to 'sent' (one single-partition batch each), then drops their pointers."""
        futures = []
        bodies = {
            (p.p, p.id): body for pointer, _ in relayed for p, body in self._pointers.pop((shard, pointer.at), [])
        }
        for pointer, at in relayed:
            body = bodies.get((pointer.p, pointer.id))
            if body is None:
                found = self.q("row", (self.ledger, pointer.p, "outbox", pointer.id)).one()
                body = None if found is None else found.body
            if body is not None:
                batch = self._batch()
                batch.add(self._stmts["del"], (self.ledger, pointer.p, "outbox", pointer.id))
                batch.add(self._stmts["sent_put"], (self.ledger, pointer.p, pointer.id,
                                                    _dumps([*json.loads(body), at]), self.ttl))  # fmt: skip
                futures.append(self.session.execute_async(batch))
        for f in futures:
            f.result()
        self.run_many([("queue_del", (pointer.written, self.ledger, shard, "outbox", pointer.bucket, pointer.at,
                                      pointer.p, pointer.id)) for pointer, _ in relayed])  # fmt: skip

    def prepare_side_tables(self, shard: int, dirty: Sequence[_Part], new_owners: dict[str, str]) -> int:
        """Owners, queue pointers, listing rows, membership and index pointers of `dirty`;
        returns the write time of the queue pointers (withdraw_pointers deletes by it)."""
        calls: list[tuple[str, tuple[Any, ...]]] = []
        expiring = {id_ for part in dirty for _, id_ in part.expiring}
        for object_id, p in new_owners.items():
            if object_id in expiring:
                calls.append(("owner_put_expiring", (self.ledger, shard, object_id, p, self.owner_ttl)))
            elif self._owners.get((shard, object_id)) != p:
                calls.append(("owner_put", (self.ledger, shard, object_id, p)))
        now = time.time()
        now_us = int(now * 1e6)
        announced: list[tuple[int, str, int]] = []
        indexed: list[tuple[int, str, str]] = []
        for part in dirty:
            for kind, at, id_ in _pointers(part):
                bucket = _bucket(kind, at)
                calls.append(("queue_put", (self.ledger, shard, kind, bucket, at, part.p, id_, now_us, now_us)))
                if now - self._announced.get((shard, kind, bucket), 0.0) > BUCKET_ANNOUNCE_S:
                    calls.append(("buckets_put", (self.ledger, shard, kind, bucket, now_us)))
                    announced.append((shard, kind, bucket))
            for channel, store_id, at, id_ in part.listed:
                calls += self._listing_puts(shard, channel, store_id, at, id_, part.p)
            for status, at, id_, _ in _reviews(part):
                # The row under its new status goes in now; one under an old status is deleted
                # once the batch applied (`unlist_reviews`), so the review is never unlisted.
                bucket = review_bucket(at)
                calls.append(("review_put", (self.ledger, shard, status, bucket, at, id_, part.p)))
                if now - self._announced.get((shard, f"review:{status}", bucket), 0.0) > BUCKET_ANNOUNCE_S:
                    calls.append(("review_bucket_put", (self.ledger, shard, status, bucket, now_us)))
                    announced.append((shard, f"review:{status}", bucket))
            if (shard, part.p) not in self._known_members:
                calls.append(("members_put", (self.ledger, shard, part.p)))
            kinds = {kind for (kind, _), body in part.staged.items() if body is not None and _open(kind, body)}
            for index, wanted in INDEXED.items():
                last = self._indexed.get((shard, index, part.p), 0.0)
                if kinds & wanted and now - last > INDEX_GRACE_US / 2e6:
                    calls.append(("index_put", (self.ledger, shard, index, part.p, now_us)))
                    indexed.append((shard, index, part.p))
        self.run_many(calls)
        for key in announced:  # only once written: a failed announcement is retried next time
            self._announced[key] = now
        for object_id, p in new_owners.items():
            self._cache_owner((shard, object_id), p)
        for pointer_key in indexed:
            self._indexed[pointer_key] = now
        for part in dirty:
            self._known_members.add((shard, part.p))
        return now_us

    def withdraw_pointers(self, shard: int, part: _Part, written: int) -> None:
        """Deletes the event pointers a unit wrote for a batch that did not apply. Deleted at
        their own write time, so a newer rewrite survives; one whose event row exists belongs
        to a unit that committed the same sequence, and stays."""
        mine = [(at, id_) for kind, at, id_ in _pointers(part) if kind == "outbox"]
        found = self.run_many([("row", (self.ledger, part.p, "outbox", id_)) for _, id_ in mine])
        self.run_many([("queue_del", (written, self.ledger, shard, "outbox", _bucket("outbox", at), at, part.p, id_))
                       for (at, id_), row in zip(mine, found, strict=True) if row is None])  # fmt: skip

    def commit_partition(self, part: _Part) -> None:
        from cassandra import OperationTimedOut, WriteTimeout

        unit_id = uuid.uuid4().hex
        batch = self._batch()
        batch.add(self._stmts["cond"], (part.next_version, part.last_seq, unit_id, self.ledger, part.p, part.version))
        for (kind, id_), body in part.staged.items():
            if body is None:
                batch.add(self._stmts["del"], (self.ledger, part.p, kind, id_))
            elif (kind, id_) in part.expiring:
                put = self._stmts["put_new_expiring" if (kind, id_) in part.fresh else "put_expiring"]
                batch.add(put, (self.ledger, part.p, kind, id_, body, self.ttl))
            else:
                put = self._stmts["put_new" if (kind, id_) in part.fresh else "put"]
                batch.add(put, (self.ledger, part.p, kind, id_, body))
        try:
            applied = self.session.execute(batch).one().applied
        except (WriteTimeout, OperationTimedOut) as exc:
            # Unknown outcome: never resend blindly. A SERIAL read finishes any in-flight Paxos
            # round, so what it shows is final.
            head = self.q("head_serial", (self.ledger, part.p), serial=True).one()
            if head is not None and head.unit_id == unit_id:
                return
            if (None if head is None else head.version) == part.version:
                raise Conflict(f"{part.p}: write timed out and did not apply") from exc
            raise UnknownOutcome(f"{part.p}: write timed out; a later write hides whether it applied") from exc
        if not applied:
            raise Conflict(f"{part.p} changed since it was read")

    # LedgerStore -------------------------------------------------------------------------------

    @property
    def shard_count(self) -> int:
        return self._shards

    multi_member_units = False
    shared_by_replicas = True

    async def write_directory_alone(self, name: str, work: Callable[[CassandraDirectoryTx], T]) -> T:
        """Under a lease, so no other process's `name` unit runs beside it: a `meta` row taken
        `IF NOT EXISTS` with a TTL (a holder that dies holds it LEASE_SECONDS at most) and given
        back `IF` it still names its holder. Take, unit and give are one job on the pool, so a
        caller cancelled meanwhile cannot give the lease back under a unit still running. The
        unit reads members at serial consistency, which finishes a status write an earlier
        holder left in doubt (a timeout) before it is read. Waits LEASE_WAIT_SECONDS for the
        lease, then StoreBusy (UNAVAILABLE: the client retries its key). This process's own
        units of a name queue on the event loop first, so a burst of them holds one pool thread
        waiting for the lease, not all of them."""
        queue = self._alone.setdefault(name, asyncio.Lock())
        async with queue:
            return await self._submit(self._run_directory_alone, name, work)

    def _run_directory_alone(self, name: str, work: Callable[[CassandraDirectoryTx], T]) -> T:
        key, holder = f"lease:{name}", uuid.uuid4().hex
        started = time.monotonic()
        pause = 0.005
        while not self._take_lease(key, holder):
            if time.monotonic() - started > LEASE_WAIT_SECONDS:
                raise StoreBusy(f"cassandra: {name} held elsewhere for over {LEASE_WAIT_SECONDS} s")
            time.sleep(pause * (0.5 + random.random()))  # a pool thread: merges are rare
            pause = min(pause * 2, 0.2)
        try:
            return self._run_directory(work, True, serial_reads=True)
        finally:
            try:
                if not self.q("lease_give", (self.ledger, key, holder)).one().applied:
                    log.error("lease %s lapsed before %s finished (%.1f s): another may have run beside it",
                              key, name, time.monotonic() - started)  # fmt: skip
            except _driver_failures() as exc:  # it lapses by itself
                log.warning("lease %s not given back (%s); it lapses in %d s", key, exc, LEASE_SECONDS)

    def _take_lease(self, key: str, holder: str) -> bool:
        """A take that times out may still have applied: the row, read at serial consistency,
        says whose it is."""
        try:
            return bool(self.q("lease_take", (self.ledger, key, holder, LEASE_SECONDS)).one().applied)
        except _driver_failures() as exc:
            log.warning("taking lease %s: %s; reading it back", key, exc)
            row = self.q("meta_get", (self.ledger, key), serial=True).one()
            return row is not None and row.v == holder

    @staticmethod
    def _retrying(attempt: Callable[[], T], what: str) -> T:
        """Runs a unit of work again after each Conflict, with a short growing jitter."""
        for n in range(MAX_ATTEMPTS):
            try:
                return attempt()
            except Conflict:
                time.sleep(random.uniform(0, 0.002 * min(n + 1, 20)))
        raise StoreBusy(f"{what}: gave up after {MAX_ATTEMPTS} conflicting attempts")

    def _run_write(self, shard: int, work: Callable[[CassandraShardTx], T]) -> T:
        def attempt() -> T:
            tx = CassandraShardTx(self, shard, writing=True)
            try:
                result = work(tx)
                tx.commit()
                return result
            finally:
                tx.release()

        return self._retrying(attempt, f"shard {shard}")

    def _run_read(self, shard: int, work: Callable[[CassandraShardTx], T]) -> T:
        tx = CassandraShardTx(self, shard, writing=False)
        result = work(tx)
        self._prune(tx)
        self.prune_queue(shard, tx.stale)
        return result

    def _prune(self, tx: CassandraShardTx) -> None:
        """Index pointers a read followed to a partition with nothing left for them go away."""
        now = time.time_ns() // 1000
        for index, p, written in tx.scanned:
            part = tx.parts[p]
            if now - written > INDEX_GRACE_US and not any(
                _open(k, b) for k in INDEXED[index] for b in part.all(k).values()
            ):
                self.q("index_del", (written, self.ledger, tx.shard, index, p))

    def _run_directory(self, work: Callable[[CassandraDirectoryTx], T], commit: bool, *,
                       serial_reads: bool = False) -> T:  # fmt: skip
        known: dict[tuple[str, str], IdemRecord] = {}

        def attempt() -> T:
            tx = CassandraDirectoryTx(self, known, serial_reads=serial_reads)
            result = work(tx)
            if commit:
                tx.commit()
            return result

        return self._retrying(attempt, "directory")

    async def _submit(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs blocking store work on the pool; driver failures leave as StoreUnreachable so
        the server answers UNAVAILABLE (retried with the same key) instead of UNKNOWN."""
        if self._closed:
            raise StoreClosed("cassandra")
        try:
            return await asyncio.wrap_future(self._pool.submit(fn, *args))
        except _driver_failures() as exc:
            raise StoreUnreachable(f"cassandra: {type(exc).__name__}: {exc}") from exc

    async def write(self, shard: int, work: Callable[[CassandraShardTx], T]) -> T:
        return await self._submit(self._run_write, shard, work)

    async def read(self, shard: int, work: Callable[[CassandraShardTx], T]) -> T:
        return await self._submit(self._run_read, shard, work)

    async def scan(self, shard: int, work: Callable[[CassandraShardTx], T]) -> T:
        """Every read already runs on the driver's worker threads, off the event loop."""
        return await self.read(shard, work)

    async def write_directory(self, work: Callable[[CassandraDirectoryTx], T]) -> T:
        return await self._submit(self._run_directory, work, True)

    async def read_directory(self, work: Callable[[CassandraDirectoryTx], T]) -> T:
        return await self._submit(self._run_directory, work, False)

    async def close(self) -> None:
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._pool.shutdown)
        if self._cluster is not None:
            await loop.run_in_executor(None, self._cluster.shutdown)


def open_cassandra_store(settings: Settings) -> CassandraLedgerStore:
    cluster, session = connect(settings)
    try:
        return CassandraLedgerStore(session, settings.cassandra_keyspace, settings.cassandra_ledger,
                                    settings.ledger_shards, cluster=cluster,
                                    retention=timedelta(days=settings.idempotency_retention_days))  # fmt: skip
    except BaseException:
        cluster.shutdown()
        raise
