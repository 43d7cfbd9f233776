"""Ledger values, account naming and the error hierarchy. No storage, no RPC types.

Double entry: every transaction is a set of entries summing to zero. Member points live in
three accounts per unit (posted, pending, debt); the counter-legs live in system accounts so
finance can read outstanding liability and who funded it from the journal alone.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

DEFAULT_FUNDING = "program"


class MemberStatus(StrEnum):
    ACTIVE = "ACTIVE"
    BLOCKED = "BLOCKED"
    MERGED = "MERGED"
    ERASED = "ERASED"


class TxKind(StrEnum):
    EARN = "EARN"
    REDEEM = "REDEEM"
    HOLD_CAPTURE = "HOLD_CAPTURE"
    REVERSAL = "REVERSAL"
    TRANSFER_OUT = "TRANSFER_OUT"
    TRANSFER_IN = "TRANSFER_IN"
    ADJUSTMENT = "ADJUSTMENT"
    EXPIRY = "EXPIRY"
    MERGE_OUT = "MERGE_OUT"
    MERGE_IN = "MERGE_IN"
    PENDING_RELEASE = "PENDING_RELEASE"
    DEBT_SETTLEMENT = "DEBT_SETTLEMENT"


class HoldStatus(StrEnum):
    PLACED = "PLACED"
    CAPTURED = "CAPTURED"
    VOIDED = "VOIDED"
    EXPIRED = "EXPIRED"


class SagaState(StrEnum):
    HELD = "HELD"  # source side reserved or moved out; steps remain (recovery runs them forward)
    DONE = "DONE"
    # A transfer held for fraud review: its hold reserves the points, and only the review's
    # decision moves it on (approval: HELD, then driven; rejection: CANCELLED, hold voided).
    REVIEW = "REVIEW"
    CANCELLED = "CANCELLED"


class LedgerError(Exception):
    """Base of every error the ledger reports to callers; `field` names the bad input."""

    code = "LEDGER_ERROR"

    def __init__(self, message: str, *, field: str = "", metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.metadata = metadata or {}


class InvalidArgument(LedgerError):
    code = "INVALID_ARGUMENT"


class NotFound(LedgerError):
    code = "NOT_FOUND"


class FailedPrecondition(LedgerError):
    code = "FAILED_PRECONDITION"


class Unavailable(LedgerError):
    """The ledger cannot take the call now (shutting down); the same call may be sent again."""

    code = "UNAVAILABLE"


class InsufficientPoints(FailedPrecondition):
    code = "INSUFFICIENT_POINTS"

    def __init__(self, member_id: str, unit: str, available: int, requested: int) -> None:
        super().__init__(
            f"member {member_id} has {available} {unit} available, {requested} requested",
            field="points",
        )
        self.member_id = member_id
        self.unit = unit
        self.available = available
        self.requested = requested


class MemberNotActive(FailedPrecondition):
    code = "MEMBER_NOT_ACTIVE"


class AlreadyReversed(FailedPrecondition):
    """Nothing of the earn is left to reverse: a caller taking back its own credit (a revoked
    reward, say) is done, where any other refusal leaves it to retry."""

    code = "ALREADY_REVERSED"


# Errors that refuse a request before it wrote anything (a unit raising one rolls back): its
# idempotency key may be given back. Not Unavailable, where a write may have applied.
REFUSALS: tuple[type[LedgerError], ...] = (InvalidArgument, NotFound, FailedPrecondition)


class IdempotencyConflict(LedgerError):
    code = "IDEMPOTENCY_CONFLICT"

    def __init__(
        self, namespace: str, key: str, original_operation: str, first_seen_at: datetime, *, detail: str = "",
        field: str = "idempotency_key.key",
    ) -> None:  # fmt: skip
        super().__init__(
            detail
            or f"idempotency key {key!r} in namespace {namespace!r} was already used for a different "
            f"{original_operation} request",
            field=field,
        )
        self.namespace = namespace
        self.key = key
        self.original_operation = original_operation
        self.first_seen_at = first_seen_at


@dataclass(frozen=True, slots=True)
class IdemKey:
    namespace: str
    key: str


@dataclass(frozen=True, slots=True)
class Money:
    amount_minor: int
    currency: str


@dataclass(frozen=True, slots=True)
class ExternalId:
    kind: str
    value: str


@dataclass(frozen=True, slots=True)
class Member:
    member_id: str
    status: MemberStatus
    external_ids: tuple[ExternalId, ...]
    aliases: tuple[ExternalId, ...]
    profile: dict[str, str]
    merged_into: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Balance:
    member_id: str
    unit: str
    balance_points: int
    reserved_points: int
    pending_points: int
    lifetime_earned_points: int
    debt_points: int
    version: int
    # Past their date, not yet swept by the expiry job, kept by no hold: no debit spends them.
    # Counted only for a read on behalf of spending (a cached balance cannot know the hour).
    expiring_points: int = 0

    @property
    def available_points(self) -> int:
        return max(0, self.balance_points - self.reserved_points - self.expiring_points)


@dataclass(frozen=True, slots=True)
class Transaction:
    transaction_id: str
    kind: TxKind
    member_id: str
    unit: str
    points: int
    recorded_at: datetime
    business_time: datetime
    reference: str
    balance_after: Balance


@dataclass(frozen=True, slots=True)
class Reserved:
    """Points a hold keeps of the member's lots of one expiry (None: lots that never expire)."""

    points: int
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Hold:
    hold_id: str
    member_id: str
    unit: str
    points: int
    status: HoldStatus
    captured_points: int
    created_at: datetime
    expires_at: datetime
    reference: str
    saga_id: str = ""
    # The channel and store the hold was placed for: the gateway lets only keys acting for
    # them (or admin keys) read, capture or void it. Empty on holds placed by an internal caller
    # that named none, and on holds placed before 2026-12-06.
    channel: str = ""
    store_id: str = ""
    # The lots the hold keeps, earliest expiry first: the free points when it was placed. Its
    # capture takes them, and expiry leaves them alone while it is open. Points it names no lot
    # for (none on holds placed before 2026-12-07) keep the earliest-expiring points left.
    reserves: tuple[Reserved, ...] = ()


