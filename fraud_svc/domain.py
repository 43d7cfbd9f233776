"""What fraud_svc scores and answers, free of gRPC and storage."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from pointmesh.bounds import SCREENED_LATENESS

# How far from fraud_svc's clock a scored event's time may lie. Velocity state trims every key
# an event touches to what its windows still need at the event's time, so an event dated ahead
# would wipe the history the next events are judged on (at a shared store, card, device or IP
# too). The ledger takes receipts up to 5 minutes ahead of its clock (ledger_svc/accrual.py)
# and up to the program's max_lateness_days late (30 by default): the skew allows for the two
# clocks differing, the lateness for the default with some margin. A program accepting later
# receipts gets them decided by the ledger's policy for a request fraud_svc refuses.
FUTURE_SKEW = timedelta(minutes=10)
MAX_LATENESS = SCREENED_LATENESS
# How late an event may come after newer ones of the same key and still find its windows
# whole: tracks keep entries this long past their retention. Keeping them for MAX_LATENESS
# would hold ~36 days of a store's receipts for its 24-hour window (5.4 MB a store at 1,000
# receipts a day, against 450 kB now): an offline till's day-old receipts are exact, a receipt
# weeks late sees windows newer events have trimmed (docs/fraud.md, known limits).
EXACT_LATENESS = timedelta(days=2)


class TxKind(StrEnum):
    PURCHASE = "purchase"
    REDEMPTION = "redemption"
    TRANSFER = "transfer"
    RETURN = "return"


class Verdict(StrEnum):
    ALLOW = "allow"
    REVIEW = "review"
    DENY = "deny"


class FraudError(Exception):
    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class BadRequest(FraudError):
    pass


class ModelUnavailable(FraudError):
    """No usable model artifact (missing or refused as corrupt)."""


class RowFailed(FraudError):
    """fraud_svc failed on one row of a batch (a fault of its own, logged): that row's answer,
    so the others are still scored; the caller decides it as it would an unscored one."""


@dataclass(frozen=True, slots=True)
class TxContext:
    """One transaction as fraud_svc sees it; `occurred_at` is event time, which drives every
    velocity window, so replaying the same events gives the same decisions."""

    event_id: str
    kind: TxKind
    member_id: str
    occurred_at: datetime
    channel: str = ""
    store_id: str = ""
    amount_minor: int = 0
    currency: str = ""
    points: int = 0
    device_id: str = ""
    ip: str = ""
    card_hash: str = ""
    employee_card: str = ""
    counterparty_member_id: str = ""
    contact_changed_at: datetime | None = None
    member_since: datetime | None = None
    balance_points: int = 0


@dataclass(frozen=True, slots=True)
class Reason:
    code: str  # e.g. "rule:velocity_member_1h" or "model:redeem_share_of_balance"
    text: str
    weight: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    event_id: str
    verdict: Verdict
    score: float  # model probability in [0, 1]; 0 when decided by rules alone
    reasons: tuple[Reason, ...] = ()
    model_version: str = ""
    scored: bool = True  # False when a fail-open/closed policy decided without a score
    features: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MemberActivity:
    """The ledger's view of a member that churn scoring reads (mirrors the proto message)."""

    member_id: str
    member_since: datetime | None = None
    last_purchase_at: datetime | None = None
    purchases_30d: int = 0
    purchases_90d: int = 0
    purchases_365d: int = 0
    spend_90d_minor: int = 0  # in the programme's base currency
    balance_points: int = 0
    last_redemption_at: datetime | None = None
    segment: str = ""
    tier: str = ""


@dataclass(frozen=True, slots=True)
class ChurnPrediction:
    member_id: str
    probability: float
    factors: tuple[Reason, ...] = ()
    model_version: str = ""
