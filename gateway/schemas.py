"""Request and response bodies of the REST API, with examples for the OpenAPI document.

Amounts are integer minor units with an ISO 4217 code and points are integers: the models use
strict integers, so `12.5` or `"12"` is refused rather than rounded.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt

from pointmesh.bounds import MAX_AMOUNT_MINOR
from pointmesh.timestamps import utc_instant

# The ledger's ids are a short prefix, "_" and 28 hex digits (ledger_svc/domain.py); a name is at
# most 64 characters there. Longer ids are refused here: the ledger's answer quotes the value, and
# a quote of thousands of characters would not fit in a gRPC trailer.
MAX_ID_LENGTH = 64
MAX_PAGE_TOKEN_LENGTH = 200

Points = Annotated[StrictInt, Field(gt=0, le=10**12, examples=[500])]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$", examples=["EUR"])]
Id = Annotated[str, Field(max_length=MAX_ID_LENGTH)]


# RFC 3339's date-time, its offset left optional here so that a time without one is refused by
# _instant with the reason (it would be read in the host's zone). The date and time may be
# separated by a space instead of "T" (RFC 3339 section 5.6, the note under the grammar).
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})?", re.ASCII)
# The same without seconds, which RFC 3339 requires (pydantic alone would read it as :00).
_NO_SECONDS = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}([Zz]|[+-]\d{2}:\d{2})?", re.ASCII)


def _rfc3339(value: object) -> object:
    """Only the text of a date-time (or a datetime, from Python): pydantic would also read a
    number, or a string of digits, as seconds since the epoch, a guess no client means."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and _NO_SECONDS.fullmatch(value):
        raise ValueError("must be an RFC 3339 date-time: seconds are required, e.g. 2026-11-27T18:31:00+02:00")
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 date-time with an offset, e.g. 2026-11-27T18:31:00+02:00")
    return value


def _instant(when: datetime) -> datetime:
    """A time without a UTC offset is refused (it would be read in the host's zone), and so is
    one whose UTC value falls outside years 1..9999, which no protobuf Timestamp can carry."""
    utc_instant(when)
    return when


Instant = Annotated[datetime, BeforeValidator(_rfc3339), AfterValidator(_instant)]


# Pydantic refuses text no UTF-8 message can carry (an unpaired surrogate such as \udfff) in a
# constrained str; a bare dict[str, str] passed it through to protobuf, which failed with a 500.
ProfileValue = Annotated[str, Field(max_length=500)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Money(Body):
    amount_minor: Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT_MINOR, examples=[4990])]
    currency: Currency


class ExternalId(Body):
    kind: Name = Field(examples=["card"])
    value: str = Field(min_length=1, max_length=128, examples=["6001002003"])


class CreateMember(Body):
    external_ids: list[ExternalId] = Field(default=[], max_length=16)
    profile: dict[Name, ProfileValue] = Field(default={}, max_length=64,
                                              examples=[{"segments": "students", "language": "fi"}])  # fmt: skip


class Member(BaseModel):
    member_id: str = Field(examples=["m_0a1b2c3d4e5f60718293a4b5c6d7"])
    status: str = Field(examples=["ACTIVE"])
    external_ids: list[ExternalId]
    merged_into: str = ""
    created_at: datetime | None = None
    # What enrolment stored (empty once the member is erased); the member's own token reads it.
    profile: dict[str, str] = Field(default_factory=dict, examples=[{"language": "fi"}])


class Balance(BaseModel):
    member_id: str
    unit: str = Field(examples=["points"])
    balance_points: int = Field(examples=[1250])
    available_points: int = Field(examples=[1000])
    reserved_points: int = Field(examples=[250])
    pending_points: int = Field(examples=[0])
    lifetime_earned_points: int = Field(examples=[4000])
    debt_points: int = Field(examples=[0])


class TierStatus(BaseModel):
    """Where the member stands in the program's tiers, as the member's app shows it."""

    member_id: str
    program: str
    version: int
    tier: str = Field(examples=["silver"], description="The tier the next purchase is priced at.")
    metric_unit: str = Field(examples=["tier_credits"])
    window: str = Field(examples=["calendar_year"], description="calendar_year or rolling_12_months")
    qualifying_points: int = Field(examples=[1200], description="Credits the current window counts.")
    points_to_keep: int = Field(
        examples=[0],
        description="The least credits that, earned now, still hold the tier at held_until (0: nothing earned now "
        "holds it longer).",
    )
    next_tier: str = Field(examples=["gold"], description="Empty at the top tier.")
    next_threshold: int = Field(examples=[5000])
    points_to_next: int = Field(examples=[3800])
    held_until: datetime | None = Field(
        examples=["2028-01-30T22:00:00Z"],
        description="With nothing more earned, the tier holds until then (grace included); null for the entry tier.",
    )
    tier_after: str = Field(examples=["blue"], description="The tier from held_until on, with nothing more earned.")


