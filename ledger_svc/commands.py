"""Commands the ledger accepts, one per mutation, free of transport types.

A command's fields (minus its idempotency key) are its payload: their canonical JSON is the
fingerprint that decides whether a reused key is a replay or a conflict.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ledger_svc import codec
from ledger_svc.domain import DEFAULT_FUNDING, ExternalId, IdemKey, Money
from ledger_svc.screening import ScreeningContext


@dataclass(frozen=True, slots=True)
class CreateMember:
    key: IdemKey
    external_ids: tuple[ExternalId, ...] = ()
    profile: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SetMemberBlocked:
    key: IdemKey
    member_id: str
    blocked: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class MergeMembers:
    key: IdemKey
    source_member_id: str
    target_member_id: str


@dataclass(frozen=True, slots=True)
class EraseMember:
    key: IdemKey
    member_id: str


@dataclass(frozen=True, slots=True)
class Earn:
    key: IdemKey
    member_id: str
    unit: str
    points: int
    funding_source: str = DEFAULT_FUNDING
    business_time: datetime | None = None
    expires_at: datetime | None = None
    release_at: datetime | None = None
    pending_review: bool = False
    purchase: Money | None = None
    reference: str = ""


@dataclass(frozen=True, slots=True)
class Redeem:
    key: IdemKey
    member_id: str
    unit: str
    points: int
    business_time: datetime | None = None
    reference: str = ""
    context: ScreeningContext = field(default_factory=ScreeningContext)


@dataclass(frozen=True, slots=True)
class PlaceHold:
    key: IdemKey
    member_id: str
    unit: str
    points: int
    timeout: timedelta | None = None
    reference: str = ""
    context: ScreeningContext = field(default_factory=ScreeningContext)


@dataclass(frozen=True, slots=True)
class CaptureHold:
    key: IdemKey
    hold_id: str
    points: int = 0


@dataclass(frozen=True, slots=True)
class VoidHold:
    key: IdemKey
    hold_id: str


@dataclass(frozen=True, slots=True)
class Reverse:
    key: IdemKey
    transaction_id: str
    points: int | None = None
    refund: Money | None = None
    full: bool = False
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Transfer:
    key: IdemKey
    source_member_id: str
    destination_member_id: str
    unit: str
    points: int
    reason: str = ""
    context: ScreeningContext = field(default_factory=ScreeningContext)


@dataclass(frozen=True, slots=True)
class Adjust:
    key: IdemKey
    member_id: str
    unit: str
    points: int
    reason: str
    operator_id: str = ""


@dataclass(frozen=True, slots=True)
class ReleasePending:
    key: IdemKey
    transaction_id: str


@dataclass(frozen=True, slots=True)
class PurchaseLine:
    sku: str
    category: str
    quantity: int
    amount_minor: int


@dataclass(frozen=True, slots=True)
class RecordPurchase:
    """`key` is the receipt's natural key (set by the service); `transport_key` the caller's."""

    key: IdemKey
    member_id: str
    channel: str
    store_id: str
    receipt_id: str
    total: Money
    lines: tuple[PurchaseLine, ...]
    receipt_time: datetime
    tender_transaction_id: str = ""
    transport_key: IdemKey | None = None
    context: ScreeningContext = field(default_factory=ScreeningContext)


@dataclass(frozen=True, slots=True)
class ReturnLine:
    line_index: int
    quantity: int


@dataclass(frozen=True, slots=True)
class RecordReturn:
    key: IdemKey
    purchase_id: str
    channel: str
    store_id: str
    lines: tuple[ReturnLine, ...] = ()
    refund: Money | None = None
    return_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class DecideReview:
    key: IdemKey
    review_id: str
    approve: bool
    operator_id: str
    note: str = ""


PostingCommand = Earn | Redeem | Adjust | Reverse


def fingerprint(command: object) -> str:
    plain = codec.to_plain(command)
    plain.pop("key", None)
    plain.pop("transport_key", None)
    # Session facts go to fraud screening only: the same receipt or redemption arriving with
    # other device details (or none, from a batch file) is still the same operation.
    plain.pop("context", None)
    payload = f"{type(command).__name__}:{codec.canonical(plain)}"
    return hashlib.sha256(payload.encode()).hexdigest()
