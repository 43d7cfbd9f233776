"""What fraud_svc scores and answers, free of gRPC and storage."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


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