class Entry(BaseModel):
    entry_id: int
    transaction_id: str
    kind: str = Field(examples=["EARN"])
    points: int
    recorded_at: datetime | None
    business_time: datetime | None
    reference: str


class History(BaseModel):
    entries: list[Entry]
    next_page_token: str = Field(description="Pass as page_token for the next page; empty on the last page.")


class MemberToken(BaseModel):
    token: str
    expires_at: datetime


class PurchaseLine(Body):
    sku: str = Field(min_length=1, max_length=64, examples=["tent-2p"])
    category: str = Field(default="", max_length=64, examples=["outdoor"])
    quantity: Annotated[StrictInt, Field(gt=0, le=100_000, examples=[1])]
    amount: Money


class RecordPurchase(Body):
    member_id: Id = Field(examples=["m_0a1b2c3d4e5f60718293a4b5c6d7"])
    store_id: str = Field(default="", max_length=64, description="A store the API key is bound to; empty for online channels.",
                          examples=["HEL-01"])  # fmt: skip
    channel: str = Field(
        default="", max_length=64, description="Optional; must equal the API key's channel when given."
    )
    receipt_id: str = Field(min_length=1, max_length=128, examples=["HEL-01-2026-11-27-000123"])
    total: Money
    lines: list[PurchaseLine] = Field(min_length=1, max_length=500)
    receipt_time: Instant = Field(description="Business time, with an offset.", examples=["2026-11-27T18:31:00+02:00"])
    tender_transaction_id: Id = Field(default="", description="A redemption that paid part of this purchase.")
    context: ScreeningContext | None = None


class ExplainedPart(BaseModel):
    rule_id: str = Field(examples=["weekend-double"])
    unit: str
    points: int
    line_index: int = Field(description="-1 for a basket-level part")
    detail: str = Field(examples=["x2 on 49 points"])
    matched: list[str]
    capped: str
    returned_points: int = 0


class Purchase(BaseModel):
    purchase_id: str
    member_id: str
    channel: str
    store_id: str
    receipt_id: str
    status: str = Field(examples=["EARNED"])
    status_reason: str
    program_version: int
    earned: dict[str, int] = Field(examples=[{"points": 98, "tier_credits": 49}])
    parts: list[ExplainedPart]
    purchase_number: int
    tier_before: str
    tier_after: str
    receipt_time: datetime | None
    replayed: bool = False
    screening: Screening | None = None


class ReturnLine(Body):
    line_index: Annotated[StrictInt, Field(ge=0, le=499)]
    quantity: Annotated[StrictInt, Field(gt=0, le=100_000)]


class RecordReturn(Body):
    store_id: str = Field(default="", max_length=64, examples=["LIS-01"])
    lines: list[ReturnLine] = Field(default=[], max_length=500)
    refund: Money | None = None


class ReturnResult(BaseModel):
    purchase: Purchase
    reversed: dict[str, int] = Field(examples=[{"points": 29, "tier_credits": 29}])
    tender_recredited_points: int
    debt_points: int


class ScreeningContext(Body):
    """Session facts for fraud screening; the channel comes from the API key, and the store too
    unless the key is bound to several (then it names one of them)."""

    store_id: str = Field(default="", max_length=64, examples=["HEL-01"],
                          description="Required for an API key bound to several stores: which of them.")  # fmt: skip
    device_id: str = Field(default="", max_length=128, examples=["ios-5f2c9a"])
    ip: str = Field(default="", max_length=64, examples=["203.0.113.7"])
    card_hash: str = Field(default="", max_length=128, description="A payment card token, never the number.")
    employee_card: str = Field(default="", max_length=128, description="The cashier's card at a POS.")
    contact_changed_at: Instant | None = Field(
        default=None, description="When the member's login email/phone last changed (from the identity system)."
    )


class Screening(BaseModel):
    verdict: str = Field(examples=["REVIEW"], description="ALLOW, REVIEW or DENY")
    scored: bool = Field(description="False: fraud_svc did not answer and the configured policy decided.")
    score: float = Field(examples=[0.71], description="Model probability of fraud; not a value, never money.")
    reasons: list[str] = Field(examples=[["rule:velocity_member_purchases_10m", "model:member_new_devices_30d"]])
    model_version: str
    review_id: str = Field(description="The review item when the verdict is REVIEW.")