@dataclass(frozen=True, slots=True)
class Entry:
    entry_id: int
    transaction_id: str
    account: str
    points: int
    kind: TxKind
    recorded_at: datetime
    business_time: datetime
    reference: str


@dataclass(slots=True)
class Lot:
    """Points earned together that expire together; redemption eats the earliest expiry first."""

    lot_id: str
    member_id: str
    unit: str
    earn_transaction_id: str
    original_points: int
    remaining_points: int
    expires_at: datetime | None
    created_at: datetime
    pending: bool = False
    release_at: datetime | None = None
    pending_review: bool = False
    # Points of this lot that expired and no reversal of its earn has taken back yet: a return
    # takes its share of them from breakage (system:expired), not from the member.
    expired_points: int = 0


@dataclass(frozen=True, slots=True)
class EarnResult:
    transaction: Transaction
    lot_id: str
    pending: bool


@dataclass(frozen=True, slots=True)
class HoldResult:
    hold: Hold
    balance_after: Balance
    transaction: Transaction | None = None


@dataclass(frozen=True, slots=True)
class ReverseResult:
    transaction: Transaction
    reversed_points: int
    debt_points: int


@dataclass(frozen=True, slots=True)
class MergeResult:
    target: Member
    moved_points: dict[str, int]


@dataclass(frozen=True, slots=True)
class MaintenanceReport:
    expired_points: int = 0
    lots_expired: int = 0
    pending_released: int = 0
    holds_voided: int = 0
    sagas_completed: int = 0
    purchases_settled: int = 0
    tiers_changed: int = 0  # lapses and other changes no purchase made, announced


@dataclass(frozen=True, slots=True)
class Page:
    entries: list[Entry] = field(default_factory=list)
    next_page_token: str = ""


# Account names. The member's unit account holds posted points; pending holds credits not
# yet spendable; debt records what a reversal could not take back (a negative balance).
def member_account(member_id: str, unit: str) -> str:
    return f"member:{member_id}:{unit}"


def pending_account(member_id: str, unit: str) -> str:
    return f"pending:{member_id}:{unit}"


def debt_account(member_id: str, unit: str) -> str:
    return f"debt:{member_id}:{unit}"


def funding_account(source: str, unit: str) -> str:
    return f"funding:{source}:{unit}"


def system_account(name: str, unit: str) -> str:
    """name is one of redeemed, expired, adjustments, transit."""
    return f"system:{name}:{unit}"


_ID_RE = re.compile(r"^[a-z]{1,3}_[0-9a-f]{4}[0-9a-f]{24}(-[a-z]+)?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def bucket_of(member_id: str) -> int:
    """A stable 16-bit bucket; shards are bucket % N so ids can carry their routing."""
    return zlib.crc32(member_id.encode()) & 0xFFFF


def new_member_id() -> str:
    raw = uuid.uuid4().hex
    return f"m_{int(raw[:4], 16):04x}{raw[4:28]}"


def ordered_hex() -> str:
    """24 hex digits: the millisecond first, then 52 random bits. Rows keyed by such ids land
    at the end of their table's B-tree instead of on a random page, so a commit writes a few
    pages, not one per row."""
    return f"{time.time_ns() // 1_000_000:011x}{secrets.randbits(52):013x}"


def new_lot_id() -> str:
    return f"lot_{ordered_hex()}"


def new_id(prefix: str, member_id: str) -> str:
    """Ids of holds, transactions and sagas embed the member's bucket to find their shard."""
    return f"{prefix}_{bucket_of(member_id):04x}{ordered_hex()}"


def transfer_tx_ids(transfer_id: str, source: str, destination: str) -> tuple[str, str]:
    """A transfer's debit and credit transaction ids: fixed by its id, so every step (and a
    recovery rerunning it) posts the same ones, each in its own member's shard."""
    tail = transfer_id.split("_", 1)[1][4:]
    return f"tx_{bucket_of(source):04x}{tail}-out", f"tx_{bucket_of(destination):04x}{tail}-in"


def bucket_of_id(object_id: str) -> int:
    return int(object_id.split("_", 1)[1][:4], 16)


def is_valid_id(value: str, prefix: str) -> bool:
    return value.startswith(prefix + "_") and bool(_ID_RE.match(value))


def is_valid_name(value: str) -> bool:
    """Funding sources, namespaces and similar short identifiers."""
    return bool(_NAME_RE.match(value))
