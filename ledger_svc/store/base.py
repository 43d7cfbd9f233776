"""The storage contract every ledger backend implements.

A mutation is one unit of work inside one shard: a function that reads and writes through a
`ShardTx` and either returns (everything it wrote commits together: entries, balances,
idempotency record, outbox row) or raises (nothing it wrote survives). Members and
idempotency claims live in a small directory beside the shards.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar

from ledger_svc.domain import (
    Entry,
    ExternalId,
    Hold,
    HoldStatus,
    Lot,
    Member,
    MemberStatus,
    Reserved,
    SagaState,
    TxKind,
    Unavailable,
)

T = TypeVar("T")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


class StoreClosed(Unavailable):
    """Work submitted to a store that is closing, or still queued when it closed."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name}: the ledger store is closed")


# Rows one retention unit looks at: a few milliseconds of work, then other units get their turn.
PURGE_SLICE = 5_000


def to_us(when: datetime) -> int:
    """Times are stored as integer microseconds since the epoch so they sort and compare exactly."""
    return (when - EPOCH) // _US


def from_us(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def opt_us(when: datetime | None) -> int | None:
    return None if when is None else to_us(when)


def opt_dt(value: int | None) -> datetime | None:
    return None if value is None else from_us(value)


def encode_reserves(reserves: Sequence[Reserved]) -> str:
    """A hold's lots as both stores keep them: [[points, expiry µs or null], ...]; '' for none."""
    return json.dumps([[r.points, opt_us(r.expires_at)] for r in reserves], separators=(",", ":")) if reserves else ""


def decode_reserves(text: str) -> tuple[Reserved, ...]:
    return tuple(Reserved(int(p), opt_dt(e)) for p, e in json.loads(text)) if text else ()


@dataclass(slots=True)
class AccountRow:
    account: str
    balance: int = 0
    reserved: int = 0
    lifetime_earned: int = 0
    version: int = 0


@dataclass(slots=True)
class TxRecord:
    tx_id: str
    kind: TxKind
    member_id: str
    unit: str
    points: int
    recorded_at: datetime
    business_time: datetime
    reference: str = ""
    funding: str = ""
    purchase_minor: int = 0
    purchase_currency: str = ""
    reversed_points: int = 0
    refunded_minor: int = 0
    lot_id: str = ""
    pending: bool = False
    original_tx: str = ""
    balance_after_json: str = ""


@dataclass(frozen=True, slots=True)
class IdemRecord:
    operation: str
    fingerprint: str
    result_json: str
    created_at: datetime


@dataclass(slots=True)
class SagaRecord:
    saga_id: str
    kind: str  # "transfer" | "merge"
    state: SagaState
    source_member: str
    dest_member: str
    unit: str
    points: int
    hold_id: str
    payload_json: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    event_id: str
    member_id: str
    payload_json: str


class ShardTx(Protocol):
    """Reads and staged writes of one shard inside one atomic unit of work."""

    def get_idempotency(self, namespace: str, key: str) -> IdemRecord | None: ...
    def put_idempotency(self, namespace: str, key: str, record: IdemRecord) -> None: ...

    def get_accounts(self, accounts: Sequence[str]) -> list[AccountRow]:
        """Rows in the order asked for; an account never posted to is an all-zero row."""
        ...

    def put_account(self, row: AccountRow) -> None: ...
    def list_accounts(self) -> list[AccountRow]: ...

    def add_transaction(self, tx: TxRecord) -> None: ...
    def get_transaction(self, tx_id: str) -> TxRecord | None: ...
    def update_transaction(self, tx: TxRecord) -> None: ...
    def add_entries(self, tx: TxRecord, legs: Sequence[tuple[str, int]]) -> None: ...
    def list_entries(self, account: str, before_entry_id: int, limit: int) -> list[Entry]: ...
    def sum_entries_by_account(self) -> dict[str, int]: ...
    def sum_entries_before(self, when: datetime) -> dict[str, int]: ...
    def movements_between(self, start: datetime, end: datetime) -> list[tuple[str, str, int]]: ...
    def unbalanced_transactions(self) -> list[tuple[str, int]]: ...
    def entries_without_transaction(self) -> list[tuple[str, int]]:
        """(transaction id, how many legs) of journal legs whose transaction row is missing
        (reconciliation)."""
        ...

    def transactions_without_events(self) -> list[str] | None:
        """Ids of transactions whose outbox event is gone although retention cannot have taken
        it (reconciliation: an event lost before it was published); None where the store
        cannot tell (Cassandra, whose sent events expire by TTL)."""
        ...

    def add_lot(self, lot: Lot) -> None: ...
    def update_lot(self, lot: Lot) -> None: ...
    def spendable_lots(self, member_id: str, unit: str) -> list[Lot]: ...
    def spendable_total(self, member_id: str, unit: str) -> int: ...
    def lot_of_transaction(self, tx_id: str, member_id: str = "") -> Lot | None: ...
    def pending_lots(self, member_id: str, unit: str) -> list[Lot]: ...
    def spent_lots_with_expired(self, member_id: str, unit: str) -> list[Lot]:
        """Spendable lots with no points left of which some expired (`expired_points`): the
        claim a merge hands on to the heir with the live lots (Cassandra: of the live partition,
        not its archived months)."""
        ...

    def lots_expired_by(self, when: datetime, limit: int, after: object = None) -> tuple[list[Lot], object]:
        """Up to `limit` unexpired-yet-due lots after the cursor `after`, and the cursor of the
        next page (None when this was the last). The job pages through all of them: lots it
        cannot expire yet (reserved by holds) must not hide the ones behind them."""
        ...

    def pending_due_by(self, when: datetime, limit: int) -> list[Lot]: ...
    def lot_totals(self) -> dict[tuple[str, str, bool], int]: ...
    def lots_out_of_bounds(self) -> list[Lot]:
        """Lots whose remaining points are below zero or above their original points
        (reconciliation: per-member sums hide one lot's error that another's cancels)."""
        ...

    def review_held_lots(self) -> list[Lot]:
        """Pending lots with points left that wait on a fraud review (`pending_review`), found
        by a scan, not by the reviews (reconciliation)."""
        ...

    def add_hold(self, hold: Hold) -> None: ...
    def get_hold(self, hold_id: str) -> Hold | None: ...
    def set_hold_status(self, hold_id: str, status: HoldStatus, captured_points: int) -> None: ...
    def holds_due_by(self, when: datetime, limit: int) -> list[Hold]: ...
    def placed_hold_totals(self) -> dict[str, int]: ...
    def placed_holds_of(self, member_id: str) -> list[Hold]: ...
    def placed_holds(self) -> list[Hold]:
        """Every placed hold, found without the timers (reconciliation's backstop)."""
        ...

    def add_outbox(self, event_id: str, member_id: str, payload_json: str, at: datetime) -> None: ...
    def unrelayed_outbox(self, limit: int) -> list[OutboxRow]: ...
    def mark_relayed(self, seqs: Iterable[int], at: datetime) -> None: ...
    def outbox_backlog(self) -> int: ...

    def add_saga(self, saga: SagaRecord) -> None: ...
    def get_saga(self, saga_id: str) -> SagaRecord | None: ...
    def set_saga_state(self, saga_id: str, state: SagaState, at: datetime) -> None: ...
    def open_sagas(self) -> list[SagaRecord]: ...

    # Member-level accrual state (counters, purchase count, tier qualification) as JSON.
    def get_member_state(self, member_id: str) -> str | None: ...
    def put_member_state(self, member_id: str, state_json: str) -> None: ...
    # When a member's tier is to be looked at again (it may lapse then, or a return, reversal
    # or merge may have moved it); None: never. The maintenance job finds them by this.
    def set_tier_due(self, member_id: str, due: datetime | None) -> None: ...
    def tiers_due_by(self, when: datetime, limit: int) -> list[str]:
        """Up to `limit` members whose tier is due to be looked at by `when`, earliest first."""
        ...

    def member_ids_after(self, after: str, limit: int) -> list[str]:
        """Up to `limit` of the shard's members after `after` in id order ('' from the first):
        a walk over every member, a page at a time (members the shard knows only by name may
        be among them: a caller reads each one's state)."""
        ...

    # Small facts a shard keeps about its own jobs (tier_watch: the tier policy its members
    # were last looked at under).
    def get_meta(self, key: str) -> str | None: ...
    def put_meta(self, key: str, value: str) -> None: ...

    # Purchases with their explained breakdown; PENDING_ACCRUAL ones wait for rules_svc. A
    # purchase's channel, store and receipt time never change once recorded (its natural key),
    # which is what lets a store index them for listing once.
    def put_purchase(
        self, purchase_id: str, member_id: str, status: str, receipt_time: datetime, body_json: str,
        channel: str, store_id: str,
    ) -> None: ...  # fmt: skip
    def get_purchase(self, purchase_id: str) -> tuple[str, str] | None: ...
    def waiting_purchases(self, limit: int) -> list[tuple[str, str]]: ...
    def member_waiting_purchases(self, member_id: str) -> int: ...
    def list_purchases(
        self,
        channel: str,
        store_id: str,
        start: datetime,
        end: datetime,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[tuple[datetime, str, str]]:
        """(receipt time, id, body) of at most `limit` purchases of a channel (and of one store, unless `store_id`
        is empty) with receipt times in [start, end), in (receipt time, id) order after `after`.
        Settlement pages through a store's day with it, so it reads what it returns, not the day."""
        ...

    # Fraud review items (JSON bodies); listed by status, oldest first, after a (time, id) cursor.
    def put_review(self, review_id: str, member_id: str, status: str, created_at: datetime, body_json: str) -> None: ...
    def get_review(self, review_id: str) -> str | None: ...
    def list_reviews(
        self, status: str, member_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[tuple[datetime, str, str]]: ...

    def purge_before(
        self, idempotency_before: datetime, outbox_before: datetime, resume: str = "", limit: int = PURGE_SLICE
    ) -> tuple[int, str]:
        """Deletes idempotency records and relayed outbox rows older than the cut-offs, looking
        at about `limit` rows: returns how many went and where the next slice starts ("" when
        done). A retention pass over a day of postings is millions of rows; in one unit it held
        the shard's writer (on SQLite the event loop) for as long as it took. A store whose rows
        expire by themselves (Cassandra's TTL, counted from each write) deletes nothing here."""
        ...


class DirectoryTx(Protocol):
    """Members, their external ids and the idempotency key claims."""

    def claim(self, namespace: str, key: str, operation: str, fingerprint: str, at: datetime) -> IdemRecord | None:
        """Records the claim unless the key exists; returns the existing claim when it does."""
        ...

    def claim_many(self, claims: Sequence[tuple[str, str, str, str]], at: datetime) -> list[IdemRecord | None]:
        """`claim` for each (namespace, key, operation, fingerprint) in order, so a key named
        twice finds its first claim; the batch path claims a whole chunk in one call."""
        ...

    def complete_claim(self, namespace: str, key: str, result_json: str) -> None: ...
    def release_claim(self, namespace: str, key: str, fingerprint: str) -> None:
        """Gives back the claim of a request that was refused before it wrote anything, while it
        still holds this fingerprint and no result: the key is free for a corrected retry."""
        ...

    def merged_members(self) -> list[tuple[str, str]]: ...
    def merged_into(self, target: str) -> list[str]:
        """The members merged directly into `target`."""
        ...

    def add_member(self, member: Member) -> None: ...
    def get_member(self, member_id: str) -> Member | None: ...
    def find_member_id(self, ext: ExternalId) -> str | None: ...
    def external_id_owner(self, ext: ExternalId) -> str | None: ...
    def set_status(self, member_id: str, status: MemberStatus, merged_into: str = "") -> None: ...
    def set_blocked(self, member_id: str, blocked: bool) -> None:
        """BLOCKED or ACTIVE, only from one of those two: a member merged or erased since the
        unit read it stays so, with its merge target (SQLite: the unit's write lock makes its
        read final; Cassandra: a conditional update, whose lost condition runs the unit again)."""
        ...

    def move_external_ids_as_aliases(self, source: str, target: str) -> None: ...
    def erase(self, member_id: str) -> None: ...
    def purge_claims_before(self, when: datetime, limit: int = PURGE_SLICE) -> int:
        """Deletes claims made before `when`, oldest first, up to `limit` where the unit runs on
        the event loop (SQLite); returns how many. Callers repeat until fewer than `limit` go."""
        ...


class LedgerStore(Protocol):
    """A sharded store: every unit of work runs in one shard (or the directory)."""

    @property
    def shard_count(self) -> int: ...

    # True when one unit of work may write several members atomically (SQLite: a shard is one
    # database). Cassandra commits per member, so transfers there always run as sagas.
    multi_member_units: bool
    # True when several ledger processes serve one store (Cassandra replicas). An embedded
    # SQLite directory belongs to one process (`pointmesh up` locks it).
    shared_by_replicas: bool

    async def write(self, shard: int, work: Callable[[ShardTx], T]) -> T: ...
    async def read(self, shard: int, work: Callable[[ShardTx], T]) -> T: ...
    async def scan(self, shard: int, work: Callable[[ShardTx], T]) -> T:
        """A read over much of a shard (reconciliation, exports, listings), run where it cannot
        hold up the requests served meanwhile; the same single snapshot as `read`."""
        ...

    async def write_directory(self, work: Callable[[DirectoryTx], T]) -> T: ...
    async def read_directory(self, work: Callable[[DirectoryTx], T]) -> T: ...
    async def write_directory_alone(self, name: str, work: Callable[[DirectoryTx], T]) -> T:
        """A directory write no other `name` write runs beside, in any process serving this
        store: for a write that checks one member and changes another, which a unit cannot hold
        together where it commits per member (a merge: A into B and B into A at once). SQLite's
        directory writes are one at a time already."""
        ...

    async def archive(self, before: datetime) -> int:
        """Moves settled history older than `before` out of the live rows, where the store
        bounds its partitions that way (Cassandra); returns how many rows moved."""
        ...

    async def close(self) -> None: ...