class Redeem(Body):
    member_id: Id
    points: Points
    unit: str = Field(default="", max_length=64, description="Empty: the default unit (points).")
    reference: str = Field(default="", max_length=200, examples=["reward:free-coffee"])
    context: ScreeningContext | None = None


class Transaction(BaseModel):
    transaction_id: str
    kind: str
    member_id: str
    unit: str
    points: int
    reference: str
    balance_after: Balance | None


class Redemption(Transaction):
    """Paid (201): the transaction. Held for fraud review (202): `hold` reserves the points
    until ops decides; transaction_id is empty until then."""

    status: str = Field(
        examples=["PAID"], description="PAID, HELD_FOR_REVIEW, or (a retry after the review rejected it) REJECTED"
    )
    hold: Hold | None = None
    screening: Screening | None = None


class RedemptionQuoteRequest(Body):
    member_id: Id
    basket_total: Money
    points_wanted: Annotated[StrictInt, Field(ge=0, le=10**12)] = 0


class RedemptionQuote(BaseModel):
    points: int = Field(examples=[2000])
    pays: Money
    remaining: Money
    unit: str
    explanation: str
    program_version: int


class PlaceHold(Body):
    member_id: Id
    points: Points
    unit: str = Field(default="", max_length=64)
    timeout_seconds: Annotated[StrictInt, Field(
        ge=1, le=30 * 86400,
        description="Default: the ledger's hold timeout (POINTMESH_HOLD_TIMEOUT_SECONDS, 15 minutes). At most "
        "the ledger's POINTMESH_HOLD_MAX_TIMEOUT_SECONDS (7 days unless configured): above it, 400 naming "
        "timeout_seconds.",
    )] | None = None  # fmt: skip
    reference: str = Field(default="", max_length=200)
    context: ScreeningContext | None = None


class CaptureHold(Body):
    points: Annotated[StrictInt, Field(ge=0, le=10**12, description="0 captures the whole hold.")] = 0


class Hold(BaseModel):
    hold_id: str
    member_id: str
    unit: str
    points: int
    status: str
    captured_points: int
    expires_at: datetime | None
    channel: str = Field(
        default="",
        description="The channel the hold was placed for: only its keys (or admin "
        "keys) may read, capture or void it; empty on holds open to any key",
    )
    store_id: str = Field(default="", description="The store the hold was placed for, if any")
    balance_after: Balance | None = None
    screening: Screening | None = Field(
        default=None, description="Placing a hold is fraud-screened; under review, review_id names the review"
    )
    transaction_id: str = Field(
        default="", description="A capture's answer (or a retried placing once its review approved the hold): "
        "the capture's transaction, the tender_transaction_id of the receipt the points paid for (so a return "
        "gives them back); empty otherwise",
    )  # fmt: skip


class Transfer(Body):
    source_member_id: Id
    destination_member_id: Id
    points: Points
    unit: str = Field(default="", max_length=64)
    reason: str = Field(default="", max_length=200, examples=["household pooling"])
    context: ScreeningContext | None = None


class TransferResult(BaseModel):
    """Moved (201): the debit and the credit. Held for fraud review (202): `hold` reserves the
    points on the source until ops decides; approval completes the transfer."""

    transfer_id: str
    status: str = Field(examples=["MOVED"], description="MOVED, HELD_FOR_REVIEW or REJECTED")
    debit: Transaction | None = None
    credit: Transaction | None = None
    hold: Hold | None = None
    screening: Screening | None = None


class Explain(Body):
    store_id: str = Field(default="", max_length=64)
    total: Money
    lines: list[PurchaseLine] = Field(min_length=1, max_length=500)
    receipt_time: Instant
    tier: str = Field(default="", max_length=64, description="Evaluate as a member of this tier; empty: entry tier.")


class Explanation(BaseModel):
    program: str
    version: int
    totals: dict[str, int]
    parts: list[ExplainedPart]
    excluded: list[str]
    store_local_time: str


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    checks: dict[str, str] = Field(default={}, examples=[{"ledger": "SERVING", "rules": "SERVING", "redis": "ok"}])


class Review(BaseModel):
    review_id: str
    kind: str = Field(examples=["REDEMPTION"],
                      description="EARN (pending credit), REDEMPTION (a hold) or TRANSFER (a hold on the source)")  # fmt: skip
    status: str = Field(examples=["OPEN"], description="OPEN, APPROVED or REJECTED")
    member_id: str
    unit: str
    points: int
    subject_ids: list[str] = Field(description="The pending earn transactions, or the hold.")
    purchase_id: str
    screening: Screening | None
    created_at: datetime | None
    decided_at: datetime | None
    decided_by: str
    note: str
    outcome_transaction_ids: list[str]
    transfer_id: str = Field(default="", description="TRANSFER: the transfer under review.")
    counterparty_member_id: str = Field(default="", description="TRANSFER: the member it would pay.")


class ReviewPage(BaseModel):
    reviews: list[Review]
    next_page_token: str


class ReviewDecision(Body):
    note: str = Field(default="", max_length=500, examples=["member confirmed the new phone by call-back"])


class OpsTotals(BaseModel):
    as_of: datetime
    totals: dict[str, int] = Field(description="points by account class, e.g. member:points, funding:program:points")
    differences: int = Field(description="reconciliation differences found (0: the books agree)")
    held_points: int = Field(description="points in open holds, fraud review holds included")
    unchecked: list[str] = Field(
        description="checks the pass could not make (transit while sagas were on their way through it)"
    )


class Interval(BaseModel):
    low: float
    high: float


class ExperimentArm(BaseModel):
    arm: str
    control: bool
    members: int
    purchases_per_member: float
    purchases_per_member_ci: Interval
    repeat_rate: float
    repeat_rate_ci: Interval
    points_per_member: float
    repeat_lift: float
    repeat_lift_ci: Interval
    p_value_repeat: float
    p_value_purchases: float
    points_per_incremental_purchase: float
    significant: bool


class ExperimentReport(BaseModel):
    experiment_id: str
    name: str
    alpha: float
    arms: list[ExperimentArm]


class GameItem(BaseModel):
    item_id: str
    name: str
    kind: str = Field(examples=["CHALLENGE"], description="ACHIEVEMENT, STREAK or CHALLENGE")
    progress: int
    goal: int
    completions: int
    last_completed_at: datetime | None
    reward_points: int
    reward_unit: str
    joined: bool


class Progress(BaseModel):
    member_id: str
    items: list[GameItem]
    rewards_paid_points: int
    rewards_pending_points: int


class ChallengeOut(BaseModel):
    challenge_id: str
    name: str
    starts_at: datetime
    ends_at: datetime
    goal_purchases: int
    reward_points: int
    reward_unit: str
    opt_in: bool


class Challenges(BaseModel):
    challenges: list[ChallengeOut]


class JoinChallenge(Body):
    member_id: Id = Field(min_length=1)


class LeaderboardEntry(BaseModel):
    rank: int
    member_id: str
    progress: int
    completed_at: datetime | None


class Leaderboard(BaseModel):
    challenge_id: str
    entries: list[LeaderboardEntry]


class QuarantinedLine(BaseModel):
    source: str = Field(examples=["franchise_drop.csv"])
    line: int = Field(description="The line in the file, 1-based; 1 for a webhook body.")
    reason: str = Field(
        examples=["column amount: '12.5O' is not a decimal amount like 12.50 (digits, one '.', no sign)"]
    )
    field: str = Field(description="The column, JSON path or ledger field at fault; empty when none is.")


class ImportReport(BaseModel):
    """What a legacy import did with each record (docs/legacy.md)."""

    # A file whose header is unusable quarantines every line: listing 250,000 of them was a 32 MB
    # answer, built and validated on the gateway's event loop. The quarantine file has them all.
    MAX_LISTED: ClassVar[int] = 1_000

    adapter: str = Field(examples=["csv"])
    channel: str = Field(examples=["pos"])
    accepted: int = Field(description="Receipts and returns recorded now.")
    duplicates: int = Field(description="Receipts and returns the ledger already had, from any transport.")
    pending_accrual: int = Field(description="Accepted purchases that earn once rules_svc answers.")
    quarantined: list[QuarantinedLine] = Field(
        max_length=MAX_LISTED,
        description=f"The quarantined lines in source order, the first {MAX_LISTED:,} of them at most; "
        "`quarantine_file` holds every one.",
    )
    quarantined_total: int = Field(description="How many lines were quarantined, listed or not.", examples=[1])
    quarantined_truncated: bool = Field(
        description=f"True when there were more than {MAX_LISTED:,}, so `quarantined` lists only the first ones."
    )
    quarantine_file: str | None = Field(
        description="The file the quarantined lines were appended to, by its name in the gateway's quarantine "
        "directory; null when nothing was quarantined."
    )
